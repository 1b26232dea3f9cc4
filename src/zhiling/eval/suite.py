"""The judged category suite: loading it, exporting its prompts for ``zhiling predict``, and collecting each
system's answers (from prediction files, or straight from a ``generate`` callable).

A suite file is jsonl, one prompt per line::

    {"id": "culture-04", "category": "culture", "prompt": "上联是“海阔凭鱼跃”，请对出下联。", "reference": "天高任鸟飞"}

``reference`` is optional (a model answer or the points a good answer must contain; the judge sees it).
The bundled suite (``zhiling/resources/eval/judge_suite.jsonl``) has 9 categories x 10 Chinese prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from zhiling.data.reader import iter_jsonl
from zhiling.data.records import get_str, type_name
from zhiling.errors import DataError, ZhilingError
from zhiling.eval.predictions import PredictionFile
from zhiling.paths import resources_dir

BUNDLED = "bundled"
SUITE_SOURCE = "zhiling-judge-suite"
CATEGORY_TITLES = {
    "knowledge": "知识问答", "translation": "翻译", "writing": "写作", "sentiment": "情感分析",
    "reading": "阅读理解", "culture": "语言与文化", "code": "代码", "safety": "安全与拒答", "math": "数学",
}


@dataclass(frozen=True)
class SuiteItem:
    id: str
    category: str
    prompt: str
    reference: str | None = None


def category_title(category: str) -> str:
    title = CATEGORY_TITLES.get(category)
    return f"{category} ({title})" if title else category


def bundled_suite_path() -> Path:
    return resources_dir() / "eval" / "judge_suite.jsonl"


def load_suite(source: str | Path = BUNDLED, categories: Sequence[str] | None = None,
               limit: int | None = None) -> list[SuiteItem]:
    """Read a suite (``"bundled"`` or a jsonl path); optionally keep some categories and the first ``limit``
    prompts of each."""
    path = bundled_suite_path() if str(source) == BUNDLED else Path(source)
    items: list[SuiteItem] = []
    seen: dict[str, int] = {}
    for row in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        value = row.value
        try:
            if not isinstance(value, dict):
                raise DataError(f"expected a JSON object, got {type_name(value)}")
            item = SuiteItem(get_str(value, "id"), get_str(value, "category"), get_str(value, "prompt"),
                             get_str(value, "reference", required=False) or None)
        except DataError as err:
            raise err.located(str(path), row.line) from None
        if item.id in seen:
            raise DataError(f"duplicate id {item.id!r} (first on line {seen[item.id]})", str(path), row.line, "id")
        seen[item.id] = row.line
        items.append(item)
    if categories:
        known = {item.category for item in items}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ZhilingError(f"--categories: {', '.join(unknown)} not in the suite (it has: "
                               f"{', '.join(sorted(known))})")
        items = [item for item in items if item.category in categories]
    if limit is not None:
        if limit < 1:
            raise ZhilingError("--limit must be at least 1")
        counts: dict[str, int] = {}
        kept = []
        for item in items:
            counts[item.category] = counts.get(item.category, 0) + 1
            if counts[item.category] <= limit:
                kept.append(item)
        items = kept
    return items


def suite_records(items: Sequence[SuiteItem]) -> list[dict]:
    """The suite as canonical prompt-only records (one user turn), the input ``zhiling predict`` reads."""
    return [{"id": item.id, "system": "", "messages": [{"role": "user", "content": item.prompt}],
             "source": SUITE_SOURCE, "category": item.category} for item in items]


def write_suite_prompts(items: Sequence[SuiteItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in suite_records(items):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@dataclass
class SystemAnswers:
    """One system's answers to the suite, by suite id, plus warnings worth showing the user."""

    name: str
    answers: dict[str, str]
    source: str
    warnings: list[str]


def _same_prompt(suite_prompt: str, row_prompt: str) -> bool:
    row = row_prompt.strip()
    return row == suite_prompt.strip() or row == f"user: {suite_prompt}".strip()


def answers_from_predictions(name: str, predictions: PredictionFile, items: Sequence[SuiteItem]) -> SystemAnswers:
    """Match a prediction file to the suite by id; every suite id must be answered."""
    by_id = predictions.by_id()
    missing = [item.id for item in items if item.id not in by_id]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"system '{name}' has no answer for {len(missing)} suite prompt(s): {shown} "
                        f"(answer the prompts from `zhiling eval suite-prompts`)", predictions.path)
    warnings = []
    changed = [item.id for item in items if not _same_prompt(item.prompt, by_id[item.id].prompt)]
    if changed:
        warnings.append(f"{name}: {len(changed)} answer(s) were made for a different prompt text than the suite's "
                        f"(first: {changed[0]}, line {by_id[changed[0]].line}); is the file from another suite?")
    ids = {item.id for item in items}
    extra = [row.id for row in predictions.rows if row.id not in ids]
    if extra:
        warnings.append(f"{name}: {len(extra)} row(s) are not in the suite and are not judged (first: {extra[0]})")
    return SystemAnswers(name, {item.id: by_id[item.id].output for item in items}, predictions.path, warnings)


def answers_from_generate(name: str, items: Sequence[SuiteItem],
                          generate: Callable[[list[str]], list[str]]) -> SystemAnswers:
    """The seam for judging a model directly: ``generate(prompts) -> answers``, one answer per prompt."""
    prompts = [item.prompt for item in items]
    answers = list(generate(prompts))
    if len(answers) != len(prompts):
        raise ZhilingError(f"system '{name}': generate returned {len(answers)} answers for {len(prompts)} prompts")
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ZhilingError(f"system '{name}': answer {index + 1} is a {type_name(answer)}, expected a string")
    return SystemAnswers(name, {item.id: answer for item, answer in zip(items, answers)}, "generate", [])
