"""The canonical record every input format converts into, and the checks it must pass.

    {"id": "belle-000001", "system": "", "messages": [{"role": "user", "content": "..."},
     {"role": "assistant", "content": "..."}], "source": "belle"}

Extra top-level keys (for example ``task`` in the bundled data) are kept as they are.
"""

from __future__ import annotations

from typing import Any

from zhiling.errors import DataError

ROLES = ("user", "assistant")


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def get_str(row: dict, key: str, *, required: bool = True, allow_empty: bool = False, default: str = "") -> str:
    """A string field of a raw row, with an error naming the field when it is missing, empty or not a string."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type_name(row)}")
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"missing field '{key}' (row has: {', '.join(map(str, row)) or 'no fields'})", field=key)
        return default
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", field=key)
    if required and not allow_empty and not value.strip():
        raise DataError("is empty", field=key)
    return value


def get_list(row: dict, key: str) -> list:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type_name(row)}")
    if key not in row:
        raise DataError(f"missing field '{key}' (row has: {', '.join(map(str, row)) or 'no fields'})", field=key)
    value = row[key]
    if not isinstance(value, list):
        raise DataError(f"expected an array, got {type_name(value)}", field=key)
    if not value:
        raise DataError("is an empty array", field=key)
    return value


def make_record(messages: list[dict], system: str = "", **extra: Any) -> dict:
    record = {"id": extra.pop("id", None), "system": system or "", "messages": messages, "source": extra.pop("source", None)}
    record.update(extra)
    return record


def pairs_to_messages(pairs: list[tuple[str, str | None]]) -> list[dict]:
    """(user, assistant) pairs as messages; a final ``None`` answer leaves a prompt-only record (for predict)."""
    messages = []
    for user, assistant in pairs:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages


def validate_record(record: Any, *, require_answer: bool = True) -> dict:
    """Check a canonical record: user/assistant turns alternating from the user, non-empty strings.

    With ``require_answer`` (training data) the last turn must be the assistant's; prompt-only data for
    ``predict`` may end on a user turn.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type_name(record)}")
    system = record.get("system") or ""
    if not isinstance(system, str):
        raise DataError(f"expected a string, got {type_name(system)}", field="system")
    messages = record.get("messages")
    if messages is None:
        raise DataError("missing field 'messages'", field="messages")
    if not isinstance(messages, list):
        raise DataError(f"expected an array, got {type_name(messages)}", field="messages")
    if not messages:
        raise DataError("is an empty array", field="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"expected an object, got {type_name(message)}", field=where)
        role, content = message.get("role"), message.get("content")
        expected = ROLES[index % 2]
        if role not in ROLES:
            raise DataError(f"role must be 'user' or 'assistant', got {role!r}", field=f"{where}.role")
        if role != expected:
            raise DataError(f"turns must alternate user/assistant starting with user; expected '{expected}' here",
                            field=f"{where}.role")
        if not isinstance(content, str):
            raise DataError(f"expected a string, got {type_name(content)}", field=f"{where}.content")
        if not content.strip():
            raise DataError("is empty", field=f"{where}.content")
    if require_answer and messages[-1]["role"] != "assistant":
        raise DataError("the last turn must be the assistant's answer", field=f"messages[{len(messages) - 1}]")
    return record


def turns(record: dict) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs of a validated record; the last assistant is None for prompt-only records."""
    messages = record["messages"]
    out = []
    for index in range(0, len(messages), 2):
        answer = messages[index + 1]["content"] if index + 1 < len(messages) else None
        out.append((messages[index]["content"], answer))
    return out
