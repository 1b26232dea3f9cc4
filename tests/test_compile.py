"""training.compile: decoder layers compiled in place; same loss and gradients; a fallback that never stops a run."""

import random

import pytest
import torch

import zhiling.train.compile as compile_module
from tiny import make_config
from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.train.compile import decoder_layers, is_compiled, maybe_compile
from zhiling.train.loss import label_only_loss
from zhiling.train.packing import packed_collator_for

VOCAB = 300


def _model(family="llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(family, VOCAB))


def _packed(model, lengths):
    rng = random.Random(0)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    return packed_collator_for(model)(rows)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = label_only_loss(model, batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_train_like_uncompiled_ones():
    model = _model()
    batches = [_packed(model, [7, 12]), _packed(model, [5, 9, 11])]  # two lengths: dynamic shapes, no recompile
    expected = [_loss_and_grads(model, batch) for batch in batches]
    state = torch.get_rng_state()
    assert maybe_compile(model, True, example_batch=batches[0]) is model
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves the random stream alone
    assert all(p.grad is not None for p in model.parameters())  # ... and the gradients it found
    assert is_compiled(model) and len(decoder_layers(model)) == 2
    for batch, (loss, grads) in zip(batches, expected):
        got_loss, got_grads = _loss_and_grads(model, batch)
        assert abs(got_loss - loss) < 1e-5
        for name in grads:
            assert torch.allclose(got_grads[name], grads[name], atol=1e-5, rtol=1e-4), name


def test_disabled_leaves_the_model_alone():
    model = _model()
    assert maybe_compile(model, False) is model
    assert not is_compiled(model)


def test_compile_failure_falls_back_with_a_warning(monkeypatch):
    def broken(layer, dynamic):
        layer.compile(dynamic=dynamic)
        layer._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor exploded\nmore"))

    monkeypatch.setattr(compile_module, "_compile_layer", broken)
    model = _model()
    batch = _packed(model, [6, 8])
    expected, _ = _loss_and_grads(model, batch)
    with pytest.warns(UserWarning, match="training.compile failed .*inductor exploded.*training uncompiled"):
        maybe_compile(model, True)
    assert not is_compiled(model)
    assert abs(_loss_and_grads(model, batch)[0] - expected) < 1e-6


def test_missing_cpu_compiler_falls_back(monkeypatch):
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    model = _model()
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        maybe_compile(model, True)
    assert not is_compiled(model)


def test_model_without_repeated_layers_is_left_uncompiled():
    model = torch.nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="no repeated decoder layers"):
        assert maybe_compile(model, True) is model


def test_training_compile_key_trains_like_uncompiled(tmp_path, tiny_model_dir):
    """training.compile=true goes through maybe_compile in the trainer and gives the same per-step losses."""
    import json

    from train_support import tiny_config, write_data
    from zhiling.config import build_config
    from zhiling.train.run import train

    data = write_data(tmp_path / "data.jsonl", rows=16)
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        tree = tiny_config(tiny_model_dir("llama"), data, out, tmp_path, training={"max_steps": 3, "compile": compiled})
        train(build_config(tree), show_progress=False, summary=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
