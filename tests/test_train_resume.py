"""Exact resume under faults: a run killed with SIGKILL (mid-run, mid-checkpoint-save, mid-pruning, mid-final-save),
stopped with SIGTERM or Ctrl-C, or left with a damaged newest checkpoint is started again and ends with the same
adapter and the same per-step losses as a run that was never stopped. A second run on the same folder is refused
while the first one lives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_support import assert_same_run, interrupt_after_checkpoint, metric_rows, tiny_config, write_data
from zhiling.config.loader import build_config
from zhiling.errors import ZhilingError
from zhiling.train.checkpoint import list_checkpoints
from zhiling.train.run import train

# Runs ``zhiling train`` with faults chosen by environment variables: STEP_DELAY slows every step (so the test can
# kill it at a known point); SAVE_MARKER stops a checkpoint save just before its rename; PRUNE_MARKER stops the
# deletion of checkpoint-3 half-way (its adapter already gone); FINAL_MARKER stops the final save half-way. Each
# marker file is created when the run sits at that point, waiting to be killed.
RUNNER = """
import os, shutil, sys, time
from pathlib import Path
from zhiling.train import checkpoint, outputs, trainer
step_delay = float(os.environ.get("STEP_DELAY", "0"))
original_step = trainer.Trainer._train_step
def slow_step(self, group):
    result = original_step(self, group)
    time.sleep(step_delay)
    return result
trainer.Trainer._train_step = slow_step
def wait_here(marker):
    open(marker, "w").close()
    time.sleep(600)
if os.environ.get("SAVE_MARKER"):
    original_fsync = checkpoint._fsync_tree
    def stuck_save(folder):
        original_fsync(folder)
        if folder.name.startswith("checkpoint-6"):
            wait_here(os.environ["SAVE_MARKER"])
    checkpoint._fsync_tree = stuck_save
if os.environ.get("PRUNE_MARKER"):
    original_rmtree = shutil.rmtree
    def stuck_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("checkpoint-3") and (path / "state.json").is_file():
            original_rmtree(path / "adapter")
            wait_here(os.environ["PRUNE_MARKER"])
        return original_rmtree(path, *args, **kwargs)
    shutil.rmtree = stuck_rmtree
if os.environ.get("FINAL_MARKER"):
    original_record = outputs.save_template_record
    def stuck_final(template, folder):
        original_record(template, folder)
        wait_here(os.environ["FINAL_MARKER"])
    outputs.save_template_record = stuck_final
from zhiling.cli import main
sys.exit(main(sys.argv[1:]))
"""

REPO = Path(__file__).resolve().parents[1]


def _config_tree(model_dir, data, out, tmp, **training):
    """Unpacked batches, full-vocabulary loss (the first kill tests were written for this path)."""
    return tiny_config(model_dir, data, out, tmp,
                       data={"val_size": 4},
                       training={"max_steps": 14, "save_steps": 3, "gradient_accumulation_steps": 2,
                                 "per_device_batch_size": 3, "packing": False, "eval_steps": 5,
                                 "lr_scheduler": "cosine", "warmup_steps": 2, **training},
                       lora={"dropout": 0.2})


def _default_tree(model_dir, data, out, tmp, **training):
    """The default training path: packing on (the model supports it), label-only loss; dropout, warm-up, cosine."""
    tree = tiny_config(model_dir, data, out, tmp,
                       data={"val_size": 4},
                       training={"max_steps": 10, "save_steps": 3, "gradient_accumulation_steps": 2,
                                 "eval_steps": 5, "lr_scheduler": "cosine", "warmup_steps": 2, **training},
                       lora={"dropout": 0.2})
    assert "packing" not in tree["training"] and "loss" not in tree["training"]
    return tree


def _write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def _start(config: Path, env_extra: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **env_extra)
    return subprocess.Popen([sys.executable, "-c", RUNNER, "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            said = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"training ended before the kill point:\n{said}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not reach the kill point")
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


def _metric_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _resume(tree: dict, messages: list | None = None):
    announce = messages.append if messages is not None else (lambda message: None)
    return train(build_config(tree), show_progress=False, summary=False, announce=announce)


def _reference(tmp_path_factory, tiny_model_dir, name: str, make_tree):
    """(tmp, data, model, reference): a folder with data and the uninterrupted run the killed ones must match."""
    tmp = tmp_path_factory.mktemp(name)
    data = write_data(tmp / "data.jsonl", rows=24)
    model = tiny_model_dir("llama")
    reference = tmp / "reference"
    messages = []
    _resume(make_tree(model, data, reference, tmp), messages)
    return tmp, data, model, reference, messages


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    return _reference(tmp_path_factory, tiny_model_dir, "resume", _config_tree)[:4]


@pytest.fixture(scope="module")
def default_setup(tmp_path_factory, tiny_model_dir):
    *found, messages = _reference(tmp_path_factory, tiny_model_dir, "resume-default", _default_tree)
    assert any(line.startswith("plan:") and "packing on" in line for line in messages), messages
    return tuple(found)


# ----- SIGKILL --------------------------------------------------------------------------------------------------------
def test_kill_mid_run_then_resume_matches_uninterrupted_run(setup):
    tmp, data, model, reference = setup
    out = tmp / "killed"
    config = _write_yaml(tmp / "killed.yaml", _config_tree(model, data, out, tmp))
    process = _start(config, {"STEP_DELAY": "0.4"})
    _wait_for(lambda: _metric_steps(out) >= 8, process)
    _kill(process)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")][-1] >= 6
    assert not (out / "adapter").exists()
    result = _resume(_config_tree(model, data, out, tmp))
    assert result.resumed_from is not None
    assert_same_run(out, reference)


def test_default_path_kill_mid_run_refuses_a_second_run_then_resumes_exactly(default_setup):
    """Packing on, label-only loss: kill -9 at step 8 and resume; a second run while the first lives is refused,
    and the killed run's lock does not stand in the way of the resume."""
    tmp, data, model, reference = default_setup
    out = tmp / "killed"
    tree = _default_tree(model, data, out, tmp)
    process = _start(_write_yaml(tmp / "killed.yaml", tree), {"STEP_DELAY": "0.4"})
    _wait_for(lambda: _metric_steps(out) >= 2, process)
    with pytest.raises(ZhilingError, match=r"is in use by another zhiling train \(pid \d+"):
        _resume(tree)
    _wait_for(lambda: _metric_steps(out) >= 8, process)
    _kill(process)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")][-1] >= 6
    result = _resume(tree)
    assert result.resumed_from is not None
    assert_same_run(out, reference)


