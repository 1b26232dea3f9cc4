"""The engine interface (stop strings, decoding, finish reasons, checks) and the hf backend on tiny models."""

from __future__ import annotations

import threading

import pytest
import torch

from engine_fakes import ScriptedEngine
from zhiling.config import GenerationConfig, ModelConfig, QuantizationConfig
from zhiling.data.templates import get_template, save_template_record
from zhiling.errors import ZhilingError
from zhiling.infer import engine as engine_module
from zhiling.infer.engine import (ChatRequest, IncrementalDecoder, PromptTooLongError, StopStrings, TextPrompt,
                                  load_engine)
from zhiling.infer.hf_engine import context_length_of, hf_generation_config

GREEDY = GenerationConfig(max_new_tokens=24)


# ----- stop strings and decoding ---------------------------------------------------------------------------------
def test_stop_strings_find_earliest_and_hold_back_partial_matches():
    stops = StopStrings(["### 指令：", "User:"])
    assert stops.find("答案### 指令：下一个 User:") == 2
    assert stops.find("no stop here") == -1
    assert stops.find("abcUser:", start=5) == 3  # a stop that began before the checked point still counts
    assert stops.safe_length("答案###") == 2  # "###" may be the start of "### 指令："
    assert stops.safe_length("答案 Us") == 3
    assert stops.safe_length("答案") == 2


