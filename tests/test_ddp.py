"""Two-process DDP on CPU (gloo) through ``zhiling train --nproc 2``: the ranks stay in step, only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from train_support import tiny_config, write_data

REPO = Path(__file__).resolve().parents[1]

# Imported by every Python process started with this folder on PYTHONPATH (torchrun and its workers): records,
# per rank, the loss, a checksum of the trainable weights and the rows of every step, and who writes checkpoints.
SITECUSTOMIZE = """
import json, os
log_dir = os.environ.get("ZHILING_TEST_DDP_LOG")
if log_dir and "LOCAL_RANK" in os.environ:
    from zhiling.train import checkpoint, trainer
    rank = int(os.environ["RANK"])
    def write(record):
        with open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(dict(record, rank=rank)) + "\\n")
    original_step = trainer.Trainer._train_step
    def logged_step(self, group):
        loss, norm, tokens, labels = original_step(self, group)
        total = sum(float(p.detach().double().sum()) for p in self.trainable)
        write({"step": self.state.step + 1, "loss": loss, "checksum": total, "rows": sorted(sum(group, []))})
        return loss, norm, tokens, labels
    trainer.Trainer._train_step = logged_step
    original_write = checkpoint.write_checkpoint
    def logged_write(root, state, write_files, keep):
        write({"save": state.step})
        return original_write(root, state, write_files, keep)
    checkpoint.write_checkpoint = logged_write
"""


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_two_process_ddp_on_cpu(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", rows=40)
    out = tmp_path / "out"
    tree = tiny_config(tiny_model_dir("qwen2"), data, out, tmp_path,
                       training={"max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 2,
                                 "logging_steps": 1})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(REPO / "src")]),
               ZHILING_TEST_DDP_LOG=str(logs))
    done = subprocess.run([sys.executable, "-m", "zhiling", "train", str(config), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--nproc_per_node=2" in done.stderr

    rank0, rank1 = _records(logs / "rank0.jsonl"), _records(logs / "rank1.jsonl")
    steps0 = [r for r in rank0 if "step" in r]
    steps1 = [r for r in rank1 if "step" in r]
    assert [r["step"] for r in steps0] == [r["step"] for r in steps1] == [1, 2, 3, 4]
    for a, b in zip(steps0, steps1):
        assert a["loss"] == b["loss"]  # the step loss is reduced over both ranks
        assert abs(a["checksum"] - b["checksum"]) < 1e-9  # identical weights after every optimizer step
        assert not set(a["rows"]) & set(b["rows"])  # each rank trained on its own rows
    assert steps0[0]["checksum"] != steps0[-1]["checksum"]  # and the weights did change

    assert [r["save"] for r in rank0 if "save" in r] == [2]
    assert not [r for r in rank1 if "save" in r]  # only rank 0 writes checkpoints
    assert (out / "checkpoints" / "checkpoint-2" / "state.json").is_file()
    rng_states = __import__("torch").load(out / "checkpoints" / "checkpoint-2" / "rng.pt", weights_only=True)
    assert len(rng_states) == 2  # both ranks' RNG states, written by rank 0
    metrics = _records(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]  # one writer, no duplicate lines
    assert [m["loss"] for m in metrics if "loss" in m] == [r["loss"] for r in steps0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    record = json.loads((out / "zhiling.json").read_text())
    assert record["status"] == "finished"