def test_kill_during_checkpoint_save_leaves_no_complete_looking_checkpoint(setup):
    tmp, data, model, reference = setup
    out = tmp / "killed-in-save"
    marker = tmp / "saving"
    config = _write_yaml(tmp / "killed-in-save.yaml", _config_tree(model, data, out, tmp))
    process = _start(config, {"SAVE_MARKER": str(marker)})
    _wait_for(marker.exists, process)
    _kill(process)
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(name.startswith("checkpoint-6.tmp-") for name in leftovers)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [3]  # the half-written one is not found
    result = _resume(_config_tree(model, data, out, tmp))
    assert result.resumed_from.endswith("checkpoint-3")
    assert not any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    assert_same_run(out, reference)


def test_kill_while_pruning_an_old_checkpoint_leaves_no_half_deleted_checkpoint(default_setup):
    """save_total_limit=1: writing checkpoint-6 deletes checkpoint-3; the kill lands when its adapter is gone."""
    tmp, data, model, reference = default_setup
    out = tmp / "killed-pruning"
    marker = tmp / "pruning"
    tree = _default_tree(model, data, out, tmp, save_total_limit=1)
    process = _start(_write_yaml(tmp / "killed-pruning.yaml", tree), {"PRUNE_MARKER": str(marker)})
    _wait_for(marker.exists, process)
    _kill(process)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [6]  # no checkpoint-3 without its adapter
    result = _resume(tree)
    assert result.resumed_from.endswith("checkpoint-6")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-9"]
    assert_same_run(out, reference)


def test_kill_during_the_final_save_resumes_and_leaves_no_partial_adapter(default_setup):
    tmp, data, model, reference = default_setup
    out = tmp / "killed-final"
    marker = tmp / "final"
    tree = _default_tree(model, data, out, tmp)
    process = _start(_write_yaml(tmp / "killed-final.yaml", tree), {"FINAL_MARKER": str(marker)})
    _wait_for(marker.exists, process)
    _kill(process)
    assert json.loads((out / "zhiling.json").read_text())["status"] == "running"
    assert not (out / "adapter").exists()
    result = _resume(tree)
    assert result.resumed_from.endswith("checkpoint-9") and not result.skipped
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".zhiling.lock") == []
    assert_same_run(out, reference)


# ----- SIGTERM and Ctrl-C ---------------------------------------------------------------------------------------------
class _Unhandled(Exception):
    pass


def _guard(signum, frame):
    """The test's own handler: reached only when the run did not handle the signal itself."""
    raise _Unhandled(f"{signal.Signals(signum).name} reached the test: the run did not handle it")


