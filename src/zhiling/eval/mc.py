"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU style): reading, prompts, and scoring by log-likelihood.

Files
-----
One file per subject, CSV or jsonl. The subject is the file name without a split suffix
(``computer_network_val.csv`` -> ``computer_network``; CMMLU's ``test/anatomy.csv`` -> ``anatomy``).

* CSV with a header (C-Eval ``id,question,A,B,C,D,answer``; CMMLU ``,Question,A,B,C,D,Answer``): columns are found
  by name, case-insensitively (question / 题目; answer / 答案; single letters A, B, ... for options; other columns
  such as ``explanation`` are ignored).
* CSV without a header (MMLU ``question,A,B,C,D,answer``): the first column is the question, the last the
  answer, the ones between are the options.
* jsonl: ``{"question", "A", "B", ..., "answer": "B"}`` or ``{"question", "choices": [...], "answer": 1}``,
  optionally with ``subject`` and ``id``.

A ``subject_mapping.json`` beside the files (C-Eval's layout: ``{"subject": [English name, Chinese name,
category]}``) gives readable subject names for the prompt and a category for the per-category averages.

Prompts and scoring
-------------------
Chinese (C-Eval style): ``以下是关于{subject}的单项选择题，请选出正确答案。`` then each question with its options
and ``答案：``; English (MMLU style): ``The following are multiple choice questions (with answers) about
{subject}.`` with ``Answer:``. Few-shot examples come first, each followed by its answer. ``lang="auto"`` picks
Chinese when the question has a CJK character.

The model part is one callable, ``score_options(prompts, options) -> log-likelihoods``: for each prompt, the
summed log-probability of each option continuation. Letter scoring asks for the letters (``"A"`` after
``答案：``, ``" A"`` after ``Answer:``); text scoring asks for the option texts and divides each by its length
in characters (so long options are not penalized for being long). The highest score wins; a tie goes to the
earlier option.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Callable, Sequence

from zhiling.data.reader import check_file, iter_jsonl, read_json_object
from zhiling.data.records import type_name
from zhiling.errors import DataError, ZhilingError
from zhiling.eval.tables import Table
from zhiling.paths import resources_dir

ScoreOptions = Callable[[list[str], list[list[str]]], list[list[float]]]

SPLIT_SUFFIXES = ("_dev", "_val", "_validation", "_test", "_train")
MAPPING_FILE = "subject_mapping.json"
QUESTION_COLUMNS = ("question", "题目", "问题")
ANSWER_COLUMNS = ("answer", "答案", "label")
INSTRUCTION = {"zh": "以下是关于{subject}的单项选择题，请选出正确答案。",
               "en": "The following are multiple choice questions (with answers) about {subject}."}
ANSWER_CUE = {"zh": "答案：", "en": "Answer:"}
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass(frozen=True)
class Question:
    id: str
    subject: str
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text) in order
    answer: str
    path: str = ""
    line: int = 0

    @property
    def letters(self) -> list[str]:
        return [letter for letter, _ in self.options]


@dataclass
class Subject:
    name: str
    questions: list[Question]
    title_en: str = ""
    title_zh: str = ""
    category: str | None = None

    def title(self, lang: str) -> str:
        title = self.title_zh if lang == "zh" else self.title_en
        return title or self.name.replace("_", " ")


def bundled_sample_dir() -> Path:
    return resources_dir() / "eval" / "mc_sample"


