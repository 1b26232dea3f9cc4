"""Shared pieces of the training tests: a small canonical data file and a config for a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    ("判断这条评论的情感倾向：这部电影真好看，我很喜欢。", "积极"),
    ("判断这条评论的情感倾向：服务太差了，再也不来了。", "消极"),
    ("请找出句子中的实体：张三在北京大学读书。", "张三_人名\n北京大学_机构名"),
    ("把句子改写成疑问句：他去了上海。", "他去了上海吗？"),
    ("请列出三种水果。", "苹果、香蕉、橙子"),
    ("你好", "你好，世界！今天天气很好。"),
    ("Say hello.", "hello world, how are you? I am fine, thank you."),
    ("写一句诗。", "春眠不觉晓，处处闻啼鸟。"),
]


def write_data(path: Path, rows: int = 32) -> Path:
    """``rows`` canonical records cycling through a few question / answer pairs (numbered so none repeat)."""
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            question, answer = QUESTIONS[index % len(QUESTIONS)]
            record = {"id": f"t-{index}", "system": "", "source": "test",
                      "messages": [{"role": "user", "content": f"{question} {index}"},
                                   {"role": "assistant", "content": answer}]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def tiny_config(model_dir: Path, data_file: Path, out: Path, tmp: Path, **sections) -> dict:
    """A config tree for a few fast steps on a tiny model (sections override / extend the defaults)."""
    tree = {
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "data": {"datasets": [str(data_file)], "cutoff_len": 64, "cache_dir": str(tmp / "tok-cache")},
        "template": {"name": "alpaca_zh"},
        "training": {"method": "lora", "learning_rate": 5e-3, "per_device_batch_size": 4, "max_steps": 6,
                     "logging_steps": 1, "save_steps": 100, "seed": 7, "lr_scheduler": "constant"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return tree


def metric_rows(out: Path) -> list[tuple]:
    """(step, loss, eval_loss, lr, grad_norm) of every line of OUTPUT/metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row.get("loss"), row.get("eval_loss"), row.get("lr"), row.get("grad_norm")) for row in rows]


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(out: Path, reference: Path) -> None:
    """Per-step losses (and lr, grad norm, eval loss) and the adapter bit for bit as in ``reference``."""
    assert metric_rows(out) == metric_rows(reference)
    got, want = adapter_tensors(out), adapter_tensors(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), name


def interrupt_after_checkpoint(tree: dict, count: int = 1) -> None:
    """Train in-process and stop (as a kill would, without a final save) right after the ``count``-th checkpoint."""
    import pytest

    from zhiling.config.loader import build_config
    from zhiling.train import trainer
    from zhiling.train.run import train

    original = trainer.Trainer._save_checkpoint
    saves = []

    def save_then_stop(self):
        original(self)
        saves.append(self.state.step)
        if len(saves) == count:
            raise SystemExit("stopped after a checkpoint")

    trainer.Trainer._save_checkpoint = save_then_stop
    try:
        with pytest.raises(SystemExit):
            train(build_config(tree), show_progress=False, summary=False)
    finally:
        trainer.Trainer._save_checkpoint = original
