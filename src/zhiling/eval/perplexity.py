"""Perplexity on held-out data, with the template and label masking of training: exp(mean NLL of trained tokens)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

from zhiling.data.tokenize import IGNORE_INDEX, TokenizeOptions, build_example
from zhiling.eval.likelihood import target_logprobs


def perplexity(model, tokenizer, template, records: Iterable[dict], options: TokenizeOptions, batch_size: int = 8,
               advance: Callable[[int], None] | None = None) -> dict:
    """Per-row and overall perplexity over the tokens training would learn (answers, EOS included)."""
    sequences, targets, ids = [], [], []
    for record in records:
        example = build_example(template, tokenizer, record, options)
        sequences.append(example["input_ids"])
        targets.append([label != IGNORE_INDEX for label in example["labels"]])
        ids.append(record.get("id"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = target_logprobs(model, sequences, targets, pad, batch_size, advance)
    rows = [{"id": row_id, "tokens": count, "nll": -total / count if count else None,
             "perplexity": math.exp(-total / count) if count else None}
            for row_id, (total, count) in zip(ids, scores)]
    total_nll = -sum(total for total, _ in scores)
    tokens = sum(count for _, count in scores)
    return {"rows": len(rows), "tokens": tokens, "nll": total_nll / tokens if tokens else None,
            "perplexity": math.exp(total_nll / tokens) if tokens else None, "per_row": rows}