def test_incremental_decoder_never_splits_a_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode("龘鑫 ok", add_special_tokens=False)
    assert len(ids) > 3  # rare characters are several byte tokens
    decoder = IncrementalDecoder(tiny_tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == "龘鑫 ok"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop", ["世界", "界！", "，"])
def test_generate_and_stream_cut_at_a_stop_string(tiny_tokenizer, stop):
    engine = ScriptedEngine(tiny_tokenizer, "你好，世界！再见")
    params = GenerationConfig(max_new_tokens=64, stop=[stop])
    expected = "你好，世界！再见".split(stop)[0]
    [result] = engine.generate([ChatRequest("问")], params)
    assert (result.text, result.finish_reason) == (expected, "stop")
    stream = engine.stream(ChatRequest("问"), params)
    deltas = list(stream)
    assert "".join(deltas) == expected == stream.result.text
    assert stream.result.finish_reason == "stop"


def test_stream_never_emits_part_of_a_stop_string(tiny_tokenizer):
    text = "答案是四十二。### Instruction: more"
    engine = ScriptedEngine(tiny_tokenizer, text)  # alpaca's stop word is "### Instruction:"
    seen = ""
    for delta in engine.stream(ChatRequest("问"), GenerationConfig(max_new_tokens=64)):
        seen += delta
        assert "#" not in seen
    assert seen == "答案是四十二。"


# ----- stop strings: bounded, and scanned in linear time --------------------------------------------------------
def test_the_stop_scan_looks_only_at_the_tail(tiny_tokenizer, monkeypatch):
    scanned: list[int] = []
    find, safe_length = StopStrings.find, StopStrings.safe_length
    monkeypatch.setattr(StopStrings, "find", lambda self, text, start=0: scanned.append(len(text))
                        or find(self, text, start))
    monkeypatch.setattr(StopStrings, "safe_length", lambda self, text: scanned.append(len(text))
                        or safe_length(self, text))
    answer = "一二三四五六七八九十" * 40
    engine = ScriptedEngine(tiny_tokenizer, answer, eos=False, context_length=10_000)
    params = GenerationConfig(max_new_tokens=4000, stop=["不会出现的停止词"])
    with engine.stream(TextPrompt("x"), params) as stream:
        assert stream.text() == answer
    longest = max(len(stop) for stop in engine.stop_strings(params))
    assert len(scanned) > 100
    assert max(scanned) <= longest + 8  # the tail window, not the whole answer (400 characters)


def test_finish_reasons_and_token_counts(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "你好，世界！")
    request = ChatRequest("问")
    [done] = engine.generate([request], GenerationConfig(max_new_tokens=64))
    answer_ids = tiny_tokenizer.encode("你好，世界！", add_special_tokens=False)
    assert done.finish_reason == "stop" and done.text == "你好，世界！"
    assert done.completion_tokens == len(answer_ids) + 1  # the EOS counts
    assert done.prompt_tokens == engine.count_tokens(request)
    [cut] = engine.generate([request], GenerationConfig(max_new_tokens=2))
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    no_eos = ScriptedEngine(tiny_tokenizer, "你好", eos=False)
    stream = no_eos.stream(request, GenerationConfig(max_new_tokens=64))
    assert stream.text() == "你好" and stream.result.finish_reason == "length"


def test_closing_a_stream_cancels_the_generation(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, "一二三四五六七八九十" * 3, eos=False)
    stream = engine.stream(ChatRequest("问"), GenerationConfig(max_new_tokens=64))
    next(stream)
    stream.close()
    assert engine.cancelled[0].is_set()
    assert stream.result.finish_reason == "cancelled"
    unstarted = engine.stream(ChatRequest("问"), GenerationConfig(max_new_tokens=64))
    unstarted.close()
    assert unstarted.result.finish_reason == "cancelled" and unstarted.result.completion_tokens == 0


def test_prompt_ids_use_the_template_and_raw_prompts_use_the_tokenizer(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, template="chatml")
    request = ChatRequest("今天天气如何？", history=[("你好", "你好！")], system="你是助手")
    expected = get_template("chatml").encode_prompt(tiny_tokenizer, "你是助手", [("你好", "你好！")], "今天天气如何？")
    assert engine.prompt_ids(request) == expected
    assert engine.prompt_ids(TextPrompt("春眠不觉晓")) == tiny_tokenizer.encode("春眠不觉晓")


def test_unsupported_parameters_are_refused_by_name(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, unsupported={"num_beams", "no_repeat_ngram_size"})
    engine.check_params(GenerationConfig())
    with pytest.raises(ZhilingError, match="cannot honour num_beams"):
        engine.generate([ChatRequest("问")], GenerationConfig(num_beams=2))
    with pytest.raises(ZhilingError, match="no_repeat_ngram_size"):
        engine.stream(ChatRequest("问"), GenerationConfig(no_repeat_ngram_size=3))


def test_prompt_over_the_context_is_refused(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, context_length=40)
    with pytest.raises(PromptTooLongError, match="context is 40 tokens"):
        engine.generate([ChatRequest("你好" * 50)], GenerationConfig(max_new_tokens=8))
    with pytest.raises(PromptTooLongError):
        engine.stream(ChatRequest("问"), GenerationConfig(max_new_tokens=40))


@pytest.mark.parametrize("messages, error", [
    ([], "no user message"),
    ([{"role": "assistant", "content": "hi"}], r"messages\[0\]: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system message may only come first"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be the user's"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content: expected a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
    (["hello"], "expected an object"),
])
def test_chat_request_from_bad_messages(messages, error):
    with pytest.raises(ZhilingError, match=error):
        ChatRequest.from_messages(messages)


def test_chat_request_from_messages():
    request = ChatRequest.from_messages([
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": [{"type": "text", "text": "再见"}]}])
    assert (request.system, request.history, request.query) == ("你是助手", [("你好", "你好！")], "再见")


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ZhilingError, match="unknown backend 'hff'; did you mean 'hf'"):
        load_engine("x", backend="hff")
    monkeypatch.setitem(engine_module.BACKENDS, "ghost", "zhiling.infer.no_such_backend:load")
    with pytest.raises(ZhilingError, match="ghost backend is not available"):
        load_engine("x", backend="ghost")


# ----- hf backend ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return load_engine(ModelConfig(name_or_path=str(tiny_model_dir("llama"))))


def test_hf_engine_describes_itself(hf_engine, tiny_model_dir):
    info = hf_engine.describe()
    assert info["backend"] == "hf" and info["model"] == str(tiny_model_dir("llama"))
    assert info["template"] == "alpaca" and "default for this model" in info["template_origin"]
    assert hf_engine.context_length == 512


def test_generation_parameters_reach_transformers_generate(hf_engine, monkeypatch):
    seen = {}
    original = hf_engine.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    seeds = []
    monkeypatch.setattr(hf_engine.model, "generate", spy)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed))
    params = GenerationConfig(max_new_tokens=7, min_new_tokens=3, do_sample=True, temperature=0.5, top_p=0.8,
                              top_k=11, num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=2,
                              stop=["END"], seed=1234)
    hf_engine.generate([ChatRequest("你好")], params)
    config = seen["generation_config"]
    assert (config.max_new_tokens, config.min_new_tokens, config.do_sample) == (7, 3, True)
    assert (config.temperature, config.top_p, config.top_k) == (0.5, 0.8, 11)
    assert (config.num_beams, config.repetition_penalty, config.no_repeat_ngram_size) == (2, 1.3, 2)
    assert config.eos_token_id == hf_engine.stop_token_ids()
    assert config.pad_token_id == hf_engine.tokenizer.pad_token_id
    criteria = seen["stopping_criteria"]
    stop_strings = [c for c in criteria if type(c).__name__ == "StopStringCriteria"][0]
    assert "END" in stop_strings.stops.stops and "### Instruction:" in stop_strings.stops.stops
    assert seeds == [1234]


def test_model_generation_defaults_do_not_leak_in(hf_engine, monkeypatch):
    monkeypatch.setattr(hf_engine.model.generation_config, "repetition_penalty", 1.7)
    monkeypatch.setattr(hf_engine.model.generation_config, "do_sample", True)
    ours = hf_generation_config(GenerationConfig(), hf_engine.stop_token_ids(), 0)
    merged, _ = hf_engine.model._prepare_generation_config(ours)
    assert merged.repetition_penalty == 1.0 and merged.do_sample is False


def test_hf_greedy_batch_with_left_padding_matches_single_prompts(hf_engine):
    requests = [ChatRequest("你好"), ChatRequest("请找出句子中的实体：张三在北京大学读书。", history=[("a", "b")]),
                ChatRequest("hello world, how are you? I am fine.")]
    batched = hf_engine.generate(requests, GREEDY)
    single = [hf_engine.generate([r], GREEDY)[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in single]
    assert len({r.prompt_tokens for r in batched}) == 3


def test_hf_stream_matches_generate(hf_engine):
    request = ChatRequest("今天天气很好。")
    [whole] = hf_engine.generate([request], GREEDY)
    stream = hf_engine.stream(request, GREEDY)
    assert stream.text() == whole.text
    assert (stream.result.finish_reason, stream.result.completion_tokens) == (whole.finish_reason,
                                                                              whole.completion_tokens)


def test_hf_stop_string_cuts_real_output(hf_engine):
    request = ChatRequest("春眠不觉晓")
    params = GenerationConfig(max_new_tokens=24)
    [free] = hf_engine.generate([request], params)
    text = free.text
    assert len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    [cut] = hf_engine.generate([request], GenerationConfig(max_new_tokens=24, stop=[stop]))
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    assert cut.completion_tokens < free.completion_tokens
    stream = hf_engine.stream(request, GenerationConfig(max_new_tokens=24, stop=[stop]))
    assert stream.text() == expected and stream.result.finish_reason == "stop"


def test_hf_sampling_is_repeatable_with_a_seed(hf_engine):
    params = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    first = hf_engine.generate([ChatRequest("你好")], params)[0].text
    assert hf_engine.generate([ChatRequest("你好")], params)[0].text == first
    assert hf_engine.stream(ChatRequest("你好"), params).text() == first


def test_a_seeded_sampling_ignores_and_keeps_the_global_rng(hf_engine, monkeypatch):
    """Each request draws from its own generator: other code reseeding or drawing from torch's global generator
    between its steps changes nothing, and the seeded request leaves the global state as it was."""
    params = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    quiet = hf_engine.generate([ChatRequest("你好")], params)[0].text
    forward = hf_engine.model.forward

    def noisy_forward(*args, **kwargs):  # another request sampling (and an old-style reseed) at every step
        torch.manual_seed(99)
        torch.rand(100)
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf_engine.model, "forward", noisy_forward)
    assert hf_engine.generate([ChatRequest("你好")], params)[0].text == quiet
    assert hf_engine.stream(ChatRequest("你好"), params).text() == quiet
    monkeypatch.undo()
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    hf_engine.generate([ChatRequest("你好")], params)
    hf_engine.generate([ChatRequest("你好")], params.model_copy(update={"seed": None}))
    assert torch.equal(torch.get_rng_state(), state)


def test_hf_sampling_without_a_seed_varies(hf_engine):
    params = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=2.0, top_k=0, top_p=1.0)
    answers = {hf_engine.generate([ChatRequest("你好")], params)[0].text for _ in range(4)}
    assert len(answers) > 1


