"""Every example config in examples/ loads, validates and plans (--dry-run) on a tiny model of the same architecture;
the DeepSpeed and FSDP files are checked and the multi-GPU launch command is built."""

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from train_support import write_data
from zhiling.cli import main
from zhiling.config import load_config
from zhiling.errors import ConfigError, ZhilingError
from zhiling.train.launch import load_distributed_config, torchrun_command
from zhiling.train.plan import plan

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# example -> (tiny family of the same architecture, extra overrides the tiny stand-in needs)
CASES = {
    "qwen2.5-7b-qlora-belle.yaml": ("qwen2", []),
    "llama3-8b-lora-alpaca-gpt4.yaml": ("llama", []),
    "glm4-9b-lora.yaml": ("glm", ["template.name=chatglm"]),  # the tiny tokenizer has no GLM-4 chat template
    "baichuan2-7b-qlora-ner.yaml": ("baichuan", []),
    "staged-firefly-coig-psyqa.yaml": ("llama", []),
    "deepspeed-2gpu.yaml": ("qwen2", []),
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "datasets.yaml") == sorted(CASES)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("examples") / "tiny.jsonl", rows=12)


def _overrides(name, family, extra, tiny_model_dir, tiny_data, tmp_path) -> list[str]:
    cfg = load_config(EXAMPLES / name)
    items = [f"model.name_or_path={tiny_model_dir(family)}", f"output.dir={tmp_path / 'out'}",
             f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", *extra]
    if cfg.stages:
        items += [f"stages={json.dumps(_tiny_stages(cfg, tiny_data))}"]
    else:
        items.append(f"data.datasets=[{tiny_data}]")
    if cfg.data.val_size >= 1:
        items.append("data.val_size=2")
    return items


def _tiny_stages(cfg, tiny_data) -> list[dict]:
    stages = []
    for stage in cfg.stages:
        data = dict(stage.data, datasets=[str(tiny_data)])
        if data.get("val_size", 0) >= 1:
            data["val_size"] = 2
        stages.append({"name": stage.name, "data": data, "training": stage.training})
    return stages


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_dry_run_on_a_tiny_model_of_the_same_architecture(name, tiny_model_dir, tiny_data, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # examples name their registry and DeepSpeed files relative to the repository root
    family, extra = CASES[name]
    example = load_config(EXAMPLES / name)
    overrides = _overrides(name, family, extra, tiny_model_dir, tiny_data, tmp_path)
    cfg = load_config(EXAMPLES / name, overrides)
    plans = plan(cfg)
    assert len(plans) == max(1, len(example.stages))
    for item in plans:
        assert item.trainable_params > 0 and item.tokens_per_epoch > 0 and item.total_steps > 0
        assert item.method == example.training.method
        assert item.memory["total"] > 0
        if example.training.method in ("lora", "dora", "rslora", "qlora"):
            wanted = example.lora.target_modules
            if wanted == "all-linear":
                assert len(item.target_modules) >= 4
            else:
                assert item.target_modules == wanted
    if example.training.distributed_config:
        assert plans[0].distributed.startswith("DeepSpeed ZeRO-2")
    assert main(["train", str(EXAMPLES / name), *overrides, "--dry-run"]) == 0
    assert "plan:" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_example_registry_and_formats_are_valid():
    from zhiling.data.registry import read_registry

    entries = read_registry(EXAMPLES / "datasets.yaml")
    used = set()
    for name in CASES:
        cfg = load_config(EXAMPLES / name)
        used |= set(cfg.data.datasets) if not cfg.stages else {d for s in cfg.stages for d in s.data["datasets"]}
    assert used <= set(entries) | {"zhiling_zh"}


def test_deepspeed_and_fsdp_files_validate():
    training = load_config(EXAMPLES / "deepspeed-2gpu.yaml").training
    zero2 = load_distributed_config(EXAMPLES / "deepspeed" / "zero2.json", training)
    assert zero2.kind == "deepspeed" and "ZeRO-2" in zero2.describe()
    zero3 = load_distributed_config(EXAMPLES / "deepspeed" / "zero3.json", training)
    assert "ZeRO-3" in zero3.describe()
    fsdp = load_distributed_config(EXAMPLES / "deepspeed" / "fsdp.yaml", training)
    assert fsdp.kind == "fsdp" and fsdp.num_processes == 2
    assert fsdp.plugin_kwargs["transformer_cls_names_to_wrap"] == ["Qwen2DecoderLayer"]


@pytest.mark.parametrize("content, message", [
    ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu is 16 but training.per_device_batch_size"),
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps is 3"),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "cannot both be enabled"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_deepspeed_files(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        load_distributed_config(path, load_config(EXAMPLES / "deepspeed-2gpu.yaml").training)


def test_bad_accelerate_files(tmp_path):
    training = load_config(EXAMPLES / "deepspeed-2gpu.yaml").training
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategi: FULL_SHARD\n")
    with pytest.raises(ConfigError, match=r"unknown key 'fsdp_config.fsdp_sharding_strategi'; did you mean "
                                          r"'fsdp_sharding_strategy'"):
        load_distributed_config(path, training)
    path.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: HALF_SHARD\n")
    with pytest.raises(ConfigError, match="HALF_SHARD"):
        load_distributed_config(path, training)
    path.write_text("distributed_type: MEGA\n")
    with pytest.raises(ConfigError, match="distributed_type must be"):
        load_distributed_config(path, training)
    path.write_text("{broken: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_distributed_config(path, training)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"zero_optimization": {"stage": 2},\n}')
    with pytest.raises(ConfigError, match=r"broken.json, line 2: not valid JSON"):
        load_distributed_config(bad_json, training)
    path.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {bad_json.name}\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_distributed_config(path, training)


def test_launch_commands():
    single = torchrun_command("c.yaml", ["training.max_steps=5"], 2)
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "zhiling",
                          "train", "c.yaml", "training.max_steps=5"]
    multi = torchrun_command("c.yaml", [], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600)
    assert "--nnodes=2" in multi and "--node_rank=1" in multi and "--master_addr=10.0.0.1" in multi
    assert "--master_port=29600" in multi and "--standalone" not in multi
    with pytest.raises(ZhilingError, match="needs --master-addr"):
        torchrun_command("c.yaml", [], 8, nnodes=2)
    with pytest.raises(ZhilingError, match="--node-rank must be between 0 and 1"):
        torchrun_command("c.yaml", [], 8, nnodes=2, node_rank=2, master_addr="h")


def test_deepspeed_example_launch_command_and_clear_error_without_gpus(tmp_path, monkeypatch, capsys,
                                                                       tiny_model_dir, tiny_data):
    monkeypatch.chdir(REPO)
    config = "examples/deepspeed-2gpu.yaml"
    assert main(["train", config, "--nproc", "2", "--print-command"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert command[-3:] == ["zhiling", "train", config]
    overrides = [f"model.name_or_path={tiny_model_dir('qwen2')}", f"data.datasets=[{tiny_data}]",
                 f"output.dir={tmp_path / 'out'}"]
    assert main(["train", config, *overrides, "--nproc", "2", "--dry-run"]) == 0  # plans, launches nothing
    printed = capsys.readouterr().out
    assert "2 processes" in printed and "would launch:" in printed and "--nproc_per_node=2" in printed
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        assert main(["train", config, *overrides]) == 1
        assert "needs CUDA GPUs" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_examples_are_plain_yaml_with_comments_on_how_to_run():
    for name in CASES:
        text = (EXAMPLES / name).read_text(encoding="utf-8")
        assert "zhiling train examples/" in text
        assert isinstance(yaml.safe_load(text), dict)
