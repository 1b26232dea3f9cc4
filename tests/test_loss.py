"""Label-only, chunked LM-head loss: same loss and gradients as the model's own full-logits loss."""

import random

import pytest
import torch

import zhiling.train.loss as loss_module
from tiny import make_config
from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.models.lm import head_parts, unwrap_model
from zhiling.train.loss import CausalLMLoss, check_label_only, label_only_loss, plain_loss, shifted_targets
from zhiling.train.packing import PaddedCollator, packed_collator_for

VOCAB = 300


def _model(family: str, softcap: float | None = None, **overrides):
    from transformers import AutoModelForCausalLM

    config = make_config(family, VOCAB)
    if softcap is not None:
        config.final_logit_softcapping = softcap
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _rows(lengths, seed=0):
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        cut = n // 3
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


def _padded(lengths=(12, 7, 16)):
    return PaddedCollator(pad_token_id=0)(_rows(lengths))


def _loss_and_grads(model, compute, batch):
    model.zero_grad(set_to_none=True)
    out = compute(model, batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model, batch, chunk_size=5):
    reference, ref_grads = _loss_and_grads(model, plain_loss, batch)
    ours, our_grads = _loss_and_grads(model, lambda m, b: label_only_loss(m, b, chunk_size=chunk_size), batch)
    own = model(**batch).loss  # transformers' own loss: the plain path really is the plain path
    assert ours.n_tokens == reference.n_tokens > 0
    assert abs(ours.loss.item() - reference.loss.item()) < 1e-5
    assert abs(own.item() - reference.loss.item()) < 1e-5
    assert set(our_grads) == set(ref_grads) and ref_grads
    for name in ref_grads:
        assert torch.allclose(our_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bloom"])
def test_full_fine_tune_loss_and_grads_equal_plain_path(family):
    model = _model(family)
    _assert_same(model, _padded())


def test_gemma_softcapping_and_tied_embeddings():
    model = _model("gemma3", softcap=2.0)  # a small cap makes tanh far from linear on random logits
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert head_parts(model).softcap == 2.0
    _assert_same(model, _padded())


def test_logit_scaling_family():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("granite", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  logits_scaling=4.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert head_parts(model).scale == 0.25
    _assert_same(model, _padded())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "lm_head"]])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lora_loss_and_grads_equal_plain_path(family, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                      init_lora_weights=False))
    assert unwrap_model(model) is model.get_base_model()
    _assert_same(model, _padded())


def test_lora_with_dropout_on_the_head_is_reproducible():
    """The checkpointed head path recomputes each chunk with the same dropout mask."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.5,
                                                       init_lora_weights=False))
    batch = _padded()
    torch.manual_seed(1)
    _, first = _loss_and_grads(model, lambda m, b: label_only_loss(m, b, chunk_size=4), batch)
    torch.manual_seed(1)
    _, second = _loss_and_grads(model, lambda m, b: label_only_loss(m, b, chunk_size=64), batch)
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_packed_batch_label_only_loss_equals_rows_run_one_by_one(family):
    model = _model(family)
    rows = _rows([9, 13, 5, 11], seed=4)
    packed = packed_collator_for(model)(rows)
    together, grads_packed = _loss_and_grads(model, label_only_loss, packed)
    total, count = 0.0, 0
    model.zero_grad(set_to_none=True)
    for row in rows:
        alone = plain_loss(model, PaddedCollator(0)([row]))
        alone.loss_sum.backward()
        total += alone.loss_sum.item()
        count += alone.n_tokens
    assert together.n_tokens == count
    assert abs(together.loss.item() - total / count) < 1e-5
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(grads_packed[name], param.grad / count, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    model = _model("qwen2")
    batch = _padded()
    expected = plain_loss(model, batch).loss.item()
    assert abs(label_only_loss(model, batch, chunk_size=chunk_size).loss.item() - expected) < 1e-5


def test_head_runs_only_on_label_positions_in_chunks(monkeypatch):
    seen = []
    real = loss_module._chunk_logits

    def spy(piece, weight, bias, out):
        seen.append(piece.shape[0])
        return real(piece, weight, bias, out)

    monkeypatch.setattr(loss_module, "_chunk_logits", spy)
    model = _model("llama")
    batch = _padded((12, 7, 16))
    label_positions = int((shifted_targets(batch["labels"]) != IGNORE_INDEX).sum())
    label_only_loss(model, batch, chunk_size=4).loss.backward()
    assert sum(seen) == label_positions < batch["input_ids"].numel()
    assert max(seen) == 4


def test_sum_and_count_normalise_gradient_accumulation():
    model = _model("llama")
    first, second = _padded((12, 7)), _padded((16, 5, 9))
    parts = [label_only_loss(model, b) for b in (first, second)]
    combined = (parts[0].loss_sum + parts[1].loss_sum) / (parts[0].n_tokens + parts[1].n_tokens)
    rows = _rows((12, 7)) + _rows((16, 5, 9))
    whole = plain_loss(model, PaddedCollator(0)(rows))
    assert abs(combined.item() - whole.loss.item()) < 1e-5


def test_micro_batch_without_labels_gives_zero_loss_and_zero_grads():
    model = _model("llama")
    batch = _padded()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    out = label_only_loss(model, batch)
    assert out.n_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_no_gradients_needed_in_eval():
    model = _model("gemma3")
    batch = _padded()
    with torch.no_grad():
        out = label_only_loss(model, batch)
    assert not out.loss.requires_grad
    assert abs(out.loss.item() - plain_loss(model, batch).loss.item()) < 1e-5


class _DoubledLogits(torch.nn.Module):
    """A causal LM whose forward scales logits by a factor its config does not declare."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.base_model_prefix = "inner_model"
        self.inner_model = inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 2.0
        return out


def test_unknown_head_transform_falls_back_to_the_plain_path():
    model = _model("llama")
    assert check_label_only(model) == (True, "ok")
    odd = _DoubledLogits(model)
    ok, reason = check_label_only(odd)
    assert not ok and "differs" in reason
    with pytest.warns(UserWarning, match="logits only where labels exist is off"):
        wrapper = CausalLMLoss(odd)
    assert not wrapper.label_only
    batch = _padded()
    assert abs(wrapper(**batch).loss.item() - plain_loss(odd, batch).loss.item()) < 1e-6
    assert CausalLMLoss(model).label_only


def test_loss_module_wraps_for_distributed_training():
    model = _model("qwen2")
    wrapper = CausalLMLoss(model, chunk_size=8)
    batch = _padded()
    out = wrapper(**batch)
    out.loss.backward()
    assert abs(out.loss.item() - plain_loss(model, batch).loss.item()) < 1e-5
    assert any(p.grad is not None for p in wrapper.parameters())