def test_hf_beam_search_and_min_new_tokens(hf_engine):
    [beam] = hf_engine.generate([ChatRequest("你好")], GenerationConfig(max_new_tokens=12, num_beams=3))
    assert beam.completion_tokens <= 12
    stream = hf_engine.stream(ChatRequest("你好"), GenerationConfig(max_new_tokens=12, num_beams=3))
    assert stream.text() == beam.text
    [long] = hf_engine.generate([ChatRequest("你好")], GenerationConfig(max_new_tokens=30, min_new_tokens=30))
    assert long.completion_tokens == 30


def test_hf_stream_close_stops_the_generate_thread(hf_engine):
    params = GenerationConfig(max_new_tokens=400, min_new_tokens=400)
    stream = hf_engine.stream(ChatRequest("你好"), params)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 400
    assert not [t for t in threading.enumerate() if t.name == "zhiling-hf-generate"]


def test_cancel_event_stops_a_batch(hf_engine):
    cancel = threading.Event()
    cancel.set()
    results = hf_engine.generate([ChatRequest("你好"), ChatRequest("再见")],
                                 GenerationConfig(max_new_tokens=50, min_new_tokens=50), cancel=cancel)
    assert all(r.finish_reason == "cancelled" and r.completion_tokens <= 1 for r in results)