def test_sigterm_and_ctrl_c_save_a_checkpoint_at_the_next_step_then_exit(default_setup, monkeypatch, capsys):
    """SIGTERM arrives during step 5, SIGINT (Ctrl-C) during step 8 of the resumed run: each time that step
    finishes, a checkpoint is written and the command exits with 128 + the signal; the third start finishes the run
    exactly as if it had never stopped."""
    from zhiling.cli import main
    from zhiling.train import trainer

    tmp, data, model, reference = default_setup
    out = tmp / "signalled"
    config = _write_yaml(tmp / "signalled.yaml", _default_tree(model, data, out, tmp))
    original = trainer.Trainer._train_step
    plan = {5: signal.SIGTERM, 8: signal.SIGINT}

    def signalled_step(self, group):
        signum = plan.pop(self.state.step + 1, None)
        if signum is not None:
            os.kill(os.getpid(), signum)
        return original(self, group)

    monkeypatch.setattr(trainer.Trainer, "_train_step", signalled_step)
    previous = {signum: signal.signal(signum, _guard) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for signum, step in ((signal.SIGTERM, 5), (signal.SIGINT, 8)):
            assert main(["train", str(config)]) == 128 + signum
            assert f"stopped by {signal.Signals(signum).name} after step {step} of 10" in capsys.readouterr().err
            assert [number for number, _ in list_checkpoints(out / "checkpoints")][-1] == step
            assert _metric_steps(out) == step
            assert signal.getsignal(signum) is _guard  # the run put the previous handler back
        assert main(["train", str(config)]) == 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert_same_run(out, reference)


# ----- a damaged newest checkpoint ------------------------------------------------------------------------------------
def test_empty_or_corrupt_newest_state_falls_back_to_the_previous_checkpoint(setup, tmp_path):
    tmp, data, model, reference = setup
    out = tmp_path / "damaged"
    tree = _config_tree(model, data, out, tmp)
    interrupt_after_checkpoint(tree, count=3)
    checkpoints = out / "checkpoints"
    assert [step for step, _ in list_checkpoints(checkpoints)] == [3, 6, 9]
    (checkpoints / "checkpoint-9" / "state.json").write_text("", encoding="utf-8")
    (checkpoints / "checkpoint-6" / "state.json").write_text('{"step": 6, "epo', encoding="utf-8")
    messages = []
    result = _resume(tree, messages)
    assert result.resumed_from.endswith("checkpoint-3")
    said = "\n".join(messages)
    assert "checkpoint-9 is damaged" in said and "checkpoint-6 is damaged" in said and "falling back" in said
    assert (checkpoints / "checkpoint-9.damaged").is_dir() and (checkpoints / "checkpoint-6.damaged").is_dir()
    assert_same_run(out, reference)


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
    assert metric_rows(out)[-1] == metric_rows(reference)[-1]


# ----- several processes ----------------------------------------------------------------------------------------------
# Imported by every Python process started with this folder on PYTHONPATH: each torchrun worker writes its pid and
# trains slowly enough to be killed mid-run.
WORKER_HOOK = """
import os, time
if "LOCAL_RANK" in os.environ and os.environ.get("ZHILING_TEST_PIDS"):
    with open(os.path.join(os.environ["ZHILING_TEST_PIDS"], "rank%s.pid" % os.environ["RANK"]), "w") as handle:
        handle.write(str(os.getpid()))
    from zhiling.train import trainer
    original_step = trainer.Trainer._train_step
    def slow_step(self, group):
        result = original_step(self, group)
        time.sleep(float(os.environ.get("STEP_DELAY", "0")))
        return result
    trainer.Trainer._train_step = slow_step
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped running
    except FileNotFoundError:
        return False


def _launch(command, env, log: Path) -> subprocess.Popen:
    """``zhiling train --nproc 2`` in a session of its own; output to a file, not a pipe (a worker must not die of a
    closed pipe, only of its parent)."""
    with log.open("a") as handle:
        return subprocess.Popen(command, env=env, start_new_session=True, stdout=handle, stderr=handle)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_two_processes_sigterm_saves_and_stops_and_a_killed_launcher_leaves_no_worker(tmp_path, tiny_model_dir):
    """Under torchrun: SIGTERM to the launcher stops both ranks after the same step with a checkpoint there; then
    kill -9 of the launcher's process group (launcher and torchrun) takes the workers with it, and the folder
    resumes to the end."""
    data = write_data(tmp_path / "data.jsonl", rows=24)
    out = tmp_path / "out"
    tree = tiny_config(tiny_model_dir("llama"), data, out, tmp_path,
                       training={"max_steps": 8, "save_steps": 100, "per_device_batch_size": 2})
    config = _write_yaml(tmp_path / "ddp.yaml", tree)
    hooks, pids, log = tmp_path / "hooks", tmp_path / "pids", tmp_path / "launcher.log"
    hooks.mkdir()
    pids.mkdir()
    (hooks / "sitecustomize.py").write_text(WORKER_HOOK, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(REPO / "src")]), ZHILING_TEST_PIDS=str(pids),
               STEP_DELAY="0.5")
    command = [sys.executable, "-m", "zhiling", "train", str(config), "--nproc", "2"]

    launcher = _launch(command, env, log)
    _wait_for(lambda: _metric_steps(out) >= 2, launcher, timeout=300)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) != 0
    stopped_at = _metric_steps(out)
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [stopped_at]  # save_steps is 100
    assert "stopped by SIGTERM after step" in log.read_text()

    launcher = _launch(command, env, log)
    _wait_for(lambda: _metric_steps(out) >= stopped_at + 1, launcher, timeout=300)
    workers = [int((pids / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
    assert all(_alive(pid) for pid in workers)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    at_kill = _metric_steps(out)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their launcher"
    assert _metric_steps(out) <= at_kill + 1, "the workers went on training after their launcher was killed"
    assert json.loads((out / "zhiling.json").read_text())["status"] == "running"

    env["STEP_DELAY"] = "0"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints'}/checkpoint-{stopped_at} " in done.stderr
    assert json.loads((out / "zhiling.json").read_text())["status"] == "finished"
