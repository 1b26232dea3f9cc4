"""From tokenized rows to micro-batches: which sampler and collator a run uses, and the packing check.

Packing (the default where it is exact for the model) fills micro-batches up to a token budget; the unpacked path
pads each micro-batch to its longest row, with rows of similar length grouped. Either way the order is a pure
function of ``(seed, epoch)`` (see ``zhiling.train.packing``), so a resumed run replays the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.errors import ConfigError
from zhiling.models.lm import unwrap_model
from zhiling.train.loss import plain_loss
from zhiling.train.packing import (LengthGroupedBatchSampler, PackedBatchSampler, PaddedCollator,
                                   default_packing_tokens, pack_rows, packed_collator_for)

LENGTH_GROUP_FACTOR = 50


def check_packing(model, collator) -> tuple[bool, str]:
    """Does a packed micro-batch give every row the same loss as running it alone? (eval mode, no gradients)"""
    import torch

    base = unwrap_model(model)
    vocab = int(base.config.vocab_size)
    device = next(base.parameters()).device
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(min(3, vocab - 1), vocab, (n,), generator=generator).tolist() for n in (6, 9)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [plain_loss(model, {"input_ids": torch.tensor([r], device=device),
                                        "labels": torch.tensor([r], device=device)}).loss_sum.item() for r in rows]
            packed = collator([{"input_ids": r, "labels": r} for r in rows])
            packed = {key: to_device(value, device) for key, value in packed.items()}
            together = plain_loss(model, packed).loss_sum.item()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pack this model
        return False, f"a packed forward failed ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    dtype = next(base.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not math.isfinite(together) or abs(together - sum(alone)) > tolerance * max(1.0, abs(sum(alone))):
        return False, f"packed rows see each other (packed loss {together:.6f}, rows alone {sum(alone):.6f})"
    return True, "ok"


def to_device(value, device):
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value.to(device) if hasattr(value, "to") else value


def count_labels(batch: dict) -> int:
    """Positions that predict a label (what the loss averages over)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


@dataclass
class Batching:
    packing: bool
    sampler: object  # .batches(epoch) -> this process's list of micro-batches (row indices)
    collator: object
    packing_tokens: int | None
    note: str  # one line for the screen

    def micro_batches(self, epoch: int) -> list[list[int]]:
        return self.sampler.batches(epoch)


def packing_budget(training, cutoff_len: int, device: str) -> int:
    """Tokens per packed micro-batch: ``training.packing_tokens``, else the device's default (see packing)."""
    return training.packing_tokens or default_packing_tokens(device, training.per_device_batch_size, cutoff_len)


def choose_batching(model, tokenizer, lengths: list[int], training, cutoff_len: int, processes: int,
                    rank: int, device: str = "cpu") -> Batching:
    """Packing when asked for or (by default) when the check passes; else length-grouped dynamic padding."""
    budget = packing_budget(training, cutoff_len, device)
    packing = training.packing
    reason = ""
    if packing is not False:
        collator = packed_collator_for(unwrap_model(model), budget)
        ok, reason = check_packing(model, collator)
        if not ok and packing:
            raise ConfigError(f"training.packing=true, but packing is not exact for this model: {reason}; "
                              f"set training.packing=false")
        packing = ok
    if packing:
        longest = max(lengths)
        if longest > budget:
            raise ConfigError(f"training.packing_tokens={budget} is shorter than the longest row ({longest} tokens); "
                              f"raise it to at least data.cutoff_len={cutoff_len}")
        sampler = PackedBatchSampler(lengths, budget, seed=training.seed, shuffle=True, num_replicas=processes,
                                     rank=rank)
        note = f"packing on: micro-batches of up to {budget} tokens ({sampler.fill_ratio():.0%} full)"
        return Batching(True, sampler, collator, budget, note)
    factor = LENGTH_GROUP_FACTOR if training.group_by_length else 1
    sampler = LengthGroupedBatchSampler(lengths, training.per_device_batch_size, seed=training.seed,
                                        group_factor=factor, num_replicas=processes, rank=rank)
    why = f" ({reason})" if reason and training.packing is None else ""
    note = (f"packing off{why}: {training.per_device_batch_size} rows per micro-batch, dynamic padding"
            + (", grouped by length" if training.group_by_length else ""))
    return Batching(False, sampler, PaddedCollator(tokenizer.pad_token_id), None, note)


def eval_micro_batches(lengths: list[int], batching: Batching, batch_size: int, processes: int,
                       rank: int) -> list[list[int]]:
    """Every validation row exactly once, split over the processes (no shuffling, no repeats)."""
    if batching.packing:
        bins = pack_rows(lengths, max(batching.packing_tokens, max(lengths)))
    else:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        bins = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return bins[rank::processes]
