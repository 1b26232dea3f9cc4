"""The llama.cpp backend on a tiny random GGUF model written in the test (seconds, no download).

Sampling semantics are checked against transformers' own logits processors; greedy decoding against transformers
running the same GGUF weights."""

import threading

import numpy as np
import pytest

from zhiling.config import GenerationConfig, ModelConfig, QuantizationConfig
from zhiling.data.templates import TEMPLATES
from zhiling.errors import ZhilingError
from zhiling.infer.engine import ChatRequest, PromptTooLongError, TextPrompt

import llama_cpp  # noqa: F401 (the backend under test)

from tiny_gguf import write_tiny_gguf  # noqa: E402
from zhiling.infer.llamacpp_engine import (load_llamacpp_engine, processed_scores,  # noqa: E402
                                           sampling_distribution)

PROMPTS = ["请找出句子中的实体：张三在北京大学读书。", "你好，今天天气很好。", "Write a poem about Shanghai."]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny GGUF with the 'chatml' template embedded the way `zhiling export` embeds it."""
    from zhiling.export.gguf_meta import embed_template

    folder = tmp_path_factory.mktemp("tiny_gguf")
    raw = write_tiny_gguf(folder / "raw.gguf", chat_template=TEMPLATES["chatml"].to_jinja())
    return embed_template(raw, folder / "tiny-chatml.gguf", TEMPLATES["chatml"])


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    engine = load_llamacpp_engine(ModelConfig(name_or_path=str(tiny_gguf)), n_threads=1)
    yield engine
    engine.close()


def fresh(tiny_gguf, **kwargs):
    return load_llamacpp_engine(ModelConfig(name_or_path=str(tiny_gguf)), n_threads=1, **kwargs)


# ----- loading and templates -------------------------------------------------------------------------------------
def test_template_recorded_in_the_gguf_is_used(engine):
    assert engine.template == TEMPLATES["chatml"]
    assert "recorded in the GGUF file" in engine.template_origin
    assert engine.describe()["backend"] == "llama.cpp" and engine.context_length == 256


def test_template_choice_order(tiny_gguf, tmp_path):
    given = fresh(tiny_gguf, template="alpaca_zh", system="你是助手。")
    assert given.template.name == "alpaca_zh" and given.template.default_system == "你是助手。"
    given.close()
    jinja_only = write_tiny_gguf(tmp_path / "jinja.gguf", chat_template=TEMPLATES["belle"].to_jinja())
    auto = fresh(jinja_only)
    assert auto.template.name == "auto" and "chat template" in auto.template_origin
    # the 'auto' template renders through the GGUF's Jinja: the same ids as the named template it came from
    request = ChatRequest("你好", history=[("北京", "上海")])
    belle_ids = TEMPLATES["belle"].encode_prompt(auto.tokenizer, None, request.history, request.query)
    assert auto.prompt_ids(request)[:len(belle_ids) - 1] == belle_ids[:-1]
    auto.close()
    bare = fresh(write_tiny_gguf(tmp_path / "bare.gguf"))
    assert bare.template.name == "alpaca" and "default for llama" in bare.template_origin  # family default
    bare.close()


def test_prompt_ids_are_the_template_encoding(engine):
    request = ChatRequest("你好，世界", history=[("北京", "上海")], system="你是助手。")
    ids = engine.prompt_ids(request)
    assert ids == TEMPLATES["chatml"].encode_prompt(engine.tokenizer, "你是助手。", [("北京", "上海")], "你好，世界")
    im_start = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 5  # chatml has no BOS; special tokens are single ids
    assert engine.tokenizer.decode(ids) == TEMPLATES["chatml"].render("你是助手。", [("北京", "上海"), ("你好，世界", None)])
    assert engine.prompt_ids(TextPrompt("你好"))[0] == engine.tokenizer.bos_token_id
    assert engine.stop_token_ids() == [2, engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_control_token_strings_in_messages_stay_plain_text(engine, tiny_gguf):
    """llama.cpp parses control tokens in the template's markup only: a user typing <|im_end|> sends text."""
    from zhiling.parity import check_template_parity

    tokenizer = engine.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {"<|im_start|>", "<|im_end|>", "</s>"} <= {t.content for t in tokenizer.added_tokens_decoder.values()}
    typed = engine.prompt_ids(ChatRequest("你好<|im_end|>", history=[("北京</s>", "上海<|im_start|>")],
                                          system="<|im_end|>"))
    plain = engine.prompt_ids(ChatRequest("你好", history=[("北京", "上海")], system="系统"))
    assert typed.count(im_end) == plain.count(im_end) == 4  # the template's own: system, two questions, answer
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [im_end]
    assert im_end not in tokenizer.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=True)
    assert check_template_parity(engine.template, tokenizer, gguf=tiny_gguf) == []


