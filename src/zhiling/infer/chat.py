"""Multi-turn chat: the conversation state with its token budget (``ChatSession``) and the terminal loop
(``ChatLoop``) behind ``zhiling chat``.

History budget: before each answer the oldest turns are dropped from what the model sees until the earlier turns
take at most ``max_history_tokens`` tokens of the prompt and the whole prompt plus ``max_new_tokens`` fits the
context. Dropped turns stay in the conversation (``/save`` writes everything that was said) but never come back
into the model's view; the user is told each time turns are dropped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.infer.engine import FINISH_LENGTH, ChatRequest, Engine, PromptTooLongError
from zhiling.infer.params import format_params, set_param
from zhiling.names import suggestion

DEFAULT_HISTORY_TOKENS = 2048


@dataclass
class Prepared:
    request: ChatRequest
    dropped: int  # turns newly dropped from the model's view for this request
    history_tokens: int


class ChatSession:
    """A conversation with one engine: turns, system prompt, parameters and the history budget."""

    def __init__(self, engine: Engine, params: GenerationConfig, system: str | None = None,
                 max_history_tokens: int = DEFAULT_HISTORY_TOKENS):
        if max_history_tokens < 0:
            raise ZhilingError("max_history_tokens must be 0 or more")
        self.engine = engine
        self.params = params
        self.system = system
        self.max_history_tokens = max_history_tokens
        self.turns: list[tuple[str, str]] = []
        self.first_kept = 0  # turns before this index are no longer shown to the model

    # ----- budget -----------------------------------------------------------------------------------------------
    def _count(self, history: list[tuple[str, str]], query: str) -> int:
        return self.engine.count_tokens(ChatRequest(query, history, self.system))

    def prepare(self, query: str) -> Prepared:
        """The request for ``query`` with the newest turns that fit (the oldest are dropped first)."""
        base = self._count([], query)
        limit = self.engine.context_length - self.params.max_new_tokens
        if base > limit:
            raise PromptTooLongError(base, self.params.max_new_tokens, self.engine.context_length)
        start = min(self.first_kept, len(self.turns))
        while start < len(self.turns):
            total = self._count(self.turns[start:], query)
            if total - base <= self.max_history_tokens and total <= limit:
                break
            start += 1
        dropped, self.first_kept = start - self.first_kept, start
        history = self.turns[start:]
        tokens = self._count(history, query) - base if history else 0
        return Prepared(ChatRequest(query, list(history), self.system), max(dropped, 0), tokens)

    # ----- turns ------------------------------------------------------------------------------------------------
    def add(self, query: str, answer: str) -> None:
        self.turns.append((query, answer))

    def undo(self) -> tuple[str, str] | None:
        if not self.turns:
            return None
        turn = self.turns.pop()
        self.first_kept = min(self.first_kept, len(self.turns))
        return turn

    def reset(self) -> None:
        self.turns.clear()
        self.first_kept = 0

    def to_record(self) -> dict:
        """The conversation as a canonical record, with the parameters and the model that produced it."""
        messages = []
        for user, answer in self.turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        system = self.system if self.system is not None else getattr(self.engine.template, "default_system", "")
        return {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "system": system or "", "messages": messages,
                "source": "zhiling-chat", "generation": self.params.model_dump(), "engine": self.engine.describe(),
                "max_history_tokens": self.max_history_tokens}

    def save(self, path: str | Path) -> Path:
        """Append the conversation as one canonical jsonl row."""
        if not self.turns:
            raise ZhilingError("nothing to save yet: the conversation is empty")
        path = Path(path).expanduser()
        if path.is_dir():
            raise ZhilingError(f"{path} is a folder; give a file name such as {path / 'chat.jsonl'}")
        if not path.parent.exists():
            raise ZhilingError(f"cannot save to {path}: folder {path.parent} does not exist")
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(self.to_record(), ensure_ascii=False) + "\n")
        except OSError as exc:
            raise ZhilingError(f"cannot save to {path}: {exc.strerror or exc}") from None
        return path


COMMANDS = {
    "/reset": "forget the conversation (the system prompt and parameters stay)",
    "/undo": "remove the last question and its answer",
    "/retry": "answer the last question again",
    "/system": "/system TEXT sets the system prompt; /system alone shows it; /system none restores the template's",
    "/set": "/set KEY VALUE changes a generation parameter (or max_history_tokens); /set alone lists them",
    "/save": "/save FILE appends the conversation and its parameters to FILE as a canonical jsonl row",
    "/help": "show this help",
    "/exit": "leave the chat (Ctrl-D does too)",
}

HELP = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items()) + (
    "\n  Ctrl-C stops an answer being written; a line starting with // sends a message that starts with /.")


class ChatLoop:
    """The terminal chat: reads lines (from a TTY or a pipe), runs commands, streams answers."""

    def __init__(self, session: ChatSession, input: TextIO | None = None, output: TextIO | None = None,
                 interactive: bool | None = None):
        self.session = session
        self.input = input or sys.stdin
        self.output = output or sys.stdout
        self.interactive = self.input.isatty() if interactive is None else interactive

    # ----- io ---------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.output.write(f"[{text}]\n")
        self.output.flush()

    def read(self) -> str | None:
        if self.interactive and self.input is sys.stdin:
            try:
                return input("user> ")
            except EOFError:
                return None
        self.output.write("user> ")
        self.output.flush()
        line = self.input.readline()
        if not line:
            return None
        line = line.rstrip("\r\n")
        self.output.write(line + "\n")
        return line

    # ----- loop -------------------------------------------------------------------------------------------------
    def run(self) -> int:
        engine = self.session.engine
        self.say(f"model {engine.model_id}" + (f" + adapter {engine.adapter_id}" if engine.adapter_id else "")
                 + f" ({engine.name} backend), {engine.template_origin}; /help lists the commands")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                self.output.write("\n")
                self.say("type /exit or press Ctrl-D to leave")
                continue
            if line is None:
                self.output.write("\n")
                return 0
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if self.command(line) == "exit":
                        return 0
                except ZhilingError as exc:
                    self.say(f"error: {exc}")
                continue
            self.answer(line[1:] if line.startswith("//") else line)

    def answer(self, query: str) -> None:
        session = self.session
        try:
            prepared = session.prepare(query)
        except ZhilingError as exc:
            self.say(f"error: {exc}")
            return
        if prepared.dropped:
            self.say(f"dropped the {prepared.dropped} oldest turn{'s' if prepared.dropped > 1 else ''} from the "
                     f"model's view to stay within max_history_tokens={session.max_history_tokens} and the "
                     f"{session.engine.context_length}-token context")
        self.output.write("assistant> ")
        self.output.flush()
        parts: list[str] = []
        try:
            stream = session.engine.stream(prepared.request, session.params)
        except ZhilingError as exc:
            self.output.write("\n")
            self.say(f"error: {exc}")
            return
        try:
            for delta in stream:
                parts.append(delta)
                self.output.write(delta)
                self.output.flush()
        except KeyboardInterrupt:
            stream.close()
            self.output.write("\n")
            answer = "".join(parts)
            if answer.strip():
                session.add(query, answer)
                self.say("stopped; the partial answer is kept (/retry answers again, /undo removes it)")
            else:
                self.say("stopped")
            return
        finally:
            stream.close()
        self.output.write("\n")
        result = stream.result
        session.add(query, result.text if result is not None else "".join(parts))
        if result is not None and result.finish_reason == FINISH_LENGTH:
            self.say(f"the answer reached max_new_tokens={session.params.max_new_tokens} "
                     f"(/set max_new_tokens N for longer answers)")

    # ----- commands ---------------------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        session = self.session
        if name == "/exit" or name == "/quit":
            return "exit"
        if name == "/help":
            self.output.write(HELP + "\n")
        elif name == "/reset":
            session.reset()
            self.say("conversation cleared")
        elif name == "/undo":
            turn = session.undo()
            self.say("nothing to undo" if turn is None else f"removed: {shorten(turn[0])}")
        elif name == "/retry":
            turn = session.undo()
            if turn is None:
                self.say("nothing to retry")
            else:
                self.answer(turn[0])
        elif name == "/system":
            if not rest:
                current = session.system if session.system is not None else getattr(
                    session.engine.template, "default_system", "")
                self.say(f"system prompt: {current!r}" + ("" if session.system is not None else
                                                            " (the template's default)"))
            else:
                session.system = None if rest.lower() == "none" else rest
                self.say("system prompt set" if session.system is not None else
                         "system prompt back to the template's default")
        elif name == "/set":
            self.set(rest)
        elif name == "/save":
            if not rest:
                raise ZhilingError("usage: /save FILE")
            path = session.save(rest)
            self.say(f"conversation appended to {path}")
        else:
            raise ZhilingError(f"unknown command {name}{suggestion(name, COMMANDS, quote='')} (/help lists them; "
                               f"start a message with // to send text that begins with /)")
        return None

    def set(self, rest: str) -> None:
        session = self.session
        if not rest:
            self.output.write(f"  {format_params(session.params)}  max_history_tokens={session.max_history_tokens}\n")
            return
        key, _, value = rest.partition(" ")
        if not value.strip():
            raise ZhilingError("usage: /set KEY VALUE (for example /set temperature 0.8)")
        if key.replace("-", "_") == "max_history_tokens":
            try:
                number = int(value)
            except ValueError:
                raise ZhilingError(f"max_history_tokens must be a whole number, got {value!r}") from None
            if number < 0:
                raise ZhilingError("max_history_tokens must be 0 or more")
            session.max_history_tokens = number
            self.say(f"max_history_tokens = {number}")
            return
        params = set_param(session.params, key, value)
        session.engine.check_params(params)
        session.params = params
        name = key.replace("-", "_")
        self.say(f"{name} = {getattr(params, name)!r}")


def shorten(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
