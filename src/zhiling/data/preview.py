"""Show exactly which tokens a training run learns from: rows rendered through the template, trained spans marked.

In a terminal, trained tokens are shown in colour; when the output is piped, trained spans are wrapped in
``[[`` and ``]]`` so the result can be read or diffed as plain text.
"""

from __future__ import annotations

from typing import Iterable

from zhiling.data.tokenize import IGNORE_INDEX, TokenizeOptions, build_example

OPEN, CLOSE = "[[", "]]"


def spans(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Runs of consecutive tokens that are all trained or all masked."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def render_marked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Plain text with trained spans in [[ ]]."""
    return "".join(f"{OPEN}{tokenizer.decode(ids)}{CLOSE}" if trained else tokenizer.decode(ids)
                   for trained, ids in spans(input_ids, labels))


def preview_rows(records: Iterable[dict], tokenizer, template, options: TokenizeOptions, limit: int):
    """(record, example) for the first ``limit`` records, built by the same code as training."""
    for index, record in enumerate(records):
        if index >= limit:
            break
        yield record, build_example(template, tokenizer, record, options)


def print_preview(console, records: Iterable[dict], tokenizer, template, options: TokenizeOptions, limit: int,
                  color: bool) -> int:
    from rich.text import Text

    shown = 0
    for record, example in preview_rows(records, tokenizer, template, options, limit):
        shown += 1
        trained = sum(1 for label in example["labels"] if label != IGNORE_INDEX)
        header = (f"── row {shown} ({record.get('id') or 'no id'}): {example['length']} tokens, {trained} trained"
                  + (f", cut from {example['full_length']}" if example["truncated"] else "") + " ──")
        console.print(header, style="bold" if color else None, markup=False, highlight=False)
        if color:
            text = Text()
            for is_trained, ids in spans(example["input_ids"], example["labels"]):
                text.append(tokenizer.decode(ids), style="black on green" if is_trained else "dim")
            console.print(text, highlight=False)
        else:
            console.print(render_marked(tokenizer, example["input_ids"], example["labels"]), markup=False,
                          highlight=False)
        console.print()
    if color:
        console.print("[black on green] trained [/] tokens are learned; [dim]dim[/] tokens are context only.")
    else:
        console.print(f"Text inside {OPEN} {CLOSE} is trained; the rest is context only.", markup=False)
    return shown
