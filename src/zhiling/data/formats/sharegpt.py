"""ShareGPT: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}.

Speakers ``human``/``user`` become the user, ``gpt``/``assistant``/``bot``/``chatgpt`` the assistant; a ``system``
turn may open the conversation (or a top-level ``system`` string gives it). Turns given as ``role``/``content``
inside ``conversations`` are read the same way. An ``id`` on the row is kept.
"""

from __future__ import annotations

from zhiling.data.formats import FormatSpec, option_choice, register
from zhiling.data.records import get_list, get_str, make_record, type_name
from zhiling.errors import DataError

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "chatgpt": "assistant", "system": "system"}


def _turn(turn, where: str) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"expected an object with 'from' and 'value', got {type_name(turn)}", field=where)
    speaker_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
    speaker, text = turn.get(speaker_key), turn.get(text_key)
    if not isinstance(speaker, str) or speaker.strip().lower() not in SPEAKERS:
        raise DataError(f"unknown speaker {speaker!r} (expected one of: {', '.join(SPEAKERS)})",
                        field=f"{where}.{speaker_key}")
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type_name(text)}", field=f"{where}.{text_key}")
    if not text.strip():
        raise DataError("is empty", field=f"{where}.{text_key}")
    return SPEAKERS[speaker.strip().lower()], text


def _convert(row, options: dict) -> list[dict]:
    turns = get_list(row, "conversations")
    system = get_str(row, "system", required=False)
    parsed = [_turn(turn, f"conversations[{index}]") for index, turn in enumerate(turns)]
    start = 0
    if parsed[0][0] == "system":
        system, start = parsed[0][1], 1
    if option_choice(options, "trailing_user", ("error", "drop")) == "drop" and parsed[-1][0] == "user":
        parsed = parsed[:-1]
    messages = []
    for index in range(start, len(parsed)):
        role, text = parsed[index]
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"expected a {expected} turn here, got {role} (turns must alternate user/assistant, "
                            f"starting with the user)", field=f"conversations[{index}]")
        messages.append({"role": role, "content": text})
    if not messages:
        raise DataError("has no user/assistant turns", field="conversations")
    if messages[-1]["role"] != "assistant":
        raise DataError("the last turn must be the assistant's (option trailing_user=drop drops an unanswered "
                        "last question)", field=f"conversations[{len(parsed) - 1}]")
    extra = {"id": row["id"]} if isinstance(row.get("id"), (str, int)) and str(row["id"]).strip() else {}
    return [make_record(messages, system=system, **extra)]


def _detect(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("conversations"), list)


register(FormatSpec(
    name="sharegpt",
    description="ShareGPT: {conversations: [{from: human|gpt|system, value}, ...]} (user/assistant/bot accepted)",
    convert=_convert, detect=_detect, example="sharegpt.json",
    options={"trailing_user": "error (default): a conversation ending on an unanswered user turn is an error; "
                              "drop: drop that last user turn"},
    defaults={"trailing_user": "error"},
    signature="a 'conversations' array",
    validate=lambda o: option_choice(o, "trailing_user", ("error", "drop")),
))
