"""Length statistics of a dataset: rows, turns, characters and tokens of prompts and answers, rows over the cutoff,
duplicates, and a histogram PNG."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Iterable

from zhiling.data.records import turns as record_turns

PERCENTILES = (25, 50, 75, 90)


def describe(values: list[float]) -> dict:
    """count / mean / std / min / 25 / 50 / 75 / 90 / max (linear interpolation between ranks)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    mean = sum(ordered) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in ordered) / n)

    def pct(q: float) -> float:
        pos = (n - 1) * q / 100
        low = math.floor(pos)
        high = min(low + 1, n - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    out = {"count": n, "mean": mean, "std": std, "min": ordered[0]}
    out.update({str(q): pct(q) for q in PERCENTILES})
    out["max"] = ordered[-1]
    return out


@dataclass
class LengthStats:
    rows: int = 0
    turns: list[int] = field(default_factory=list)
    prompt_chars: list[int] = field(default_factory=list)
    response_chars: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    total_tokens: list[int] = field(default_factory=list)
    duplicates: int = 0
    cutoff: int | None = None

    @property
    def over_cutoff(self) -> int | None:
        if self.cutoff is None or not self.total_tokens:
            return None
        return sum(1 for t in self.total_tokens if t > self.cutoff)

    def summary(self) -> dict:
        out = {"rows": self.rows, "duplicates": self.duplicates, "turns": describe(self.turns),
               "prompt_chars": describe(self.prompt_chars), "response_chars": describe(self.response_chars)}
        if self.total_tokens:
            out.update({"prompt_tokens": describe(self.prompt_tokens),
                        "response_tokens": describe(self.response_tokens),
                        "total_tokens": describe(self.total_tokens)})
            if self.cutoff is not None:
                out["cutoff_len"] = self.cutoff
                out["over_cutoff"] = self.over_cutoff
        return out


def collect(records: Iterable[dict], tokenizer=None, template=None, cutoff: int | None = None) -> LengthStats:
    """Prompt = system + user turns (and earlier answers, as the model sees them); response = assistant answers.
    Token counts use the template's pieces, so they are exactly what training sees before cutting."""
    stats = LengthStats(cutoff=cutoff)
    seen: set[bytes] = set()
    for record in records:
        stats.rows += 1
        pairs = record_turns(record)
        stats.turns.append(len(pairs))
        system = record.get("system") or ""
        stats.prompt_chars.append(len(system) + sum(len(u) for u, _ in pairs))
        stats.response_chars.append(sum(len(a or "") for _, a in pairs))
        key = hashlib.sha1(json.dumps([system, record["messages"]], ensure_ascii=False, sort_keys=True)
                           .encode("utf-8")).digest()
        if key in seen:
            stats.duplicates += 1
        seen.add(key)
        if tokenizer is not None and template is not None:
            pieces = template.encode(tokenizer, system or None, pairs)
            prompt = sum(len(p) for p, _ in pieces)
            response = sum(len(a) for _, a in pieces)
            stats.prompt_tokens.append(prompt)
            stats.response_tokens.append(response)
            stats.total_tokens.append(prompt + response)
    return stats


def plot_histogram(stats: LengthStats, path: str, title: str = "") -> str:
    """Histograms of prompt and response lengths (tokens when known, else characters), with the cutoff marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = bool(stats.total_tokens)
    unit = "tokens" if tokens else "characters"
    series = ([("prompt", stats.prompt_tokens), ("response", stats.response_tokens), ("total", stats.total_tokens)]
              if tokens else [("prompt", stats.prompt_chars), ("response", stats.response_chars)])
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6))
    for ax, (name, values) in zip(axes, series):
        low, high = min(values), max(values)
        bins = [x - 0.5 for x in range(low, high + 2)] if high - low <= 60 else 50  # one bar per length when few
        ax.hist(values, bins=bins, color="#3b7dd8", edgecolor="white")
        ax.set_title(f"{name} length")
        ax.set_xlabel(unit)
        ax.set_ylabel("rows")
        if tokens and name == "total" and stats.cutoff:
            ax.axvline(stats.cutoff, color="#d83b3b", linestyle="--", label=f"cutoff {stats.cutoff}")
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
