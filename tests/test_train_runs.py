"""Whole runs: outputs and the run record, warm start from an adapter, staged runs that skip finished stages,
validation loss, and the dry-run plan."""

import json

import pytest
import torch

from train_support import tiny_config, write_data
from zhiling.cli import main
from zhiling.config.loader import build_config
from zhiling.train import trainer as trainer_module
from zhiling.train.run import train


def _train(tree):
    return train(build_config(tree), show_progress=False, summary=False, announce=lambda message: None)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def data_file(tmp_path):
    return write_data(tmp_path / "data.jsonl", rows=12)


def test_outputs_of_a_run(tmp_path, tiny_model_dir, data_file):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    result = _train(tiny_config(tiny_model_dir("qwen2"), data_file, out, tmp_path, data={"val_size": 0.25},
                                training={"max_steps": 6, "eval_steps": 3, "save_steps": 4, "logging_steps": 2}))
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl",
                                                     "zhiling.json"]
    metrics = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [3, 6]
    assert {"lr", "grad_norm", "tokens_per_s", "tokens", "epoch"} <= set(metrics[0])
    record = json.loads((out / "zhiling.json").read_text())
    assert record["status"] == "finished" and record["final"] == "adapter"
    assert record["data"]["train_rows"] == 9 and record["data"]["eval_rows"] == 3
    assert record["data"]["train"][0]["files"][0]["sha256"]
    assert record["template"]["name"] == "alpaca_zh"
    assert {"torch", "transformers", "peft"} <= set(record["versions"])
    assert record["metrics"]["best_eval_loss"] == result.best_eval_loss == min(
        m["eval_loss"] for m in metrics if "eval_loss" in m)
    assert result.chat_command == f"zhiling chat --model {tiny_model_dir('qwen2')} --adapter {out / 'adapter'}"
    tokenizer = AutoTokenizer.from_pretrained(str(out / "adapter"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "### 指令：\n你好" in prompt and prompt.endswith("### 回答：\n")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]


def test_init_adapter_continues_the_adapter_with_a_fresh_optimizer(tmp_path, tiny_model_dir, data_file):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    _train(tiny_config(tiny_model_dir("llama"), data_file, first, tmp_path, training={"max_steps": 6}))
    second = tmp_path / "second"
    _train(tiny_config(tiny_model_dir("llama"), data_file, second, tmp_path, lora={"rank": 16},
                       training={"max_steps": 4, "save_steps": 2, "init_adapter": str(first / "adapter")}))
    config = json.loads((second / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the adapter's own shape, not lora.rank
    first_losses = [m["loss"] for m in _rows(first / "metrics.jsonl")]
    second_losses = [m["loss"] for m in _rows(second / "metrics.jsonl")]
    assert second_losses[0] < first_losses[0]  # it starts from the trained adapter
    optimizer = torch.load(second / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {2.0}  # fresh: 2 steps, not 6 + 2
    a, b = load_file(str(first / "adapter" / "adapter_model.safetensors")), \
        load_file(str(second / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_stages_chain_and_a_rerun_skips_finished_stages(tmp_path, tiny_model_dir, monkeypatch):
    first_data = write_data(tmp_path / "firefly.jsonl", rows=8)
    second_data = write_data(tmp_path / "coig.jsonl", rows=10)
    out = tmp_path / "staged"
    tree = tiny_config(tiny_model_dir("gemma3"), first_data, out, tmp_path, training={"max_steps": 2})
    tree["stages"] = [{"name": "firefly", "training": {"max_steps": 3}},
                      {"name": "coig", "data": {"datasets": [str(second_data)]},
                       "training": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}}]
    original_save = trainer_module.Trainer._save_checkpoint

    def stop_after_save(self):
        original_save(self)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C in stage 2, after its first checkpoint

    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", stop_after_save)
    with pytest.raises(KeyboardInterrupt):
        _train(tree)
    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", original_save)
    assert (out / "firefly" / "adapter").is_dir() and not (out / "coig" / "adapter").exists()

    result = _train(tree)  # stage 1 is skipped, stage 2 resumes from its checkpoint
    assert [stage.skipped for stage in result.stages] == [True, False]
    assert result.stages[1].resumed_from.endswith("checkpoint-2")
    assert result.final_dir == out / "coig" / "adapter"
    coig = json.loads((out / "coig" / "zhiling.json").read_text())
    assert coig["config"]["training"]["init_adapter"] == str(out / "firefly" / "adapter")
    assert coig["config"]["training"]["max_steps"] == 4 and coig["config"]["training"]["learning_rate"] == 1e-3
    assert coig["data"]["train_rows"] == 10
    firefly = json.loads((out / "firefly" / "zhiling.json").read_text())
    assert firefly["config"]["training"]["max_steps"] == 3 and firefly["data"]["train_rows"] == 8
    staged = json.loads((out / "zhiling.json").read_text())
    assert staged["status"] == "finished" and [s["name"] for s in staged["stages"]] == ["firefly", "coig"]

    def refuse(self, group):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", refuse)
    again = _train(tree)
    assert [stage.skipped for stage in again.stages] == [True, True]


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, tiny_model_dir, data_file, capsys, monkeypatch):
    import yaml

    def refuse(self, group):
        raise AssertionError("--dry-run trained")

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", refuse)
    out = tmp_path / "out"
    tree = tiny_config(tiny_model_dir("baichuan"), data_file, out, tmp_path, model={"trust_remote_code": True},
                       training={"method": "qlora", "num_epochs": 2, "max_steps": -1}, data={"val_size": 2})
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(config), "training.gradient_accumulation_steps=2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "gradient_accumulation_steps: 2" in printed  # the resolved config
    assert "qlora on W_pack, o_proj" in printed
    assert "trainable parameters" in printed and "tokens per epoch" in printed and "memory: total" in printed
    assert "10 rows for training, 2 for eval" in printed
    assert not out.exists()


def test_dry_run_of_stages(tmp_path, tiny_model_dir, data_file, capsys):
    import yaml

    tree = tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "out", tmp_path)
    tree["stages"] = [{"name": "one"}, {"name": "two", "training": {"max_steps": 9}}]
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "plan: one" in printed and "plan: two" in printed and "9 (" in printed


def test_eval_datasets_gradient_checkpointing_and_no_clipping(tmp_path, tiny_model_dir, data_file):
    held = write_data(tmp_path / "held.jsonl", rows=5)
    out = tmp_path / "out"
    result = _train(tiny_config(tiny_model_dir("llama"), data_file, out, tmp_path,
                                data={"eval_datasets": [str(held)]},
                                training={"max_steps": 4, "eval_steps": 2, "gradient_checkpointing": True,
                                          "max_grad_norm": 0, "gradient_accumulation_steps": 2}))
    metrics = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)
    record = json.loads((out / "zhiling.json").read_text())
    assert record["data"]["eval_rows"] == 5 and record["data"]["train_rows"] == 12
    assert result.final_eval_loss == [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]


def test_report_to_a_tracker_that_is_not_installed(tmp_path, tiny_model_dir, data_file, monkeypatch):
    import importlib.util

    from zhiling.errors import ZhilingError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ZhilingError, match="report_to includes wandb, which is not installed: pip install wandb"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "out", tmp_path,
                           training={"report_to": ["wandb"]}))
    assert not (tmp_path / "out").exists()
