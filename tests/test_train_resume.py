"""Exact resume: a run killed with SIGKILL (mid-run, and once in the middle of writing a checkpoint) and started
again ends with the same adapter and the same per-step losses as a run that was never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_support import tiny_config, write_data
from zhiling.config.loader import build_config
from zhiling.errors import ZhilingError
from zhiling.train.checkpoint import list_checkpoints
from zhiling.train.trainer import train

# Runs ``zhiling train`` with each step slowed down (so the test can kill it at a known point) and, with
# SAVE_MARKER set, a checkpoint save that stops just before its rename (so the kill lands inside the save).
RUNNER = """
import os, sys, time
from zhiling.train import checkpoint, trainer
step_delay = float(os.environ.get("STEP_DELAY", "0"))
original_step = trainer.Trainer._train_step
def slow_step(self, group):
    result = original_step(self, group)
    time.sleep(step_delay)
    return result
trainer.Trainer._train_step = slow_step
marker = os.environ.get("SAVE_MARKER")
if marker:
    original_fsync = checkpoint._fsync_tree
    def stuck_save(folder):
        original_fsync(folder)
        if folder.name.startswith("checkpoint-6"):
            open(marker, "w").close()
            time.sleep(600)
    checkpoint._fsync_tree = stuck_save
from zhiling.cli import main
sys.exit(main(sys.argv[1:]))
"""

REPO = Path(__file__).resolve().parents[1]


def _config_tree(model_dir, data, out, tmp):
    return tiny_config(model_dir, data, out, tmp,
                       data={"val_size": 4},
                       training={"max_steps": 14, "save_steps": 3, "gradient_accumulation_steps": 2,
                                 "per_device_batch_size": 3, "packing": False, "eval_steps": 5,
                                 "lr_scheduler": "cosine", "warmup_steps": 2},
                       lora={"dropout": 0.2})


def _write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def _losses(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row.get("loss"), row.get("eval_loss"), row.get("lr"), row.get("grad_norm")) for row in rows]


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _start(config: Path, env_extra: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **env_extra)
    return subprocess.Popen([sys.executable, "-c", RUNNER, "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended before the kill point:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not reach the kill point")
        time.sleep(0.05)


def _metric_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_data(tmp / "data.jsonl", rows=24)
    model = tiny_model_dir("llama")
    reference = tmp / "reference"
    train(build_config(_config_tree(model, data, reference, tmp)), show_progress=False, summary=False)
    return tmp, data, model, reference


def _assert_same_run(out: Path, reference: Path) -> None:
    assert _losses(out) == _losses(reference)
    got, want = _adapter(out), _adapter(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), name


def test_kill_mid_run_then_resume_matches_uninterrupted_run(setup):
    tmp, data, model, reference = setup
    out = tmp / "killed"
    config = _write_yaml(tmp / "killed.yaml", _config_tree(model, data, out, tmp))
    process = _start(config, {"STEP_DELAY": "0.4"})
    _wait_for(lambda: _metric_steps(out) >= 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [step for step, _ in list_checkpoints(out / "checkpoints")][-1] >= 6
    assert not (out / "adapter").exists()
    result = train(build_config(_config_tree(model, data, out, tmp)), show_progress=False, summary=False)
    assert result.resumed_from is not None
    _assert_same_run(out, reference)


def test_kill_during_checkpoint_save_leaves_no_complete_looking_checkpoint(setup):
    tmp, data, model, reference = setup
    out = tmp / "killed-in-save"
    marker = tmp / "saving"
    config = _write_yaml(tmp / "killed-in-save.yaml", _config_tree(model, data, out, tmp))
    process = _start(config, {"SAVE_MARKER": str(marker)})
    _wait_for(marker.exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(name.startswith("checkpoint-6.tmp-") for name in leftovers)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [3]  # the half-written one is not found
    result = train(build_config(_config_tree(model, data, out, tmp)), show_progress=False, summary=False)
    assert result.resumed_from.endswith("checkpoint-3")
    assert not any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    _assert_same_run(out, reference)


def test_resume_refuses_changed_batch_size_and_data(setup, tmp_path):
    tmp, data, model, _ = setup
    out = tmp_path / "run"
    tree = _config_tree(model, data, out, tmp)
    tree["training"]["max_steps"] = 4
    tree["training"]["save_steps"] = 2
    with pytest.raises(SystemExit):
        _interrupt_after_checkpoint(tree)
    changed = json.loads(json.dumps(tree))
    changed["training"]["per_device_batch_size"] = 2
    with pytest.raises(ZhilingError, match=r"per_device_batch_size changed from 3 to 2"):
        train(build_config(changed), show_progress=False, summary=False)
    other_data = write_data(tmp_path / "other.jsonl", rows=30)
    changed = json.loads(json.dumps(tree))
    changed["data"]["datasets"] = [str(other_data)]
    with pytest.raises(ZhilingError, match=r"the training data changed"):
        train(build_config(changed), show_progress=False, summary=False)
    changed = json.loads(json.dumps(tree))
    changed["training"]["gradient_accumulation_steps"] = 1
    with pytest.raises(ZhilingError, match=r"gradient_accumulation_steps changed from 2 to 1"):
        train(build_config(changed), show_progress=False, summary=False)
    fresh = json.loads(json.dumps(tree))
    fresh["training"]["per_device_batch_size"] = 2
    fresh["training"]["resume"] = False
    result = train(build_config(fresh), show_progress=False, summary=False)
    assert result.resumed_from is None and result.steps == 4


def _interrupt_after_checkpoint(tree: dict) -> None:
    """Train in-process and stop (as a kill would) right after the first checkpoint is written."""
    from zhiling.train import trainer

    original = trainer.Trainer._save_checkpoint

    def save_then_stop(self):
        original(self)
        raise SystemExit("stopped after the first checkpoint")

    trainer.Trainer._save_checkpoint = save_then_stop
    try:
        train(build_config(tree), show_progress=False, summary=False)
    finally:
        trainer.Trainer._save_checkpoint = original


def test_resume_from_an_explicit_checkpoint_path(setup, tmp_path):
    tmp, data, model, reference = setup
    out = tmp_path / "explicit"
    tree = _config_tree(model, data, out, tmp)
    tree["training"]["resume"] = str(tmp_path / "nope")
    with pytest.raises(ZhilingError, match="not a complete checkpoint"):
        train(build_config(tree), show_progress=False, summary=False)
    tree["training"]["resume"] = str(reference / "checkpoints" / "checkpoint-12")
    result = train(build_config(tree), show_progress=False, summary=False)
    assert result.resumed_from.endswith("checkpoint-12") and result.steps == 14
    assert _losses(out)[-1] == _losses(reference)[-1]
