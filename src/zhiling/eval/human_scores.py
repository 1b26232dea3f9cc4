"""Scores given by people, set beside the judge's scores with their agreement per category.

A human score file is CSV (with a header) or JSON lines (``.jsonl``); each row is one of

* a score for one prompt: ``id`` (the suite id) or ``category`` + ``index`` (the prompt's place in its category,
  counting from 1; for a folder suite, its place in the file), ``system``, ``score`` (0-10), optional ``rater``;
* a total for a category, the way DreamerGPT published its results (10 prompts x 0-10 per category and model):
  ``category``, ``system``, ``total``, ``count`` (how many prompts the total covers), optional ``rater``.

Several raters of the same prompt (or category) are averaged. A category's human score is the mean over its scored
prompts, or ``total / count``. Agreement is Spearman's rank correlation (average ranks for ties) between judge and
human: over the systems' category means, and over the (prompt, system) pairs both scored; with its ``n``, and no
value where ``n < 2`` or one side gives every pair the same score.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Iterator, Sequence

from zhiling.data.reader import iter_jsonl
from zhiling.data.records import type_name
from zhiling.errors import DataError
from zhiling.eval.suite import SuiteItem, category_title
from zhiling.eval.tables import Table

COLUMNS = ("id", "category", "index", "system", "score", "total", "count", "rater")
MAX_SCORE = 10


@dataclass(frozen=True)
class PromptScore:
    line: int
    id: str
    category: str
    system: str
    score: float
    rater: str


@dataclass(frozen=True)
class CategoryTotal:
    line: int
    category: str
    system: str
    total: float
    count: int
    rater: str


@dataclass
class HumanScores:
    path: str
    scores: list[PromptScore] = field(default_factory=list)
    totals: list[CategoryTotal] = field(default_factory=list)

    @property
    def raters(self) -> list[str]:
        return sorted({row.rater for row in [*self.scores, *self.totals] if row.rater})


# --------------------------------------------------------------------------------------------------- reading


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) pairs; empty CSV cells are left out, so a row holds only what it gives."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if not path.is_file():
            raise DataError("no such file", str(path))
        with path.open(encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: a spreadsheet's BOM
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise DataError("the file is empty (expected a header line, e.g. id,system,score,rater)", str(path))
            header = [name.strip() for name in reader.fieldnames]
            unknown = [name for name in header if name not in COLUMNS]
            if unknown:
                raise DataError(f"unknown column(s) {', '.join(map(repr, unknown))} in the header (columns: "
                                f"{', '.join(COLUMNS)})", str(path), 1)
            reader.fieldnames = header
            for row in reader:
                if None in row:
                    raise DataError(f"more cells than the {len(header)} columns of the header", str(path),
                                    reader.line_num)
                cells = {key: value.strip() for key, value in row.items() if value is not None and value.strip()}
                if cells:
                    yield reader.line_num, cells
    elif suffix == ".jsonl":
        for row in iter_jsonl(path):
            if isinstance(row, DataError):
                raise row
            if not isinstance(row.value, dict):
                raise DataError(f"expected a JSON object, got {type_name(row.value)}", row.path, row.line)
            unknown = [key for key in row.value if key not in COLUMNS]
            if unknown:
                raise DataError(f"unknown field(s) {', '.join(map(repr, unknown))} (fields: {', '.join(COLUMNS)})",
                                row.path, row.line, unknown[0])
            yield row.line, {key: value for key, value in row.value.items() if value is not None and value != ""}
    else:
        raise DataError("expected a .csv or .jsonl file of human scores", str(path))


def _text(row: dict, key: str) -> str:
    value = row[key]
    if isinstance(value, (dict, list, bool)):
        raise DataError(f"expected text, got {type_name(value)}", field=key)
    return str(value).strip()


def _number(row: dict, key: str) -> float:
    value = row[key]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"expected a number, got {row[key]!r}", field=key) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(f"expected a number, got {json.dumps(row[key], ensure_ascii=False)}", field=key)
    return float(value)


def _whole(row: dict, key: str) -> int:
    value = _number(row, key)
    if value != int(value) or value < 1:
        raise DataError(f"expected a whole number of at least 1, got {row[key]!r}", field=key)
    return int(value)


def _reject(row: dict, keys: Sequence[str], why: str) -> None:
    for key in keys:
        if key in row:
            raise DataError(f"{key!r} does not belong in {why}", field=key)


class _Suite:
    """The ids and categories of the whole suite (not only the part judged in this run)."""

    def __init__(self, items: Sequence[SuiteItem]):
        self.ids = {item.id: item for item in items}
        self.by_category: dict[str, list[SuiteItem]] = {}
        for item in items:
            self.by_category.setdefault(item.category, []).append(item)

    def category(self, row: dict) -> str:
        category = _text(row, "category")
        if category not in self.by_category:
            raise DataError(f"unknown category {category!r} (the suite has: {', '.join(self.by_category)})",
                            field="category")
        return category

    def item(self, row: dict) -> SuiteItem:
        if "id" in row:
            if "category" in row or "index" in row:
                raise DataError("give 'id' or 'category' + 'index', not both", field="id")
            item_id = _text(row, "id")
            if item_id not in self.ids:
                raise DataError(f"unknown id {item_id!r}: not in the suite", field="id")
            return self.ids[item_id]
        if "category" not in row or "index" not in row:
            raise DataError("a score needs 'id', or 'category' and 'index'", field="index" if "category" in row
                            else "id")
        items = self.by_category[self.category(row)]
        index = _whole(row, "index")
        if index > len(items):
            raise DataError(f"index {index} is past the end: category {items[0].category!r} has {len(items)} "
                            "prompt(s), counted from 1", field="index")
        return items[index - 1]


def read_human_scores(path: str | Path, suite: Sequence[SuiteItem], systems: Sequence[str]) -> HumanScores:
    """Read and check a human score file against the whole suite and the systems being judged."""
    path = Path(path)
    known = _Suite(suite)
    result = HumanScores(str(path))
    seen: dict[tuple, int] = {}
    kinds: dict[tuple[str, str], tuple[str, int]] = {}  # (category, system) -> ("score" | "total", first line)
    for line, row in _rows(path):
        try:
            if "system" not in row:
                raise DataError("missing 'system' (the name given to --answers)", field="system")
            system = _text(row, "system")
            if system not in systems:
                raise DataError(f"unknown system {system!r} (judged here: {', '.join(systems)})", field="system")
            rater = _text(row, "rater") if "rater" in row else ""
            if "score" in row:
                _reject(row, ("total", "count"), "a per-prompt score row")
                item = known.item(row)
                score = _number(row, "score")
                if not 0 <= score <= MAX_SCORE:
                    raise DataError(f"score {row['score']} is out of range 0-{MAX_SCORE}", field="score")
                entry: PromptScore | CategoryTotal = PromptScore(line, item.id, item.category, system, score, rater)
                key, kind, what = ("score", item.id, system, rater), "score", f"prompt {item.id}"
            elif "total" in row:
                _reject(row, ("id", "index"), "a category total row")
                if "category" not in row or "count" not in row:
                    raise DataError("a category total needs 'category', 'total' and 'count'",
                                    field="count" if "category" in row else "category")
                category = known.category(row)
                total, count = _number(row, "total"), _whole(row, "count")
                if not 0 <= total <= MAX_SCORE * count:
                    raise DataError(f"total {row['total']} is out of range 0-{MAX_SCORE * count} "
                                    f"({count} prompt(s) x 0-{MAX_SCORE})", field="total")
                entry = CategoryTotal(line, category, system, total, count, rater)
                key, kind, what = ("total", category, system, rater), "total", f"category {category!r}"
            else:
                raise DataError("a row needs 'score' (one prompt) or 'total' + 'count' (a category)", field="score")
            if key in seen:
                by = f" by rater {rater!r}" if rater else ""
                raise DataError(f"{what}, system {system!r}{by} is scored again (first on line {seen[key]})",
                                field=kind)
            seen[key] = line
            first = kinds.setdefault((entry.category, system), (kind, line))
            if first[0] != kind:
                raise DataError(f"category {entry.category!r}, system {system!r} has both per-prompt scores and a "
                                f"total (line {first[1]}): give one or the other", field=kind)
        except DataError as err:
            raise err.located(str(path), line) from None
        (result.scores if kind == "score" else result.totals).append(entry)  # type: ignore[arg-type]
    if not result.scores and not result.totals:
        raise DataError("the file has no scores", str(path))
    return result


# --------------------------------------------------------------------------------------------------- agreement


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when n < 2 or a side is constant."""
    if len(xs) != len(ys):
        raise ValueError("spearman needs two sequences of the same length")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = fmean(rx), fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def _agreement(pairs: Sequence[tuple[float, float]]) -> dict:
    return {"rho": spearman([a for a, _ in pairs], [b for _, b in pairs]), "n": len(pairs)}


