"""Template registry: exact rendered strings, Jinja equivalence, token pieces, stop tokens, records."""

import pytest

from zhiling.data.templates import (TEMPLATES, TokenizerTemplate, get_template, recorded_template, resolve_template,
                                    save_template_record, template_names)
from zhiling.errors import ZhilingError

CONVERSATION = [("问题一", "回答一"), ("问题二", None)]

EXPECTED = {
    "alpaca": "<bos>你是助手。\n\n### Instruction:\n问题一\n\n### Response:\n回答一<eos>\n\n### Instruction:\n问题二\n\n"
              "### Response:\n",
    "alpaca_zh": "<bos>你是助手。\n\n### 指令：\n问题一\n\n### 回答：\n回答一<eos>\n\n### 指令：\n问题二\n\n### 回答：\n",
    "belle": "<bos>你是助手。\n\nHuman: 问题一\n\nAssistant: 回答一<eos>\n\nHuman: 问题二\n\nAssistant: ",
    "chatglm": "<bos>你是助手。\n\n[Round 1]\n\n问：问题一\n\n答：回答一<eos>\n\n[Round 2]\n\n问：问题二\n\n答：",
    "baichuan": "<bos>你是助手。<reserved_102>问题一<reserved_103>回答一<eos><reserved_102>问题二<reserved_103>",
    "baichuan2": "<bos>你是助手。<reserved_106>问题一<reserved_107>回答一<eos><reserved_106>问题二<reserved_107>",
    "vicuna_chat": "<bos>你是助手。\n\nUser:问题一\n\nAssistant:回答一<eos>\n\nUser:问题二\n\nAssistant:",
    "chatml": "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n问题一<|im_end|>\n<|im_start|>assistant\n"
              "回答一<|im_end|>\n<|im_start|>user\n问题二<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<bos><|start_header_id|>system<|end_header_id|>\n\n你是助手。<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\n问题一<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n回答一<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n问题二<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\n你是助手。\n\n问题一<end_of_turn>\n<start_of_turn>model\n回答一<end_of_turn>\n"
             "<start_of_turn>user\n问题二<end_of_turn>\n<start_of_turn>model\n",
}

SINGLE_NO_SYSTEM = {
    "alpaca": "<bos>Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n你好\n\n### Response:\n",
    "belle": "<bos>Human: 你好\n\nAssistant: ",
    "chatglm": "<bos>[Round 1]\n\n问：你好\n\n答：",
    "chatml": "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<bos><start_of_turn>user\n你好<end_of_turn>\n<start_of_turn>model\n",
}


def test_every_named_template_has_an_expected_string():
    assert set(EXPECTED) == set(TEMPLATES)
    assert template_names() == [*TEMPLATES, "auto"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_rendering_with_system(name):
    assert TEMPLATES[name].render("你是助手。", CONVERSATION, eos="<eos>", bos="<bos>") == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(SINGLE_NO_SYSTEM))
def test_single_turn_rendering_with_default_system(name):
    template = TEMPLATES[name]
    assert template.render(None, [("你好", None)], eos="<eos>", bos="<bos>") == SINGLE_NO_SYSTEM[name]


def test_empty_system_string_means_no_system_block():
    assert TEMPLATES["alpaca"].render("", [("你好", None)], bos="<bos>") == "<bos>### Instruction:\n你好\n\n### Response:\n"


def _messages(system, turns):
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("system", [None, "你是助手。"])
@pytest.mark.parametrize("turns", [[("你好", None)], [("你好", "你好！"), ("今天呢？", "很好。"), ("再见", None)],
                                   [("你好", "你好！")]])
def test_jinja_chat_template_renders_the_same_text(tiny_tokenizer, name, system, turns):
    template = TEMPLATES[name]
    generation = turns[-1][1] is None
    jinja = tiny_tokenizer.apply_chat_template(_messages(system, turns), chat_template=template.to_jinja(),
                                               tokenize=False, add_generation_prompt=generation)
    assert jinja == template.render_text(tiny_tokenizer, system, turns)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"belle"}))
def test_prompt_ids_equal_tokenizing_the_rendered_prompt(tiny_tokenizer, name):
    """Our engines use the piecewise ids; other tools tokenize the rendered text. They agree at turn boundaries
    (belle's cue ends in a space, which byte-level BPE merges with the next word when the whole text is tokenized)."""
    template = TEMPLATES[name]
    history = [("你好", "你好！有什么可以帮你？")]
    ids = template.encode_prompt(tiny_tokenizer, "你是助手。", history, "再见")
    text = template.render_text(tiny_tokenizer, "你是助手。", [*history, ("再见", None)])
    assert ids == tiny_tokenizer.encode(text, add_special_tokens=False)


