"""Log-likelihood of chosen tokens under a model: the shared core of multiple-choice scoring and perplexity."""

from __future__ import annotations

from typing import Callable, Sequence


def target_logprobs(model, sequences: Sequence[Sequence[int]], targets: Sequence[Sequence[bool]], pad_id: int,
                    batch_size: int = 8, advance: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """For each sequence, (sum of log p(token | earlier tokens) over positions marked in ``targets``, count).

    Batches are right-padded and sorted by length (fewer pad tokens); results come back in input order. Only the
    positions that predict a target token go through the LM head, in chunks, so the [tokens, vocab] logits of a
    large vocabulary are never built.
    """
    import torch

    from zhiling.models.lm import body_hidden, default_chunk_size, head_logits, head_parts

    parts = head_parts(model)
    head_rows = default_chunk_size(int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32000))

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            wanted = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, index in enumerate(chunk):
                seq = list(sequences[index])
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                flags = list(targets[index])
                if flags and flags[0]:
                    raise ValueError("the first token has no context to be predicted from")
                wanted[row, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
            # position p predicts token p+1: keep the logits of positions whose next token is a target
            predict = torch.zeros_like(wanted)
            predict[:, :-1] = wanted[:, 1:]
            rows, cols = predict.nonzero(as_tuple=True)
            if len(rows) == 0:
                for index in chunk:
                    results[index] = (0.0, 0)
                continue
            next_ids = ids[rows, cols + 1].to(device)
            if parts is None:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logits = logits[rows.to(device), cols.to(device)]
                chosen = torch.log_softmax(logits.float(), -1).gather(1, next_ids.unsqueeze(1)).squeeze(1).cpu()
            else:
                hidden = body_hidden(parts, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
                hidden = hidden[rows.to(device), cols.to(device)]
                chosen = torch.cat([
                    torch.log_softmax(head_logits(parts, hidden[i:i + head_rows]), -1)
                    .gather(1, next_ids[i:i + head_rows].unsqueeze(1)).squeeze(1)
                    for i in range(0, hidden.shape[0], head_rows)]).cpu()
            sums = torch.zeros(len(chunk))
            counts = torch.zeros(len(chunk), dtype=torch.long)
            sums.index_add_(0, rows, chosen)
            counts.index_add_(0, rows, torch.ones_like(rows))
            for row, index in enumerate(chunk):
                results[index] = (float(sums[row]), int(counts[row]))
            if advance is not None:
                advance(len(chunk))
    return results
