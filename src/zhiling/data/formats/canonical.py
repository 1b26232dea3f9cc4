"""The canonical format itself, which is also OpenAI-style ``messages`` with an optional system turn."""

from __future__ import annotations

from zhiling.data.formats import ANSWER_OPTION, FormatSpec, option_bool, register
from zhiling.data.records import get_list, get_str, type_name, validate_record
from zhiling.errors import DataError


def _convert(row, options: dict) -> list[dict]:
    messages = get_list(row, "messages")
    system = get_str(row, "system", required=False)
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        content = messages[0].get("content")
        if not isinstance(content, str):
            raise DataError(f"expected a string, got {type_name(content)}", field="messages[0].content")
        system, messages = content, messages[1:]
    cleaned = []
    for index, message in enumerate(messages):
        if isinstance(message, dict):
            message = {"role": message.get("role"), "content": message.get("content")}
        cleaned.append(message)
    extra = {k: v for k, v in row.items() if k not in ("messages", "system")}
    record = validate_record({**extra, "system": system, "messages": cleaned},
                             require_answer=option_bool(options, "require_answer"))
    return [record]


def _detect(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("messages"), list)


register(FormatSpec(
    name="messages",
    description="canonical / OpenAI messages: {\"system\": ..., \"messages\": [{\"role\", \"content\"}, ...]}",
    convert=_convert, detect=_detect, example="messages.jsonl",
    options=dict(ANSWER_OPTION),
    defaults={"require_answer": True},
    signature="a 'messages' array",
    validate=lambda o: option_bool(o, "require_answer"),
))
