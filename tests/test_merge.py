"""``zhiling merge``: merged weights equal base + adapter, the folder loads with plain transformers and carries the
training template; QLoRA adapters merge into the full-precision base; wrong bases and bad arguments are refused."""

import json

import pytest
import torch

from zhiling.config import ModelConfig
from zhiling.data.templates import TEMPLATES, recorded_template, save_template_record
from zhiling.errors import ZhilingError
from zhiling.export.merge import merge_adapter, parse_size, write_model_folder

PROMPT = "请找出句子中的实体：张三在北京大学读书。"


def make_adapter(base_dir, out_dir, template="chatml", quantized=False, seed=1):
    """A random LoRA adapter with non-zero B (so merging changes the logits), with its template recorded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.float32),
                      device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
    if quantized:
        assert any(type(module).__name__ == "Linear4bit" for module in base.modules())
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(out_dir))
    if template:
        save_template_record(TEMPLATES[template], out_dir)
    return out_dir


def reference_logits(base_dir, adapter_dir, tokenizer):
    """Logits of the unquantized base with the adapter applied unmerged (what the merge must reproduce)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        return model(ids).logits, base


def merged_logits(folder, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(PROMPT)])).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_merged_logits_equal_base_plus_adapter(family, tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    base_dir = tiny_model_dir(family)
    adapter = make_adapter(base_dir, tmp_path / "adapter", template="chatml")
    expected, _ = reference_logits(base_dir, adapter, tiny_tokenizer)

    result = merge_adapter(ModelConfig(name_or_path=str(base_dir)), adapter, tmp_path / "merged")
    got = merged_logits(result.folder, tiny_tokenizer)
    assert (got - expected).abs().max().item() < 1e-5
    from transformers import AutoModelForCausalLM

    base_logits = AutoModelForCausalLM.from_pretrained(str(base_dir))(torch.tensor([tiny_tokenizer.encode(PROMPT)]))
    assert (got - base_logits.logits).abs().max().item() > 1e-3  # the adapter really changed the model

    folder = result.folder
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template == TEMPLATES["chatml"].to_jinja()
    assert recorded_template(folder) == TEMPLATES["chatml"]
    generation = json.loads((folder / "generation_config.json").read_text())
    stop_ids = TEMPLATES["chatml"].stop_token_ids(tokenizer)
    assert generation["eos_token_id"] in (stop_ids, stop_ids[0])
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids
    record = json.loads((folder / "zhiling_merge.json").read_text())
    assert record["adapter"] == str(adapter) and record["template"] == "chatml"
    assert not any(p.name.startswith("merged.tmp") for p in tmp_path.iterdir())
    # the chat template renders what training encoded
    messages = [{"role": "user", "content": PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == TEMPLATES["chatml"].render_text(tokenizer, None, [(PROMPT, None)])


def test_merge_writes_shards_and_output_dtype(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model_dir("llama")
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    result = merge_adapter(ModelConfig(name_or_path=str(base_dir)), adapter, tmp_path / "merged",
                           shard_size="40KB", dtype="bfloat16")
    shards = sorted(result.folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (result.folder / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(result.folder))
    assert result.dtype == "bfloat16" and model.dtype == torch.bfloat16
    expected, _ = reference_logits(base_dir, adapter, tiny_tokenizer)
    got = merged_logits(result.folder, tiny_tokenizer)
    assert (got - expected).abs().max().item() < 0.1  # bf16 rounding of the weights only


def test_qlora_adapter_merges_into_full_precision_base(tiny_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    base_dir = tiny_model_dir("llama")
    adapter = make_adapter(base_dir, tmp_path / "qlora", quantized=True)
    expected, _ = reference_logits(base_dir, adapter, tiny_tokenizer)
    result = merge_adapter(ModelConfig(name_or_path=str(base_dir)), adapter, tmp_path / "merged")
    config = json.loads((result.folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any("absmax" in key or "quant_state" in key for key in _weight_names(result.folder))
    got = merged_logits(result.folder, tiny_tokenizer)
    assert (got - expected).abs().max().item() < 1e-5


def _weight_names(folder):
    from safetensors import safe_open

    names = []
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names += list(handle.keys())
    return names


def test_adapter_from_a_different_base_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny import make_config, make_tokenizer

    adapter = make_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    wider = tmp_path / "wider"
    AutoModelForCausalLM.from_config(make_config("llama", len(make_tokenizer()), hidden=48)).save_pretrained(wider)
    make_tokenizer(wider)
    with pytest.raises(ZhilingError, match="does not fit this model.*different base model"):
        merge_adapter(ModelConfig(name_or_path=str(wider)), adapter, tmp_path / "merged")
    with pytest.raises(ZhilingError, match="has no module"):
        merge_adapter(ModelConfig(name_or_path=str(tiny_model_dir("bloom"))), adapter, tmp_path / "merged2")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged2").exists()


def test_argument_errors(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    cfg = ModelConfig(name_or_path=str(base_dir))
    with pytest.raises(ZhilingError, match="adapter: folder not found"):
        merge_adapter(cfg, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ZhilingError, match="looks like a merged model"):
        merge_adapter(cfg, base_dir, tmp_path / "out")
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ZhilingError, match="was not written by zhiling.*even with --overwrite"):
        merge_adapter(cfg, adapter, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ZhilingError, match="dtype: 'int8'"):
        merge_adapter(cfg, adapter, tmp_path / "out", dtype="int8")
    with pytest.raises(ZhilingError, match="shard size: '2 gigs'"):
        merge_adapter(cfg, adapter, tmp_path / "out", shard_size="2 gigs")
    with pytest.raises(ZhilingError, match="unknown template 'chatmll'.*chatml"):
        merge_adapter(cfg, adapter, tmp_path / "out", template="chatmll")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(1024) == 1024
    for bad in ("", "GB", "-1GB", "2 parsecs", "0"):
        with pytest.raises(ZhilingError, match="shard size"):
            parse_size(bad)


def test_base_without_adapter_gets_the_template(tiny_model_dir, tiny_tokenizer, tmp_path):
    """``export --format hf`` with no adapter: the base written out with the chosen template as chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model_dir("qwen2")
    result = write_model_folder(ModelConfig(name_or_path=str(base_dir)), tmp_path / "out", template="alpaca_zh")
    assert AutoTokenizer.from_pretrained(str(result.folder)).chat_template == TEMPLATES["alpaca_zh"].to_jinja()
    ids = torch.tensor([tiny_tokenizer.encode(PROMPT)])
    before = AutoModelForCausalLM.from_pretrained(str(base_dir))(ids).logits
    after = AutoModelForCausalLM.from_pretrained(str(result.folder))(ids).logits
    assert torch.equal(before, after)
