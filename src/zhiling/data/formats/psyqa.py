"""PsyQA (Chinese mental-health Q&A): {"questionID", "question", "description", "keywords",
"answers": [{"answer_text", ...}, ...]}.

Options:
  answers=first|all         first (default): one record from the first answer; all: one record per answer.
  description=drop|append|input
                            how the asker's longer description joins the question in the prompt:
                            drop: the prompt is the question alone;
                            append (default): question + "\\n" + description (one prompt, as alpaca joins input);
                            input: question + "\\n\\n" + description (the description as its own paragraph).
An empty or missing description leaves the question alone. ``questionID`` and ``keywords`` are kept as
``question_id`` and ``keywords``.
"""

from __future__ import annotations

from zhiling.data.formats import FormatSpec, option_choice, register
from zhiling.data.records import get_list, get_str, make_record, pairs_to_messages, type_name
from zhiling.errors import DataError

SEPARATORS = {"drop": None, "append": "\n", "input": "\n\n"}


def build_prompt(question: str, description: str, mode: str) -> str:
    separator = SEPARATORS[mode]
    if separator is None or not description.strip():
        return question
    return f"{question}{separator}{description}"


def _answer_text(answer, where: str) -> str:
    if not isinstance(answer, dict):
        raise DataError(f"expected an object with 'answer_text', got {type_name(answer)}", field=where)
    try:
        return get_str(answer, "answer_text")
    except DataError as err:
        raise DataError(err.reason, field=f"{where}.{err.field}") from None


def _convert(row, options: dict) -> list[dict]:
    question = get_str(row, "question")
    description = get_str(row, "description", required=False)
    answers = get_list(row, "answers")
    prompt = build_prompt(question, description, option_choice(options, "description", tuple(SEPARATORS)))
    if option_choice(options, "answers", ("first", "all")) == "first":
        answers = answers[:1]
    extra = {}
    if isinstance(row.get("questionID"), (str, int)):
        extra["question_id"] = row["questionID"]
    if isinstance(row.get("keywords"), str) and row["keywords"].strip():
        extra["keywords"] = row["keywords"]
    return [make_record(pairs_to_messages([(prompt, _answer_text(answer, f"answers[{index}]"))]), **extra)
            for index, answer in enumerate(answers)]


def _detect(row) -> bool:
    return isinstance(row, dict) and "question" in row and isinstance(row.get("answers"), list)


register(FormatSpec(
    name="psyqa",
    description="PsyQA: {question, description, keywords, answers: [{answer_text}], questionID}",
    convert=_convert, detect=_detect, example="psyqa.json",
    options={"answers": "first (default): the first answer only; all: one record per answer",
             "description": "append (default): question + newline + description; input: question + blank line + "
                            "description; drop: question only"},
    defaults={"answers": "first", "description": "append"},
    signature="a 'question' and an 'answers' array",
    validate=lambda o: (option_choice(o, "answers", ("first", "all")),
                        option_choice(o, "description", tuple(SEPARATORS))),
))