def test_tokenizer_round_trip_and_byte_fallback(engine):
    tokenizer = engine.tokenizer
    for text in ["你好世界", "Write a poem", "emoji 🚀 and 𝔘nicode", "### 指令：\n回答"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("你好", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("你好")]
    assert tokenizer.decode(tokenizer.encode("🚀", add_special_tokens=False)[:2]).endswith("\ufffd")


def test_bad_arguments(tiny_gguf, tmp_path):
    with pytest.raises(ZhilingError, match="does not apply PEFT adapters.*zhiling export"):
        fresh(tiny_gguf, adapter=str(tmp_path))
    with pytest.raises(ZhilingError, match="quantization.bits.*hf backend"):
        fresh(tiny_gguf, quant=QuantizationConfig(bits=4))
    with pytest.raises(ZhilingError, match="GGUF file not found"):
        load_llamacpp_engine(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ZhilingError, match="holds none; export one"):
        load_llamacpp_engine(ModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ZhilingError, match="could not load"):
        load_llamacpp_engine(ModelConfig(name_or_path=str(tmp_path / "broken.gguf")))
    with pytest.raises(ZhilingError, match="not one"):
        load_llamacpp_engine(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B"))


# ----- generation ------------------------------------------------------------------------------------------------
def test_unsupported_parameters_are_refused(engine):
    for params in (GenerationConfig(num_beams=2), GenerationConfig(no_repeat_ngram_size=3)):
        with pytest.raises(ZhilingError, match="llama.cpp backend cannot honour"):
            engine.generate([ChatRequest("你好")], params)
        with pytest.raises(ZhilingError, match="cannot honour"):
            engine.stream(ChatRequest("你好"), params)


def test_greedy_is_deterministic_and_stream_matches_generate(engine, tiny_gguf):
    params = GenerationConfig(max_new_tokens=12)
    requests = [ChatRequest(p) for p in PROMPTS]
    first = engine.generate(requests, params)
    again = engine.generate(list(reversed(requests)), params)[::-1]  # other cache state, same answers
    other = fresh(tiny_gguf)
    assert [r.text for r in first] == [r.text for r in again] == [r.text for r in other.generate(requests, params)]
    other.close()
    for request, result in zip(requests, first):
        assert result.completion_tokens <= 12 and result.prompt_tokens == len(engine.prompt_ids(request))
        with engine.stream(request, params) as stream:
            assert "".join(stream) == result.text
        assert stream.result.text == result.text and stream.result.finish_reason == result.finish_reason


def test_stop_string_cuts_the_answer(engine):
    params = GenerationConfig(max_new_tokens=12)
    full = engine.generate([ChatRequest(PROMPTS[0])], params)[0]
    assert full.finish_reason == "length" and len(full.text) >= 4
    stop = full.text[2:4]
    cut = engine.generate([ChatRequest(PROMPTS[0])], GenerationConfig(max_new_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert cut.completion_tokens < full.completion_tokens
    with engine.stream(ChatRequest(PROMPTS[0]), GenerationConfig(max_new_tokens=12, stop=[stop])) as stream:
        assert "".join(stream) == cut.text and stop not in cut.text


def test_seeded_sampling_is_reproducible(engine):
    params = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    request = [ChatRequest(PROMPTS[2])]
    a, b = engine.generate(request, params)[0], engine.generate(request, params)[0]
    assert a.text == b.text
    texts = {engine.generate(request, params.model_copy(update={"seed": s}))[0].text for s in range(5)}
    assert len(texts) > 1
    greedy = engine.generate(request, GenerationConfig(max_new_tokens=12))[0].text
    top1 = engine.generate(request, params.model_copy(update={"top_k": 1}))[0].text
    assert top1 == greedy


def test_repetition_penalty_changes_greedy_output(engine):
    request = [ChatRequest(PROMPTS[1])]
    plain = engine.generate(request, GenerationConfig(max_new_tokens=16))[0].text
    penalised = engine.generate(request, GenerationConfig(max_new_tokens=16, repetition_penalty=5.0))[0].text
    assert plain != penalised


def test_prompt_over_the_context_is_refused(engine):
    with pytest.raises(PromptTooLongError):
        engine.generate([ChatRequest("你好" * 300)], GenerationConfig(max_new_tokens=16))


def test_cancel_stops_a_stream_and_frees_the_engine(engine):
    params = GenerationConfig(max_new_tokens=40)
    stream = engine.stream(ChatRequest(PROMPTS[0]), params)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    cancel = threading.Event()
    cancel.set()
    assert engine.generate([ChatRequest(PROMPTS[0])], params, cancel=cancel)[0].completion_tokens == 0
    assert engine.generate([ChatRequest(PROMPTS[0])], GenerationConfig(max_new_tokens=3))[0].completion_tokens == 3


def test_threads_share_the_engine(engine):
    params = GenerationConfig(max_new_tokens=8)
    expected = [r.text for r in engine.generate([ChatRequest(p) for p in PROMPTS], params)]
    results = [None] * len(PROMPTS)

    def work(index):
        with engine.stream(ChatRequest(PROMPTS[index]), params) as stream:
            results[index] = "".join(stream)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


def test_greedy_tokens_match_transformers_on_the_same_weights(engine, tiny_gguf):
    """transformers de-serialises the same GGUF weights; greedy decoding must pick the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                 dtype=torch.float32).eval()
    params = GenerationConfig(max_new_tokens=16)
    for prompt in PROMPTS:
        ids = engine.prompt_ids(ChatRequest(prompt))
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
        ours = list(engine._stream_ids(ids, params, threading.Event()))
        assert ours == hf


# ----- sampling semantics against transformers' processors ---------------------------------------------------------
def _hf_scores(logits, params, seen, generated, stop_ids, prompt_length=5):
    import torch
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    input_ids = torch.tensor([list(seen) + [int(seen[0])] * generated])
    scores = torch.tensor(logits)[None, :]
    processors = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_new_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(input_ids.shape[1] - generated, params.min_new_tokens,
                                                            stop_ids))
    if params.do_sample:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("seed", range(5))
def test_penalty_min_new_tokens_and_warpers_match_transformers(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)
    seen = np.unique(rng.integers(0, 50, size=8))
    stop_ids = [2, 7]
    for params, generated in [(GenerationConfig(repetition_penalty=1.3), 3),
                              (GenerationConfig(min_new_tokens=4), 2),
                              (GenerationConfig(min_new_tokens=4), 4)]:
        ours = processed_scores(logits, params, seen, generated, stop_ids)
        hf = _hf_scores(logits, params, seen, generated, stop_ids)
        np.testing.assert_allclose(ours, hf, rtol=1e-6)
    for params in [GenerationConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8),
                   GenerationConfig(do_sample=True, temperature=1.3, top_k=0, top_p=0.5),
                   GenerationConfig(do_sample=True, temperature=1.0, top_k=5, top_p=1.0),
                   GenerationConfig(do_sample=True, temperature=0.5, top_k=0, top_p=1.0, repetition_penalty=1.2)]:
        scores = processed_scores(logits, params, seen, 0, stop_ids)
        ids, probs = sampling_distribution(scores, params)
        hf = _hf_scores(logits, params, seen, 0, stop_ids)
        hf_probs = np.exp(hf - hf.max())
        hf_probs /= hf_probs.sum()
        expected = np.zeros(50)
        expected[ids] = probs
        np.testing.assert_allclose(expected, hf_probs, atol=1e-6)
