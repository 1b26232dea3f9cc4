"""The judged category suite: loading it, exporting its prompts for ``zhiling predict``, and collecting each
system's answers (from prediction files, or straight from a ``generate`` callable).

A suite file is jsonl, one prompt per line::

    {"id": "culture-04", "category": "culture", "prompt": "上联是“海阔凭鱼跃”，请对出下联。", "reference": "天高任鸟飞"}

``reference`` is optional (a model answer or the points a good answer must contain; the judge sees it).
The bundled suite (``zhiling/resources/eval/judge_suite.jsonl``) has 9 categories x 10 Chinese prompts.

A suite can also be a folder laid out as DreamerGPT's ``test_data/`` is: one ``.json`` file per category, each a
JSON array of prompts (``01qa.json`` ... ``08alignment.json``). The category is the file name without its numeric
prefix (``01qa.json`` -> ``qa``, kept as written), and the n-th prompt of a file gets the id ``CATEGORY-NN``
(``qa-01``), so ids depend only on the file and the position in it. An element is a string, or an object with
``prompt`` or ``instruction`` (an ``input`` is joined to the instruction as in training data) and an optional
``reference`` (or ``output``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from zhiling.data.formats.alpaca import join_instruction
from zhiling.data.reader import iter_json_array, iter_jsonl
from zhiling.data.records import get_str, type_name
from zhiling.errors import DataError, ZhilingError
from zhiling.eval.predictions import PredictionFile
from zhiling.paths import resources_dir

BUNDLED = "bundled"
SUITE_SOURCE = "zhiling-judge-suite"
CATEGORY_TITLES = {
    "knowledge": "知识问答", "translation": "翻译", "writing": "写作", "sentiment": "情感分析",
    "reading": "阅读理解", "culture": "语言与文化", "code": "代码", "safety": "安全与拒答", "math": "数学",
    # DreamerGPT's test_data/ categories, with the names its README gives them
    "qa": "知识问答", "translate": "翻译", "generate": "文本生成", "analyse": "情感分析", "understanding": "阅读理解",
    "chinese": "中文特色", "alignment": "伦理、拒答类",
}
_NUMBER_PREFIX = re.compile(r"^\d+[-_. ]*")


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
    """Read a suite (``"bundled"``, a jsonl path or a folder of per-category JSON arrays); optionally keep some
    categories and the first ``limit`` prompts of each."""
    path = bundled_suite_path() if str(source) == BUNDLED else Path(source)
    return _select(_read_folder(path) if path.is_dir() else _read_jsonl(path), categories, limit)


def folder_category(path: Path) -> str:
    """``01qa.json`` -> ``qa``: the file name without its extension and numeric prefix, as written."""
    return _NUMBER_PREFIX.sub("", path.stem)


def _read_folder(folder: Path) -> list[SuiteItem]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".json")
    if not files:
        raise DataError("the folder has no .json files (a folder suite holds one JSON array of prompts per "
                        "category, e.g. 01qa.json)", str(folder))
    owner: dict[str, Path] = {}
    items: list[SuiteItem] = []
    for path in files:
        category = folder_category(path)
        if not category:
            raise DataError("the file name is only a number: the category comes from the name without its numeric "
                            "prefix (e.g. 01qa.json -> qa)", str(path))
        if category in owner:
            raise DataError(f"category {category!r} again (also from {owner[category].name}): each category is one "
                            "file", str(path))
        owner[category] = path
        items += _read_category_file(path, category)
    return items


def _read_category_file(path: Path, category: str) -> list[SuiteItem]:
    items = []
    try:
        rows = list(iter_json_array(path))
    except DataError as err:
        raise DataError(f"{err.reason} (a folder suite file is one JSON array of prompts)", err.path, err.line,
                        err.field) from None
    for number, row in enumerate(rows, start=1):
        if isinstance(row, DataError):
            raise row
        try:
            prompt, reference = _element(row.value)
        except DataError as err:
            raise DataError(f"item {number} of the array: {err.reason}", str(path), row.line, err.field) from None
        items.append(SuiteItem(f"{category}-{number:02d}", category, prompt, reference))
    return items


def _element(value) -> tuple[str, str | None]:
    """(prompt, reference) of one array element: a string, or an object with prompt / instruction."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("the prompt is empty")
        return value, None
    if not isinstance(value, dict):
        raise DataError(f"expected a prompt string or an object with 'prompt' or 'instruction', "
                        f"got {type_name(value)}")
    keys = [key for key in ("prompt", "instruction") if key in value]
    if len(keys) != 1:
        raise DataError("an object needs exactly one of 'prompt' or 'instruction' (has: "
                        f"{', '.join(map(str, value)) or 'no fields'})", field="prompt")
    prompt = get_str(value, keys[0])
    if keys[0] == "instruction":
        prompt = join_instruction(prompt, get_str(value, "input", required=False))
    refs = [key for key in ("reference", "output") if value.get(key) is not None]
    if len(refs) > 1:
        raise DataError("give 'reference' or 'output', not both", field="output")
    reference = get_str(value, refs[0], required=False) if refs else ""
    return prompt, reference or None


def _read_jsonl(path: Path) -> list[SuiteItem]:
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
    return items


def _select(items: list[SuiteItem], categories: Sequence[str] | None, limit: int | None) -> list[SuiteItem]:
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
