"""The one model loader: sources, device/dtype choice, tokenizer pad token, adapters and their base-model check."""

import pytest
import torch

from zhiling.config import ModelConfig, QuantizationConfig
from zhiling.errors import ZhilingError
from zhiling.models import load_model, load_tokenizer, model_type_of, resolve_device, resolve_dtype, resolve_source
from zhiling.models.loader import bnb_config


def test_folder_source_and_model_type(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    source = resolve_source(ModelConfig(name_or_path=str(path)))
    assert source.kind == "folder" and source.path == str(path)
    assert model_type_of(source) == "qwen2"


def test_hub_id_is_left_to_transformers():
    source = resolve_source(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B"))
    assert source.kind == "hub" and source.path == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", "folder not found"),
    ("/tmp/definitely-missing-zhiling.gguf", "GGUF file not found"),
])
def test_missing_sources(name, message):
    with pytest.raises(ZhilingError, match=message):
        resolve_source(ModelConfig(name_or_path=name))


def test_adapter_folder_given_as_model_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ZhilingError, match="looks like a LoRA adapter"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path)))


def test_device_and_dtype_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        assert resolve_dtype("auto", "cpu") is torch.float32
        with pytest.raises(ZhilingError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_tokenizer_gets_a_pad_token(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_model_dir("llama") / "config.json").read_text())
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token


def test_quantization_config_only_when_asked():
    assert bnb_config(None, "cpu") is None
    assert bnb_config(QuantizationConfig(), "cpu") is None
    four = bnb_config(QuantizationConfig(bits=4, quant_type="fp4", double_quant=False), "cpu")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert bnb_config(QuantizationConfig(bits=8), "cpu").load_in_8bit


def _save_adapter(model, path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(path))


def test_adapter_loads_and_wrong_base_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny import make_config, make_tokenizer

    llama = tiny_model_dir("llama")
    _save_adapter(AutoModelForCausalLM.from_pretrained(str(llama)), tmp_path / "adapter")
    model = load_model(ModelConfig(name_or_path=str(llama)), adapter=str(tmp_path / "adapter"))
    from peft import PeftModel

    assert isinstance(model, PeftModel)

    wider = tmp_path / "wider"
    AutoModelForCausalLM.from_config(make_config("llama", len(make_tokenizer()), hidden=48)).save_pretrained(wider)
    make_tokenizer(wider)
    with pytest.raises(ZhilingError, match="does not fit this model.*different base model"):
        load_model(ModelConfig(name_or_path=str(wider)), adapter=str(tmp_path / "adapter"))
    with pytest.raises(ZhilingError, match="has no module"):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir("bloom"))), adapter=str(tmp_path / "adapter"))
    with pytest.raises(ZhilingError, match="no adapter_config.json"):
        load_model(ModelConfig(name_or_path=str(llama)), adapter=str(tmp_path))
