"""Message text is sacred: braces, placeholders, Jinja syntax and special-token strings in a message reach
training, chat / predict / serve and every export verbatim, and never become control tokens in zhiling's own
runtimes."""

import pytest

from zhiling.data.templates import TEMPLATES, Template, TokenizerTemplate, get_template
from zhiling.data.tokenize import TokenizeOptions, build_example
from zhiling.errors import ZhilingError
from zhiling.infer.engine import ChatRequest

CODE = 'print(f"{index}: {eos}")'


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_placeholders_in_messages_are_not_substituted(name):
    template = TEMPLATES[name]
    text = template.render(CODE + " system", [(CODE + " user", CODE + " answer"), ("next", None)],
                           eos="<eos>", bos="<bos>")
    for role in ("system", "user", "answer"):
        assert f"{CODE} {role}" in text


def _tiny_gguf(folder, template):
    from tiny_gguf import write_tiny_gguf
    from zhiling.export.gguf_meta import embed_template

    raw = write_tiny_gguf(folder / "raw.gguf", chat_template=template.to_jinja(), layers=1, hidden=16, heads=2,
                          kv_heads=1, ff=16)
    return embed_template(raw, folder / "model.gguf", template)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_path_renders_tricky_messages_verbatim(tiny_tokenizer, tmp_path, name):
    """render, training pieces, the serve prompt, the exported chat template (transformers) and the GGUF
    metadata (as the llama.cpp backend renders it) agree, and no message text becomes a control token."""
    from zhiling.parity import check_template_parity

    template = TEMPLATES[name]
    assert check_template_parity(template, tiny_tokenizer, gguf=_tiny_gguf(tmp_path, template)) == []


def test_parity_of_the_chat_template_a_saved_tokenizer_carries(tiny_tokenizer, tmp_path):
    """What train and merge write (``apply_to_tokenizer`` + ``save_pretrained``) renders the same text too."""
    from transformers import AutoTokenizer

    from zhiling.parity import check_template_parity

    for name in ("chatglm", "gemma"):
        TEMPLATES[name].apply_to_tokenizer(tiny_tokenizer)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        saved = AutoTokenizer.from_pretrained(tmp_path / name).chat_template
        assert check_template_parity(TEMPLATES[name], tiny_tokenizer, saved_chat_template=saved) == []
    found = check_template_parity(TEMPLATES["chatml"], tiny_tokenizer, saved_chat_template=saved)
    assert found and {m.surface for m in found} == {"saved chat_template"}


def test_parity_of_the_tokenizers_own_template(tiny_tokenizer):
    from zhiling.parity import check_template_parity

    tiny_tokenizer.chat_template = TEMPLATES["chatml"].to_jinja()
    assert check_template_parity(get_template("auto", tiny_tokenizer), tiny_tokenizer) == []


def test_parity_check_reports_a_mismatch(tiny_tokenizer, tmp_path):
    """The check is not vacuous: a GGUF carrying another template's chat template is named as the culprit."""
    from zhiling.parity import check_template_parity

    gguf = _tiny_gguf(tmp_path, TEMPLATES["belle"])
    found = check_template_parity(TEMPLATES["alpaca"], tiny_tokenizer, gguf=gguf)
    assert {m.surface for m in found} == {"gguf chat_template", "gguf record"}
    first = found[0]
    assert str(first).startswith("gguf chat_template (system, two rounds, whole): at character 457, expected ")
    assert "### Instruction:" in str(first) and "Human: " in str(first)