def compare_with_judge(human: HumanScores, rows: Sequence[dict], board: dict, systems: Sequence[str]) -> dict:
    """Human means beside the judge's, per category and system, with Spearman agreement (for summary.json).

    ``rows`` are the judged rows (id, category, status, scores) and ``board`` the judge leaderboard. Human scores
    for prompts or categories this run did not judge (``--categories`` / ``--limit``) are counted as ``ignored``."""
    judged = {row["id"]: row for row in rows}
    per_prompt: dict[tuple[str, str], list[float]] = {}
    ignored = 0
    for entry in human.scores:
        if entry.id not in judged:
            ignored += 1
            continue
        per_prompt.setdefault((entry.id, entry.system), []).append(entry.score)
    prompt_means = {key: fmean(values) for key, values in per_prompt.items()}
    totals: dict[tuple[str, str], list[float]] = {}
    for total in human.totals:
        if total.category not in board["categories"]:
            ignored += 1
            continue
        totals.setdefault((total.category, total.system), []).append(total.total / total.count)

    categories: dict[str, dict] = {}
    all_cells: list[tuple[float, float]] = []
    all_pairs: list[tuple[float, float]] = []
    for category, cells in board["categories"].items():
        ids = [row["id"] for row in rows if row["category"] == category]
        shown: dict[str, dict] = {}
        cell_pairs, prompt_pairs = [], []
        for system in systems:
            scored = [prompt_means[(i, system)] for i in ids if (i, system) in prompt_means]
            if scored:
                mean, n, source = fmean(scored), len(scored), "prompts"
            elif (category, system) in totals:
                mean, n, source = fmean(totals[(category, system)]), None, "total"
            else:
                mean, n, source = None, 0, None
            judge_mean = cells[system]["mean"]
            shown[system] = {"judge": judge_mean, "human": mean, "human_prompts": n, "from": source}
            if mean is not None and judge_mean is not None:
                cell_pairs.append((judge_mean, mean))
            for item_id in ids:
                row = judged[item_id]
                if row["status"] == "ok" and (item_id, system) in prompt_means:
                    prompt_pairs.append((row["scores"][system], prompt_means[(item_id, system)]))
        if any(cell["human"] is not None for cell in shown.values()):
            categories[category] = {"systems": shown, "over_systems": _agreement(cell_pairs),
                                    "over_prompts": _agreement(prompt_pairs)}
            all_cells += cell_pairs
            all_pairs += prompt_pairs
    return {"file": human.path, "raters": human.raters, "ignored": ignored, "categories": categories,
            "all": {"over_cells": _agreement(all_cells), "over_prompts": _agreement(all_pairs)}}


