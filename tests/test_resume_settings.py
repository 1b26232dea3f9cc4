"""What a resume accepts: every setting that decides the result is compared with the checkpoint's; a change is
refused with the changed keys, or applied for real through training.resume_changes. Checkpoints whose tensors do not
fit the model, or whose files would run code when loaded, are refused with a CheckpointError."""

import json
import re

import pytest

from train_support import interrupt_after_checkpoint, metric_rows, tiny_config, write_data
from zhiling.config import ZhilingConfig
from zhiling.config.loader import build_config
from zhiling.errors import ZhilingError
from zhiling.train.run import train
from zhiling.train.trainer import Trainer


def _tree(model, data, out, tmp, **training):
    return tiny_config(model, data, out, tmp,
                       training={"max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 2,
                                 "lr_scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.01, **training},
                       lora={"dropout": 0.1})


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir):
    """A run stopped right after its checkpoint at step 2 (of 4); tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("settings")
    data = write_data(tmp / "data.jsonl", rows=16)
    model = tiny_model_dir("llama")
    out = tmp / "stopped"
    interrupt_after_checkpoint(_tree(model, data, out, tmp))
    return tmp, data, model, out


def _copy(stopped, tmp_path):
    import shutil

    tmp, data, model, out = stopped
    target = tmp_path / "run"
    shutil.copytree(out, target)
    return _tree(model, data, target, tmp), target


def _changed(tree: dict, section: str, **values) -> dict:
    tree = json.loads(json.dumps(tree))
    tree[section].update(values)
    return tree


def _error_type(excinfo) -> str:
    return type(excinfo.value).__name__


# ----- which keys are fingerprinted -----------------------------------------------------------------------------------
def test_every_config_key_is_fingerprinted_unless_listed_with_a_reason():
    from zhiling.train.fingerprint import NOT_RESULT, RESUMABLE, result_settings

    dump = ZhilingConfig().model_dump(mode="json")
    keys = set()
    for section, values in dump.items():
        keys |= {f"{section}.{key}" for key in values} if isinstance(values, dict) else {section}
    fingerprinted = set(result_settings(dump))
    for key in keys - fingerprinted:
        assert key in NOT_RESULT or key.split(".")[0] in NOT_RESULT, key
    for skip, reason in NOT_RESULT.items():  # every exclusion names a real key or section, with its reason
        assert (skip in keys or any(key.startswith(skip + ".") for key in keys)) and reason, skip
    for key in ("training.learning_rate", "training.weight_decay", "training.lr_scheduler", "training.warmup_steps",
                "training.warmup_ratio", "training.max_steps", "training.num_epochs", "training.max_grad_norm",
                "training.optimizer", "training.method", "training.seed", "training.loss", "training.precision",
                "training.per_device_batch_size", "training.gradient_accumulation_steps", "training.packing",
                "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules", "quantization.bits",
                "model.name_or_path", "model.dtype", "template.name", "data.cutoff_len", "data.seed"):
        assert key in fingerprinted, key
    assert set(RESUMABLE) <= fingerprinted


# ----- refused changes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, values, named, resumable", [
    ("training", {"learning_rate": 1e-3}, [r"training\.learning_rate: 0\.005 -> 0\.001"], True),
    ("training", {"weight_decay": 0.1}, [r"training\.weight_decay: 0\.01 -> 0\.1"], True),
    ("training", {"max_steps": 8, "warmup_steps": 3}, [r"training\.max_steps: 4 -> 8", r"training\.warmup_steps"],
     True),
    ("training", {"per_device_batch_size": 2, "gradient_accumulation_steps": 1},
     [r"training\.per_device_batch_size: 4 -> 2", r"training\.gradient_accumulation_steps: 2 -> 1"], False),
    ("lora", {"rank": 8}, [r"lora\.rank: 4 -> 8"], False),
    ("lora", {"target_modules": ["q_proj"]}, [r"lora\.target_modules: 'auto' -> \['q_proj'\]"], False),
])
def test_a_changed_setting_is_refused_with_the_changed_keys(stopped, tmp_path, section, values, named, resumable):
    tree, out = _copy(stopped, tmp_path)
    with pytest.raises(ZhilingError, match="cannot resume from .*checkpoint-2: settings differ") as excinfo:
        train(build_config(_changed(tree, section, **values)), show_progress=False, summary=False)
    assert _error_type(excinfo) == "CheckpointError"
    for pattern in named:
        assert re.search(pattern, str(excinfo.value)), (pattern, str(excinfo.value))
    assert ("training.resume_changes=[" in str(excinfo.value)) == resumable
    recorded = json.loads((out / "zhiling.json").read_text())["config"][section]
    assert {key: recorded[key] for key in values} == {key: tree[section].get(key, "auto") for key in values}


def test_changed_training_rows_are_refused_and_resume_false_starts_over(stopped, tmp_path):
    tree, out = _copy(stopped, tmp_path)
    changed = json.loads(json.dumps(tree))
    changed["data"]["datasets"] = [str(write_data(tmp_path / "other.jsonl", rows=20))]
    with pytest.raises(ZhilingError, match=r"settings differ from the checkpoint's: run\.data \(the training rows"):
        train(build_config(changed), show_progress=False, summary=False)
    changed["training"]["resume"] = False
    result = train(build_config(changed), show_progress=False, summary=False)
    assert result.resumed_from is None and result.steps == 4


def test_resume_changes_cannot_name_a_key_that_shapes_the_run(stopped, tmp_path):
    tree, _ = _copy(stopped, tmp_path)
    changed = _changed(tree, "lora", rank=8)
    changed["training"]["resume_changes"] = ["lora.rank"]
    with pytest.raises(ZhilingError, match=r"'lora\.rank' cannot change in the middle of a run"):
        train(build_config(changed), show_progress=False, summary=False)


# ----- the opt-in applies the new values ------------------------------------------------------------------------------
def test_resume_changes_applies_new_learning_rate_weight_decay_and_length(stopped, tmp_path):
    from zhiling.config import TrainingConfig
    from zhiling.train.optim import build_scheduler

    tree, out = _copy(stopped, tmp_path)
    changed = _changed(tree, "training", learning_rate=1e-3, weight_decay=0.2, max_steps=6,
                       resume_changes="learning_rate,weight_decay,max_steps")
    trainer = Trainer(build_config(changed), show_progress=False, announce=lambda message: None)
    result = trainer.run()
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 6
    # the learning rate of steps 3..6 is the new schedule's (lr 1e-3, 6 steps, 1 warm-up step) at those steps
    import torch

    new = TrainingConfig(**changed["training"])
    scheduler = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=new.learning_rate), new, 6)
    expected = []
    for _ in range(6):
        expected.append(scheduler.get_last_lr()[0])
        scheduler.step()
    logged = {row[0]: row[3] for row in metric_rows(out) if row[1] is not None}
    assert [logged[step] for step in (3, 4, 5, 6)] == pytest.approx(expected[2:6], rel=1e-12)
    decayed = [group for group in trainer.optimizer.param_groups if group["weight_decay"] > 0]
    assert decayed and all(group["weight_decay"] == 0.2 for group in decayed)
    assert all(group["initial_lr"] == 1e-3 for group in trainer.optimizer.param_groups)
    record = json.loads((out / "zhiling.json").read_text())
    assert record["config"]["training"]["learning_rate"] == 1e-3
    assert record["resumes"] == [{"from": str(out / "checkpoints" / "checkpoint-2"), "step": 2, "changed": {
        "training.learning_rate": [0.005, 0.001], "training.max_steps": [4, 6], "training.weight_decay": [0.01, 0.2]}}]


# ----- tensors that do not fit ----------------------------------------------------------------------------------------
def test_adapter_of_another_shape_is_a_named_error(stopped, tmp_path):
    from safetensors.torch import load_file, save_file

    tree, out = _copy(stopped, tmp_path)
    weights_file = out / "checkpoints" / "checkpoint-2" / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(key for key in weights if "lora_A" in key)[0]
    weights[name] = weights[name][:2].contiguous()  # rank 2 instead of 4
    save_file(weights, str(weights_file))
    with pytest.raises(ZhilingError, match=rf"does not fit this model: {name.replace('.', '[.]')} has shape "
                                           rf"\[2, \d+\] in the checkpoint and \[4, \d+\] in this model") as excinfo:
        train(build_config(tree), show_progress=False, summary=False)
    assert _error_type(excinfo) == "CheckpointError"


# ----- no pickle ------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls open(marker, "w"): code run by merely loading the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused(stopped, tmp_path, name):
    import torch

    tree, out = _copy(stopped, tmp_path)
    marker = tmp_path / "code-ran"
    target = out / "checkpoints" / "checkpoint-2" / name
    torch.save({"state": _Payload(marker)}, target)
    proof = tmp_path / "proof"  # the same payload does run code when loaded the old way
    torch.save({"state": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()
    with pytest.raises(ZhilingError, match=rf"{name}: refused to load: .*could run code") as excinfo:
        train(build_config(tree), show_progress=False, summary=False)
    assert _error_type(excinfo) == "CheckpointError"
    assert not marker.exists()