def test_single_turn_prompt_ids_match_rendered_prompt_for_belle_too(tiny_tokenizer):
    template = TEMPLATES["belle"]
    ids = template.encode_prompt(tiny_tokenizer, None, [], "你好")
    assert ids == tiny_tokenizer.encode(template.render_text(tiny_tokenizer, None, [("你好", None)]),
                                        add_special_tokens=False)


def test_encode_appends_eos_or_the_templates_end_token(tiny_tokenizer):
    pieces = TEMPLATES["alpaca_zh"].encode(tiny_tokenizer, None, [("你好", "好的")])
    assert pieces[0][1][-1] == tiny_tokenizer.eos_token_id
    assert pieces[0][0][0] == tiny_tokenizer.bos_token_id
    chatml = TEMPLATES["chatml"].encode(tiny_tokenizer, None, [("你好", "好的")])
    assert chatml[0][1][-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chatml[0][0][0] != tiny_tokenizer.bos_token_id  # chatml has no BOS


def test_stop_tokens(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    assert TEMPLATES["alpaca"].stop_token_ids(tiny_tokenizer) == [eos]
    assert TEMPLATES["gemma"].stop_token_ids(tiny_tokenizer) == [eos, tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert TEMPLATES["chatml"].stop_strings(tiny_tokenizer) == ["<|im_end|>"]
    assert TEMPLATES["alpaca"].stop_strings(tiny_tokenizer) == ["<eos>", "### Instruction:"]


def test_apply_to_tokenizer_writes_the_template(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    TEMPLATES["chatglm"].apply_to_tokenizer(tiny_tokenizer)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = reloaded.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                        add_generation_prompt=True)
    assert text == "<bos>[Round 1]\n\n问：你好\n\n答："


def test_auto_uses_the_tokenizers_own_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATES["chatml"].to_jinja()
    auto = get_template("auto", tiny_tokenizer)
    assert isinstance(auto, TokenizerTemplate)
    turns = [("你好", "你好！"), ("再见", "再见！")]
    named = TEMPLATES["chatml"].encode(tiny_tokenizer, "系统", turns)
    eos = tiny_tokenizer.eos_token_id  # auto ends every answer with the tokenizer's EOS as well
    assert auto.encode(tiny_tokenizer, "系统", turns) == [(p, r + [eos]) for p, r in named]
    assert auto.render_text(tiny_tokenizer, "系统", turns) == TEMPLATES["chatml"].render_text(tiny_tokenizer, "系统",
                                                                                              turns)


def test_auto_appends_eos_when_the_chat_template_has_none(tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    pieces = get_template("auto", tiny_tokenizer).encode(tiny_tokenizer, None, [("你好", "好的")])
    assert pieces[0][1][-1] == tiny_tokenizer.eos_token_id


def test_auto_rejects_a_template_that_is_not_prefix_consistent(tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                    "{% if add_generation_prompt %}[CUE]{% else %}[END]{% endif %}")
    with pytest.raises(ZhilingError, match="choose a named template"):
        get_template("auto", tiny_tokenizer).encode(tiny_tokenizer, None, [("a", "b"), ("c", "d")])


def test_default_choice_and_errors(tiny_tokenizer):
    assert get_template(None, tiny_tokenizer, "gemma3_text").name == "gemma"
    assert get_template(None, tiny_tokenizer, "qwen2").name == "chatml"
    assert get_template(None, tiny_tokenizer, "something_new").name == "alpaca"
    with pytest.raises(ZhilingError, match="did you mean 'chatml'"):
        get_template("chat_ml")
    with pytest.raises(ZhilingError, match="has none"):
        get_template("auto", tiny_tokenizer)
    assert get_template("alpaca", system="自定义").default_system == "自定义"


def test_template_record_round_trip_and_resolution(tiny_tokenizer, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_template_record(TEMPLATES["chatglm"], adapter)
    assert recorded_template(adapter) == TEMPLATES["chatglm"]
    template, where = resolve_template(None, tiny_tokenizer, "llama", adapter=adapter)
    assert template.name == "chatglm" and "adapter" in where
    template, where = resolve_template("alpaca", tiny_tokenizer, "llama", adapter=adapter)
    assert template.name == "alpaca" and "given" in where
    template, where = resolve_template(None, tiny_tokenizer, "qwen2")
    assert template.name == "chatml" and "default" in where
    (adapter / "zhiling_template.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ZhilingError, match="not a valid template record"):
        recorded_template(adapter)
