"""Every training method on tiny random models of every family: the loss falls, the result loads, and the right
parameters (and only those) change. Target modules are found for each family."""

import json

import pytest
import torch

from train_support import tiny_config, write_data
from zhiling.config import ZhilingConfig
from zhiling.config.loader import build_config
from zhiling.errors import ConfigError, ZhilingError
from zhiling.train.methods import linear_layer_names, method_quantization, prepare_model, resolve_target_modules
from zhiling.train.run import train

FAMILIES = ["llama", "qwen2", "gemma3", "bloom", "glm", "baichuan"]
ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj"], "glm": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "bloom": ["query_key_value", "dense"], "baichuan": ["W_pack", "o_proj"]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("methods") / "data.jsonl", rows=8)


def _run(model_dir, data_file, out, tmp, family="llama", **sections):
    sections.setdefault("training", {})
    sections["training"] = {"max_steps": 8, "learning_rate": 2e-2, "packing_tokens": 256, "per_device_batch_size": 4,
                            **sections["training"]}
    if family == "baichuan":
        sections.setdefault("model", {})["trust_remote_code"] = True
    result = train(build_config(tiny_config(model_dir, data_file, out, tmp, **sections)), show_progress=False,
                   summary=False, announce=lambda message: None)
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    return result, losses


def _falls(losses: list[float]) -> bool:
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.02


def _load_model(model_dir, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=family == "baichuan")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loss_falls_on_every_family_and_the_adapter_loads_with_plain_peft(family, tiny_model_dir, data_file,
                                                                             tmp_path):
    from peft import PeftModel

    model_dir = tiny_model_dir(family)
    result, losses = _run(model_dir, data_file, tmp_path / "out", tmp_path, family)
    assert _falls(losses), losses
    adapter = tmp_path / "out" / "adapter"
    assert result.final_dir == adapter and result.is_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ATTENTION[family])
    assert (adapter / "zhiling_template.json").is_file() and (adapter / "chat_template.jinja").is_file()
    peft_model = PeftModel.from_pretrained(_load_model(model_dir, family), str(adapter))
    trained = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # lora_B starts at zero: these were trained


@pytest.mark.parametrize("method, family", [("dora", "qwen2"), ("rslora", "gemma3"), ("dora", "baichuan"),
                                            ("qlora", "llama"), ("qlora", "baichuan")])
def test_adapter_methods_train(method, family, tiny_model_dir, data_file, tmp_path):
    result, losses = _run(tiny_model_dir(family), data_file, tmp_path / "out", tmp_path, family,
                          training={"method": method})
    assert _falls(losses), losses
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    assert config["use_rslora"] is (method == "rslora")
    if method == "qlora":
        record = json.loads((tmp_path / "out" / "zhiling.json").read_text())
        assert record["config"]["training"]["method"] == "qlora"


def test_lora_on_an_8bit_base(tiny_model_dir, data_file, tmp_path):
    result, losses = _run(tiny_model_dir("llama"), data_file, tmp_path / "out", tmp_path,
                          quantization={"bits": 8})
    assert _falls(losses), losses
    assert result.is_adapter


def test_qlora_keeps_gradients_flowing_after_an_eval_pass(tiny_model_dir, data_file, tmp_path):
    """bitsandbytes repacks 4-bit weights for inference after an eval-mode pass on CPU, which silently cuts the
    gradient through every 4-bit layer; a run with validation must still train the lowest layer's adapter."""
    out = tmp_path / "out"
    _run(tiny_model_dir("llama"), data_file, out, tmp_path, training={"method": "qlora", "eval_steps": 2},
         data={"val_size": 2})
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    first_layer_b = [v for k, v in weights.items() if "layers.0." in k and "lora_B" in k]
    assert first_layer_b and all(v.abs().sum() > 0 for v in first_layer_b)  # lora_B starts at zero


@pytest.mark.parametrize("family", ["glm", "bloom", "baichuan"])
def test_full_fine_tuning(family, tiny_model_dir, data_file, tmp_path):
    result, losses = _run(tiny_model_dir(family), data_file, tmp_path / "out", tmp_path, family,
                          training={"method": "full", "learning_rate": 3e-3})
    assert _falls(losses), losses
    assert result.final_dir.name == "model" and not result.is_adapter
    trained = _load_model(result.final_dir, family)
    base = _load_model(tiny_model_dir(family), family)
    changed = [n for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > len(list(base.parameters())) // 2
    assert result.chat_command == f"zhiling chat --model {result.final_dir}"


def test_freeze_trains_only_the_last_layers(tiny_model_dir, data_file, tmp_path):
    result, losses = _run(tiny_model_dir("qwen2"), data_file, tmp_path / "out", tmp_path,
                          training={"method": "freeze", "freeze_trainable_layers": 1, "learning_rate": 3e-3})
    assert _falls(losses), losses
    trained = _load_model(result.final_dir, "qwen2")
    base = _load_model(tiny_model_dir("qwen2"), "qwen2")
    changed = {n for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters())
               if not torch.equal(a, b)}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)


# ----- target modules and method checks (no training) ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_target_modules_per_family(family, tiny_model_dir):
    model = _load_model(tiny_model_dir(family), family)
    cfg = ZhilingConfig()
    assert resolve_target_modules(model, cfg.lora) == ATTENTION[family]
    every = resolve_target_modules(model, cfg.lora.model_copy(update={"target_modules": "all-linear"}))
    assert "lm_head" not in every and set(ATTENTION[family]) <= set(every)
    assert every == linear_layer_names(model)
    with pytest.raises(ConfigError, match=r"no linear layer named 'nope'.*its linear layers are"):
        resolve_target_modules(model, cfg.lora.model_copy(update={"target_modules": [ATTENTION[family][0], "nope"]}))


def test_baichuan_fused_projection_gets_one_adapter(tiny_model_dir):
    model = _load_model(tiny_model_dir("baichuan"), "baichuan")
    prepared = prepare_model(model, ZhilingConfig(), quantized=False)
    names = [n for n, _ in prepared.model.named_parameters() if "lora_A" in n]
    assert any(".W_pack.lora_A." in n for n in names) and not any("q_proj" in n for n in names)
    assert prepared.trainable_params == sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)


def test_method_and_quantization_conflicts_are_refused():
    qlora8 = build_config({"training": {"method": "qlora"}, "quantization": {"bits": 8}})
    with pytest.raises(ConfigError, match="qlora trains on a 4-bit base"):
        method_quantization(qlora8)
    full4 = build_config({"training": {"method": "full"}, "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match="cannot be trained in 4 bits"):
        method_quantization(full4)
    assert method_quantization(build_config({"training": {"method": "qlora"}})).bits == 4
    assert method_quantization(build_config({})) is None


def test_freeze_more_layers_than_the_model_has(tiny_model_dir):
    model = _load_model(tiny_model_dir("llama"), "llama")
    cfg = build_config({"training": {"method": "freeze", "freeze_trainable_layers": 5}})
    with pytest.raises(ConfigError, match="only 2 layers"):
        prepare_model(model, cfg, quantized=False)


def test_init_adapter_must_be_used_with_an_adapter_method(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ZhilingError, match="use an adapter method"):
        _run(tiny_model_dir("llama"), data_file, tmp_path / "out", tmp_path,
             training={"method": "full", "init_adapter": str(tmp_path)})