def subject_from_path(path: Path) -> str:
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def _make_question(subject: str, qid: str, question: str, options: list[tuple[str, str]], answer,
                   path: str, line: int) -> Question:
    if not question.strip():
        raise DataError("is empty", path, line, "question")
    if len(options) < 2:
        raise DataError(f"a question needs at least 2 options, found {len(options)}", path, line)
    for letter, text in options:
        if not str(text).strip():
            raise DataError("option is empty", path, line, letter)
    letters = [letter for letter, _ in options]
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError("no answer (a test split without public answers cannot be scored; use dev/val)",
                        path, line, "answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise DataError(f"answer index {answer} is out of range for {len(options)} options", path, line, "answer")
        answer = letters[answer]
    answer = str(answer).strip().upper()
    if answer not in letters:
        raise DataError(f"answer {answer!r} is not one of the options {', '.join(letters)}", path, line, "answer")
    return Question(qid, subject, question.strip(), tuple((letter, str(text).strip()) for letter, text in options), answer,
                    path, line)


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, cells) for every non-blank CSV record."""
    text = path.read_bytes()
    try:
        decoded = text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = text.count(b"\n", 0, exc.start) + 1
        raise DataError("not valid UTF-8 (convert the file to UTF-8)", str(path), line) from None
    reader = csv.reader(io.StringIO(decoded, newline=""))
    rows, start = [], 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", str(path), reader.line_num) from None
    return rows


def _read_csv(path: Path, subject: str) -> list[Question]:
    rows = _csv_rows(path)
    if not rows:
        raise DataError("file has no rows", str(path))
    header = [cell.strip().lower() for cell in rows[0][1]]
    questions = []
    if any(name in QUESTION_COLUMNS for name in header):
        q_col = next(i for i, name in enumerate(header) if name in QUESTION_COLUMNS)
        a_cols = [i for i, name in enumerate(header) if name in ANSWER_COLUMNS]
        if not a_cols:
            raise DataError(f"no answer column (expected one of: {', '.join(ANSWER_COLUMNS)})", str(path), 1)
        option_cols = [(name.upper(), i) for i, name in enumerate(header) if len(name) == 1 and name.isalpha()]
        expected = _letters(len(option_cols))
        if [letter for letter, _ in option_cols] != expected:
            raise DataError(f"option columns must be A, B, C, ... in order, found "
                            f"{', '.join(l for l, _ in option_cols) or 'none'}", str(path), 1)
        id_col = header.index("id") if "id" in header else None
        for line, cells in rows[1:]:
            if len(cells) != len(header):
                raise DataError(f"has {len(cells)} columns, the header has {len(header)}", str(path), line)
            qid = cells[id_col].strip() if id_col is not None and cells[id_col].strip() else str(len(questions))
            options = [(letter, cells[i]) for letter, i in option_cols]
            questions.append(_make_question(subject, f"{subject}-{qid}", cells[q_col], options, cells[a_cols[0]],
                                            str(path), line))
    else:  # MMLU: no header
        width = len(rows[0][1])
        if width < 4:
            raise DataError(f"expected a header row or question,A,B,...,answer columns; found {width} column(s)",
                            str(path), rows[0][0])
        for line, cells in rows:
            if len(cells) != width:
                raise DataError(f"has {len(cells)} columns, the first row has {width}", str(path), line)
            options = list(zip(_letters(width - 2), cells[1:-1]))
            questions.append(_make_question(subject, f"{subject}-{len(questions)}", cells[0], options, cells[-1],
                                            str(path), line))
    return questions


def _read_jsonl(path: Path, subject: str) -> list[Question]:
    questions = []
    for row in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        value, line = row.value, row.line
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {type_name(value)}", str(path), line)
        question = value.get("question", value.get("Question"))
        if not isinstance(question, str):
            raise DataError("missing or not a string", str(path), line, "question")
        if "choices" in value:
            choices = value["choices"]
            if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
                raise DataError("expected an array of strings", str(path), line, "choices")
            options = list(zip(_letters(len(choices)), map(str, choices)))
        else:
            options = []
            for letter in _letters(26):
                if letter not in value:
                    break
                if not isinstance(value[letter], (str, int, float)):
                    raise DataError(f"expected a string, got {type_name(value[letter])}", str(path), line, letter)
                options.append((letter, str(value[letter])))
        answer = value.get("answer", value.get("Answer"))
        row_subject = value.get("subject") or subject
        if not isinstance(row_subject, str):
            raise DataError("expected a string", str(path), line, "subject")
        qid = value.get("id")
        qid = str(qid) if qid is not None else str(len(questions))
        questions.append(_make_question(row_subject, f"{row_subject}-{qid}", question, options, answer, str(path),
                                        line))
    return questions


def read_mc_file(path: str | Path) -> list[Question]:
    path = check_file(path)
    subject = subject_from_path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, subject)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, subject)
    raise DataError("expected a .csv or .jsonl file", str(path))


def _mapping(folder: Path) -> dict:
    path = folder / MAPPING_FILE
    if not path.exists():
        return {}
    mapping = read_json_object(path, expected="expected an object {subject: [English name, Chinese name, category]}")
    for key, value in mapping.items():
        if not (isinstance(value, list) and 1 <= len(value) <= 3 and all(isinstance(v, str) for v in value)):
            raise DataError("expected [English name, Chinese name, category]", str(path), field=key)
    return mapping


def read_mc(paths: Sequence[str | Path], subjects: Sequence[str] | None = None,
            limit: int | None = None) -> dict[str, Subject]:
    """Read files and folders (every .csv / .jsonl inside) into subjects, in name order."""
    files: list[Path] = []
    mappings: dict = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
            if not found:
                raise DataError("folder has no .csv or .jsonl files", str(path))
            files += found
            mappings.update(_mapping(path))
        else:
            files.append(path)
            mappings.update(_mapping(path.parent))
    result: dict[str, Subject] = {}
    for file in files:
        for question in read_mc_file(file):
            result.setdefault(question.subject, Subject(question.subject, [])).questions.append(question)
    for name, subject in result.items():
        names = mappings.get(name, [])
        subject.title_en = names[0] if len(names) > 0 else ""
        subject.title_zh = names[1] if len(names) > 1 else ""
        subject.category = names[2] if len(names) > 2 else None
        seen: dict[str, Question] = {}
        for question in subject.questions:
            if question.id in seen:
                first = seen[question.id]
                raise DataError(f"duplicate question id {question.id!r} (also {first.path}, line {first.line})",
                                question.path, question.line, "id")
            seen[question.id] = question
    if subjects:
        unknown = [s for s in subjects if s not in result]
        if unknown:
            raise ZhilingError(f"--subjects: {', '.join(unknown)} not found (have: {', '.join(sorted(result))})")
        result = {s: result[s] for s in subjects}
    if limit is not None:
        if limit < 1:
            raise ZhilingError("--limit must be at least 1")
        for subject in result.values():
            subject.questions = subject.questions[:limit]
    return dict(sorted(result.items()))


# --------------------------------------------------------------------------------------------------- prompts

def question_lang(question: Question, lang: str) -> str:
    if lang in ("zh", "en"):
        return lang
    if lang != "auto":
        raise ZhilingError(f"unknown prompt language {lang!r} (choose zh, en or auto)")
    return "zh" if _CJK.search(question.question) else "en"


def format_question(question: Question, lang: str, with_answer: bool = False) -> str:
    lines = [question.question] + [f"{letter}. {text}" for letter, text in question.options]
    text = "\n".join(lines) + "\n" + ANSWER_CUE[lang]
    return text + letter_continuation(question.answer, lang) if with_answer else text


def letter_continuation(letter: str, lang: str) -> str:
    return letter if lang == "zh" else f" {letter}"


def text_continuation(text: str, lang: str) -> str:
    return text if lang == "zh" else f" {text}"


def build_prompt(question: Question, subject: Subject, shots: Sequence[Question], lang: str) -> str:
    """Instruction, the few-shot examples with their answers, then the question up to the answer cue."""
    lang = question_lang(question, lang)
    parts = [INSTRUCTION[lang].format(subject=subject.title(lang))]
    parts += [format_question(shot, lang, with_answer=True) for shot in shots]
    parts.append(format_question(question, lang))
    return "\n\n".join(parts)


def pick_shots(question: Question, k: int, dev: Subject | None, pool: Subject) -> list[Question]:
    """The first ``k`` dev questions of the subject; without dev data, the first ``k`` other questions of the same
    subject (leave-one-out, so a question is never its own example)."""
    if k <= 0:
        return []
    source = dev.questions if dev is not None else [q for q in pool.questions if q.id != question.id]
    return source[:k]


# --------------------------------------------------------------------------------------------------- scoring

@dataclass
class MCResult:
    rows: list[dict]
    summary: dict = field(default_factory=dict)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _check_scores(scores, prompts: int, widths: list[int]) -> list[list[float]]:
    if not isinstance(scores, (list, tuple)) or len(scores) != prompts:
        raise ZhilingError(f"score_options returned {len(scores) if hasattr(scores, '__len__') else scores!r} "
                           f"rows for {prompts} prompts")
    checked = []
    for index, (row, width) in enumerate(zip(scores, widths)):
        row = [float(v) for v in row]
        if len(row) != width:
            raise ZhilingError(f"score_options returned {len(row)} scores for prompt {index + 1}, "
                               f"which has {width} options")
        if any(math.isnan(v) for v in row):
            raise ZhilingError(f"score_options returned NaN for prompt {index + 1}")
        checked.append(row)
    return checked


def evaluate_mc(subjects: dict[str, Subject], score_options: ScoreOptions, *, shots: int = 0,
                dev: dict[str, Subject] | None = None, lang: str = "auto", option_text: bool = False,
                batch_size: int = 16, progress: Callable[[int], None] | None = None) -> MCResult:
    """Score every question by letter log-likelihood (and by option text when asked); per-subject accuracy."""
    if dev is not None:
        missing = [name for name in subjects if name not in dev] if shots else []
        if missing:
            raise ZhilingError(f"--dev has no questions for subject(s) {', '.join(missing)}")
    jobs = []
    for name, subject in subjects.items():
        for question in subject.questions:
            chosen = pick_shots(question, shots, dev.get(name) if dev else None, subject)
            if shots and len(chosen) < shots:
                raise ZhilingError(f"subject {name}: {shots}-shot needs {shots} example questions, "
                                   f"only {len(chosen)} available")
            qlang = question_lang(question, lang)
            jobs.append((question, build_prompt(question, subject, chosen, qlang), qlang))
    rows = []
    for start in range(0, len(jobs), max(1, batch_size)):
        batch = jobs[start:start + batch_size]
        prompts = [prompt for _, prompt, _ in batch]
        letters = [[letter_continuation(letter, qlang) for letter in q.letters] for q, _, qlang in batch]
        letter_scores = _check_scores(score_options(prompts, letters), len(batch), [len(x) for x in letters])
        text_scores = None
        if option_text:
            texts = [[text_continuation(t, qlang) for _, t in q.options] for q, _, qlang in batch]
            raw = _check_scores(score_options(prompts, texts), len(batch), [len(x) for x in texts])
            text_scores = [[v / max(1, len(t.strip())) for v, t in zip(r, ts)] for r, ts in zip(raw, texts)]
        for index, (question, prompt, qlang) in enumerate(batch):
            guess = question.letters[_argmax(letter_scores[index])]
            row = {"id": question.id, "subject": question.subject, "prompt": format_question(question, qlang),
                   "output": guess, "reference": question.answer, "score": float(guess == question.answer),
                   "scores": {"accuracy": float(guess == question.answer)},
                   "logprobs": dict(zip(question.letters, letter_scores[index])), "shots": shots}
            if text_scores is not None:
                text_guess = question.letters[_argmax(text_scores[index])]
                row["output_text"] = text_guess
                row["scores"]["accuracy_text"] = float(text_guess == question.answer)
                row["text_scores"] = dict(zip(question.letters, text_scores[index]))
            rows.append(row)
        if progress:
            progress(len(batch))
    return MCResult(rows, summarize_mc(rows, subjects, option_text))


def summarize_mc(rows: Sequence[dict], subjects: dict[str, Subject], option_text: bool = False) -> dict:
    """Accuracy per subject, overall (micro over questions), macro (mean of subjects) and per category."""
    keys = ["accuracy"] + (["accuracy_text"] if option_text else [])
    per_subject: dict[str, dict] = {}
    for name, subject in subjects.items():
        mine = [r for r in rows if r["subject"] == name]
        entry = {"questions": len(mine), "category": subject.category, "title": subject.title("zh")}
        for key in keys:
            entry[key] = fmean(r["scores"][key] for r in mine) if mine else None
        per_subject[name] = entry
    overall = {"questions": len(rows)}
    for key in keys:
        overall[key] = fmean(r["scores"][key] for r in rows) if rows else None
        values = [e[key] for e in per_subject.values() if e[key] is not None]
        overall[f"macro_{key}"] = fmean(values) if values else None
    categories: dict[str, dict] = {}
    for name, entry in per_subject.items():
        if entry["category"]:
            categories.setdefault(entry["category"], {"subjects": []})["subjects"].append(name)
    for category, entry in categories.items():
        for key in keys:
            values = [per_subject[s][key] for s in entry["subjects"] if per_subject[s][key] is not None]
            entry[key] = fmean(values) if values else None
    return {"overall": overall, "subjects": per_subject, "categories": categories}


def mc_tables(summary: dict) -> list[Table]:
    text = "accuracy_text" in summary["overall"]
    columns = ["subject", "questions", "accuracy"] + (["accuracy (text)"] if text else [])
    table = Table("Multiple choice accuracy (%)", columns,
                  note="overall = all questions; macro = mean of the subjects")
    for name, entry in summary["subjects"].items():
        table.add(name, entry["questions"], entry["accuracy"], *([entry["accuracy_text"]] if text else []))
    overall = summary["overall"]
    table.add("overall", overall["questions"], overall["accuracy"], *([overall["accuracy_text"]] if text else []))
    table.add("macro", "", overall["macro_accuracy"], *([overall["macro_accuracy_text"]] if text else []))
    tables = [table]
    if summary["categories"]:
        cat = Table("By category (%, mean of subjects)", ["category", "subjects", "accuracy"]
                    + (["accuracy (text)"] if text else []))
        for name, entry in sorted(summary["categories"].items()):
            cat.add(name, len(entry["subjects"]), entry["accuracy"], *([entry["accuracy_text"]] if text else []))
        tables.append(cat)
    return tables
