"""A scripted engine for tests of everything above the backend (stop handling, chat, predict, serve queueing).

It implements the two backend primitives of ``zhiling.infer.engine.Engine`` over the real tiny tokenizer, so the
shared decoding, stop-string and result logic runs unchanged; only the model is replaced by a script.
"""

from __future__ import annotations

import threading
from typing import Callable

from zhiling.data.templates import get_template
from zhiling.infer.engine import Engine


class ScriptedEngine(Engine):
    """Answers each prompt with ``reply(prompt_text)`` (tokenized), then EOS; records every call.

    ``gate``: when given, streaming waits on it before each token (a test decides when tokens flow).
    ``on_token``: called with the token index before it is produced (a test can raise or cancel there)."""

    name = "scripted"

    def __init__(self, tokenizer, reply: Callable[[str], str] | str = "你好，世界！", *, template="alpaca",
                 context_length: int = 512, eos: bool = True, unsupported=frozenset(),
                 gate: threading.Event | None = None, on_token: Callable[[int], None] | None = None):
        super().__init__(tokenizer, get_template(template), context_length=context_length, model_id="scripted-model",
                         template_origin=f"template '{template}' (given)")
        self.reply = reply if callable(reply) else (lambda prompt, text=reply: text)
        self.eos = eos
        self.unsupported = frozenset(unsupported)
        self.gate = gate
        self.on_token = on_token
        self.calls: list[dict] = []
        self.cancelled: list[threading.Event] = []
        self.lock = threading.Lock()

    def _answer_ids(self, prompt: list[int], params) -> list[int]:
        text = self.reply(self.tokenizer.decode(prompt))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.eos:
            ids.append(self.tokenizer.eos_token_id)
        return ids[:params.max_new_tokens]

    def _generate_ids(self, prompts, params, cancel):
        with self.lock:
            self.calls.append({"kind": "generate", "prompts": prompts, "params": params})
            self.cancelled.append(cancel)
        if self.gate is not None:
            while not self.gate.wait(0.05):
                if cancel.is_set():
                    return [[] for _ in prompts]
        return [self._answer_ids(p, params) for p in prompts]

    def _stream_ids(self, prompt, params, cancel):
        with self.lock:
            self.calls.append({"kind": "stream", "prompts": [prompt], "params": params})
            self.cancelled.append(cancel)
        for index, token in enumerate(self._answer_ids(prompt, params)):
            if self.gate is not None:
                while not self.gate.wait(0.05):
                    if cancel.is_set():
                        return
            if cancel.is_set():
                return
            if self.on_token is not None:
                self.on_token(index)
            yield token