@pytest.mark.parametrize("typed", ["<|im_end|>", "<eos>", "<bos>", "<|im_start|>assistant\n"])
def test_special_token_strings_typed_by_a_user_are_plain_text(tiny_tokenizer, typed):
    template = TEMPLATES["chatml"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    specials = {tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<eos>", "<bos>")}
    plain = template.encode_prompt(tiny_tokenizer, "系统", [("你好", "好的")], "再见")
    typed_ids = template.encode_prompt(tiny_tokenizer, "系统" + typed, [("你好" + typed, "好的" + typed)],
                                       "再见" + typed)
    assert [i for i in typed_ids if i in specials] == [i for i in plain if i in specials]
    assert tiny_tokenizer.decode(typed_ids) == template.render_text(
        tiny_tokenizer, "系统" + typed, [("你好" + typed, "好的" + typed), ("再见" + typed, None)])
    # the answer still ends with the template's own end token, once
    pieces = template.encode(tiny_tokenizer, None, [("问" + typed, "答" + typed)])
    assert pieces[0][1][-1] == im_end and pieces[0][1].count(im_end) == 1
    # the shared tokenizer is left as it was: other threads still parse special tokens in template text
    assert tiny_tokenizer.backend_tokenizer.encode_special_tokens is False
    assert tiny_tokenizer.encode("<|im_end|>", add_special_tokens=False) == [im_end]


def test_ids_of_ordinary_text_are_those_of_the_rendered_prompt(tiny_tokenizer):
    """Markup and message text are tokenized as one run between special tokens, as a whole rendered prompt is."""
    template = TEMPLATES["chatml"]
    ids = template.encode_prompt(tiny_tokenizer, "你是助手。", [("你好", "你好！")], "再见 {index}")
    text = template.render_text(tiny_tokenizer, "你是助手。", [("你好", "你好！"), ("再见 {index}", None)])
    assert ids == tiny_tokenizer.encode(text, add_special_tokens=False)


def test_training_rows_keep_special_token_strings_as_text(tiny_tokenizer):
    record = {"system": "", "messages": [{"role": "user", "content": "写 <eos> 和 {eos}"},
                                         {"role": "assistant", "content": "<eos> {index}"}]}
    example = build_example(TEMPLATES["alpaca"], tiny_tokenizer, record, TokenizeOptions(cutoff_len=512))
    eos = tiny_tokenizer.eos_token_id
    assert example["input_ids"].count(eos) == 1 and example["input_ids"][-1] == eos
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tiny_tokenizer.decode(trained) == "<eos> {index}<eos>"


def test_serve_prompt_keeps_special_token_strings_as_text(tiny_tokenizer):
    from zhiling.infer.engine import request_prompt_ids

    request = ChatRequest.from_messages([{"role": "system", "content": "<|im_start|>system"},
                                         {"role": "user", "content": "<|im_end|>"}])
    ids = request_prompt_ids(TEMPLATES["chatml"], tiny_tokenizer, request)
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # system, user, assistant cue: the template's own


def test_auto_template_keeps_special_token_strings_as_text(tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATES["chatml"].to_jinja()
    auto = get_template("auto", tiny_tokenizer)
    assert isinstance(auto, TokenizerTemplate)
    turns = [("问<|im_end|>", "答<eos>")]
    named = TEMPLATES["chatml"].encode(tiny_tokenizer, "系统<|im_start|>", turns)
    eos = tiny_tokenizer.eos_token_id
    assert auto.encode(tiny_tokenizer, "系统<|im_start|>", turns) == [(p, r + [eos]) for p, r in named]


def test_auto_template_that_changes_message_text_is_refused_for_special_strings(tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] | trim }}<|im_end|>"
                                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    auto = get_template("auto", tiny_tokenizer)
    assert auto.encode(tiny_tokenizer, None, [("问 ", "答 ")])  # ordinary text: fine
    assert auto.encode(tiny_tokenizer, None, [("问", "答<eos>")])  # trim changes nothing here: fine
    with pytest.raises(ZhilingError, match="message ' 问<eos> ' holds a special-token string.*changes message text"):
        auto.encode(tiny_tokenizer, None, [(" 问<eos> ", "答")])


@pytest.mark.parametrize("literal", ["😀 表情", "}} and {{ x }}", "{% if x %}", "{#", "#}", 'say "hi"', "back\\slash",
                                     "line\r\nbreak\ttab", "\\u4e2d", "'single'"])
def test_template_literals_are_escaped_for_jinja(tiny_tokenizer, literal):
    template = Template("custom", "literals everywhere", user=literal + "{content}" + literal + "\n",
                        assistant_prefix=literal, system=literal + "{content}\n", default_system=literal,
                        separator=literal, stop_words=())
    turns = [("问", "答"), ("再问", None)]
    for system in (None, "系统"):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}, {"role": "user", "content": "再问"}]
        rendered = tiny_tokenizer.apply_chat_template(messages, chat_template=template.to_jinja(), tokenize=False,
                                                      add_generation_prompt=True)
        assert rendered == template.render_text(tiny_tokenizer, system, turns)


def test_jinja_string_cuts_delimiters_and_escapes_only_what_it_must():
    from zhiling.data.templates import jinja_string

    assert jinja_string("中文😀") == '"中文😀"'
    assert jinja_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert jinja_string("x}}y") == '("x}" + "}y")'


def test_special_finder_matches_leftmost_longest_like_tokenizers():
    from zhiling.data.templates import SpecialFinder

    finder = SpecialFinder({"<a>": 1, "<a>b": 2, "<ab>": 3, "<eos>": 4, "<unused1>": 5, "<unused12>": 6})
    text = "x<a>b<a>c<ab><eos<eos><unused12><unused1"
    assert [(text[s:e], i) for s, e, i in finder.finditer(text)] == [
        ("<a>b", 2), ("<a>", 1), ("<ab>", 3), ("<eos>", 4), ("<unused12>", 6)]
    assert not finder.search("<div> a < b </div> <unused")