def human_rows(human: HumanScores, rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """id -> {system: human score (raters averaged)} for the judged rows that people scored."""
    collected: dict[str, dict[str, list[float]]] = {}
    ids = {row["id"] for row in rows}
    for entry in human.scores:
        if entry.id in ids:
            collected.setdefault(entry.id, {}).setdefault(entry.system, []).append(entry.score)
    return {item_id: {system: fmean(values) for system, values in by.items()} for item_id, by in collected.items()}


# --------------------------------------------------------------------------------------------------- display


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rho(agreement: dict) -> str:
    rho = agreement["rho"]
    return f"{'-' if rho is None else f'{rho:+.2f}'} (n={agreement['n']})"


def human_table(comparison: dict, systems: Sequence[str]) -> Table:
    """Judge and human means side by side per category, with the rank correlation between them."""
    columns = ["category"]
    for system in systems:
        columns += [f"{system} judge", f"{system} human"]
    table = Table("Human vs judge (0-10, mean per category)", [*columns, "ρ over systems", "ρ over prompts"],
                  note="human = mean of the people's per-prompt scores (raters averaged), or total / count; ρ = "
                       "Spearman rank correlation of judge and human over the systems' category means, and over "
                       "the (prompt, system) pairs both scored; '-' where n < 2 or one side is constant. The last "
                       "row: over every (category, system) mean, and every pair."
                       + (f" Raters: {', '.join(comparison['raters'])}." if comparison["raters"] else "")
                       + (f" {comparison['ignored']} human score row(s) are for prompts not judged in this run."
                          if comparison["ignored"] else ""))
    for category, entry in comparison["categories"].items():
        cells = []
        for system in systems:
            cell = entry["systems"][system]
            human = _num(cell["human"]) + (" (total)" if cell["from"] == "total" else "")
            cells += [_num(cell["judge"]), human]
        table.add(category_title(category), *cells, _rho(entry["over_systems"]), _rho(entry["over_prompts"]))
    overall = comparison["all"]
    table.add("all categories", *["" for _ in systems for _ in (0, 1)], _rho(overall["over_cells"]),
              _rho(overall["over_prompts"]))
    return table