def test_adapter_template_record_is_used(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model_dir("qwen2")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    save_template_record(get_template("chatml"), adapter)
    engine = load_engine(ModelConfig(name_or_path=str(base_dir)), adapter=str(adapter))
    assert engine.template.name == "chatml" and "recorded with the adapter" in engine.template_origin
    assert engine.adapter_id == str(adapter)
    plain = load_engine(ModelConfig(name_or_path=str(base_dir)), template="chatml")
    request = ChatRequest("你好")
    assert engine.prompt_ids(request) == plain.prompt_ids(request)
    with_adapter = engine.generate([request], GREEDY)[0]
    without = plain.generate([request], GREEDY)[0]
    assert with_adapter.text != without.text  # the adapter's (non-zero) weights take part
    explicit = load_engine(ModelConfig(name_or_path=str(base_dir)), adapter=str(adapter), template="alpaca")
    assert explicit.template.name == "alpaca"


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny llama wide enough for bitsandbytes' 4-bit blocks (64 values)."""
    from tiny import make_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama_128")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("llama", len(tokenizer), hidden=128)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_hf_engine_loads_quantized(wider_model_dir, bits):
    pytest.importorskip("bitsandbytes")
    engine = load_engine(ModelConfig(name_or_path=str(wider_model_dir)), quant=QuantizationConfig(bits=bits))
    [result] = engine.generate([ChatRequest("你好")], GenerationConfig(max_new_tokens=4))
    assert 1 <= result.completion_tokens <= 4


def test_context_length_of_various_configs(tiny_model_dir):
    from transformers import AutoConfig

    assert context_length_of(AutoConfig.from_pretrained(str(tiny_model_dir("gemma3")))) == 512
    bloom = AutoConfig.for_model("bloom")
    assert context_length_of(bloom) == 2048


@pytest.mark.slow
def test_default_model_hf_engine():
    """The embedded Gemma 3 270M: its family template, streaming equal to batch, stop strings."""
    engine = load_engine(None)
    assert engine.template.name == "gemma" and engine.context_length >= 8192
    requests = [ChatRequest("你好，请介绍一下你自己。"), ChatRequest("1 加 1 等于几？", system="你是一个数学老师。")]
    params = GenerationConfig(max_new_tokens=12)
    batched = engine.generate(requests, params)
    assert [r.text for r in batched] == [engine.generate([r], params)[0].text for r in requests]
    assert engine.stream(requests[0], params).text() == batched[0].text
    prompt = engine.tokenizer.decode(engine.prompt_ids(requests[1]))
    assert prompt.startswith("<bos><start_of_turn>user\n你是一个数学老师。\n\n1 加 1 等于几？<end_of_turn>\n")
