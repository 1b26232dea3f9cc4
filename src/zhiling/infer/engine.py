"""The inference engine interface every backend implements, and ``load_engine`` to get one by name.

Chat, predict, serve, the web UI and eval all talk to an ``Engine``; they never call transformers or llama.cpp
directly, so a generation parameter means the same thing everywhere.

Contract (stable; backends live in their own modules and register in ``BACKENDS``):

* Prompts. ``Engine.prompt_ids(request)`` turns a ``ChatRequest`` into token ids with ``template.encode_prompt``
  (the template recorded with the adapter or given explicitly, the one training used), or a ``TextPrompt`` into
  the tokenizer's own encoding of the raw text (``/v1/completions``). A backend generates from these ids; it never
  renders a prompt of its own, so every backend sees token for token the same prompt. Message text is never
  parsed for special tokens (a user typing ``<|im_end|>`` sends those characters); a raw text prompt is.
* Parameters. ``GenerationConfig`` (zhiling.config.generation). A backend lists the parameters it cannot honour in
  ``unsupported``; ``check_params`` raises ``ZhilingError`` when such a parameter is set to a non-default value.
* Stops. Generation ends at EOS / the template's stop tokens (``stop_token_ids``) or at a stop string (the
  template's plus ``params.stop``); the stop string is cut from the text, together with anything after it.
* Backends implement two token-level primitives and inherit the text-level behaviour:

  - ``_generate_ids(prompts, params, cancel) -> list[list[int]]``: the generated ids for each prompt (a batch),
    ending at a stop token (kept) or at ``max_new_tokens``. A backend may stop early once a row's decoded text
    holds a stop string (``StopStrings.find``), and must stop every row once ``cancel`` is set.
  - ``_stream_ids(prompt, params, cancel) -> Iterator[int]``: generated ids of one prompt, one at a time. The
    consumer sets ``cancel`` (and closes the iterator) when it has seen a stop string or the client went away.

  ``generate`` / ``stream`` decode (incrementally, never splitting a multi-byte character), cut stop strings and fill
  in ``Result``. A backend may override them when it has a better way, keeping the same behaviour.
* Streaming. ``stream`` returns a ``TextStream``: iterate it for text deltas (a partial stop string is never
  emitted); when it is exhausted its ``result`` holds the finish reason and token counts. ``close()`` (or setting
  the ``cancel`` event passed in) stops the generation and frees the backend's slot; ``result.finish_reason`` is
  then ``"cancelled"``.
* Limits. ``context_length`` is the model's context in tokens; ``check_fits`` raises ``PromptTooLongError`` when
  prompt + ``max_new_tokens`` does not fit.
* Threads. ``generate`` and ``stream`` may be called from several threads at once (the server bounds how many).

Registering a backend: ``BACKENDS["name"] = "package.module:function"``, where the function is called as
``function(model_cfg, adapter=..., template=..., quant=..., system=...)`` and returns an ``Engine``. The ``hf``
backend is ``zhiling.infer.hf_engine:load_hf_engine``; ``llama.cpp`` is
``zhiling.infer.llamacpp_engine:load_llamacpp_engine``.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from zhiling.config import GenerationConfig, ModelConfig, QuantizationConfig
from zhiling.errors import ZhilingError
from zhiling.names import raise_unknown

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class PromptTooLongError(ZhilingError):
    """The prompt plus the tokens to generate do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        super().__init__(f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
                         f"but the model's context is {context_length} tokens; shorten the prompt or lower "
                         f"max_new_tokens")


# ----- requests and results --------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """One chat turn to answer: a system prompt (None: the template's default), earlier rounds, the new query."""

    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None

    @classmethod
    def from_messages(cls, messages: list[dict], system: str | None = None) -> "ChatRequest":
        """From canonical / OpenAI messages: an optional leading system message, then user/assistant turns
        alternating from the user and ending on a user turn. Raises ZhilingError naming the bad message."""
        messages = list(messages)
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system = _content(messages[0], 0)
            messages = messages[1:]
            offset = 1
        else:
            offset = 0
        if not messages:
            raise ZhilingError("messages: no user message to answer")
        texts = []
        for index, message in enumerate(messages):
            where = index + offset
            if not isinstance(message, dict):
                raise ZhilingError(f"messages[{where}]: expected an object with 'role' and 'content'")
            expected = "user" if index % 2 == 0 else "assistant"
            role = message.get("role")
            if role == "system":
                raise ZhilingError(f"messages[{where}]: a system message may only come first")
            if role != expected:
                raise ZhilingError(f"messages[{where}]: expected role '{expected}' here (turns alternate "
                                   f"user/assistant starting with user), got {role!r}")
            texts.append(_content(message, where))
        if len(texts) % 2 == 0:
            raise ZhilingError(f"messages[{len(texts) - 1 + offset}]: the last message must be the user's "
                               f"(there is nothing to answer after an assistant message)")
        history = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
        return cls(query=texts[-1], history=history, system=system)

    def messages(self) -> list[dict]:
        """Canonical messages (without the system prompt), ending with the query."""
        out = []
        for user, answer in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append({"role": "user", "content": self.query})
        return out


def _content(message: dict, where: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: only text parts are understood
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ZhilingError(f"messages[{where}].content: only text parts are supported")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ZhilingError(f"messages[{where}].content: expected a string")
    return content


@dataclass
class TextPrompt:
    """A raw text prompt, encoded by the tokenizer as it is (no chat template): ``/v1/completions``."""

    text: str


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length" (max_new_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def request_prompt_ids(template, tokenizer, request: ChatRequest | TextPrompt,
                       default_system: str | None = None) -> list[int]:
    """The prompt every backend generates from: a chat request through the template (message text stays plain
    text, see ``zhiling.data.templates``), a raw text prompt as the tokenizer encodes it (special-token strings
    in it are special tokens: the caller wrote the whole prompt, markup included)."""
    if isinstance(request, TextPrompt):
        return list(tokenizer.encode(request.text))
    system = request.system if request.system is not None else default_system
    return template.encode_prompt(tokenizer, system, list(request.history), request.query)


# ----- stop strings and incremental decoding ---------------------------------------------------------------------
class StopStrings:
    """Finds the earliest stop string in a text and says how much of a growing text is safe to show."""

    def __init__(self, stops: Iterable[str]):
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self.longest = len(self.stops[0]) if self.stops else 0

    def find(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string at or after ``start`` (a stop may begin before ``start`` and end
        after it when ``start`` is the length of text already checked), or -1."""
        best = -1
        for stop in self.stops:
            at = text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0 and (best < 0 or at < best):
                best = at
        return best

    def safe_length(self, text: str) -> int:
        """Length of the prefix of ``text`` that cannot be the start of a stop string still being generated."""
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        return len(text) - hold


class IncrementalDecoder:
    """Token ids in, new text out; holds back bytes of a character that is not complete yet.

    Each step decodes only a short window (from the token before the last emitted text), so long answers cost
    linear time, and both decodes in a step start at the same token, so tokenizers that treat the first token of
    a decode specially (a leading space) give the same text as decoding everything at once."""

    def __init__(self, tokenizer, stop_token_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.skip = set(stop_token_ids)
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are emitted

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.skip], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is left (an incomplete character included) once no more tokens come."""
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return now[len(before):]


class TextStream:
    """Text deltas of one streamed answer. After iteration ends, ``result`` holds the finish reason and counts.

    ``close()`` stops the generation (also called when the consumer breaks out of a ``for`` loop over it and the
    stream is garbage-collected, but call it explicitly: ``with engine.stream(...) as stream: ...``)."""

    def __init__(self, cancel: threading.Event, prompt_tokens: int, chunks: Iterator[str] | None = None):
        self._chunks: Iterator[str] = chunks if chunks is not None else iter(())
        self.cancel_event = cancel
        self.prompt_tokens = prompt_tokens
        self.result: Result | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self.cancel_event.set()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        if self.result is None:  # closed before the generation started
            self.result = Result("", FINISH_CANCELLED, self.prompt_tokens, 0)

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def text(self) -> str:
        """Consume the rest of the stream and return it joined."""
        return "".join(self)


# ----- the engine ------------------------------------------------------------------------------------------------
class Engine(ABC):
    """A loaded model ready to answer. See the module docstring for the contract."""

    name: str = ""  # backend name, as in BACKENDS
    unsupported: frozenset[str] = frozenset()  # GenerationConfig fields this backend cannot honour

    def __init__(self, tokenizer, template, *, context_length: int, model_id: str, adapter_id: str | None = None,
                 template_origin: str = "", default_system: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.context_length = context_length
        self.model_id = model_id
        self.adapter_id = adapter_id
        self.template_origin = template_origin or f"template '{getattr(template, 'name', '?')}'"
        self.default_system = default_system

    # ----- description ----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What identifies this engine's answers (written beside predictions, shown by chat and serve)."""
        return {"backend": self.name, "model": self.model_id, "adapter": self.adapter_id,
                "template": getattr(self.template, "name", None), "template_origin": self.template_origin,
                "context_length": self.context_length}

    # ----- prompts --------------------------------------------------------------------------------------------
    def prompt_ids(self, request: ChatRequest | TextPrompt) -> list[int]:
        return request_prompt_ids(self.template, self.tokenizer, request, self.default_system)

    def count_tokens(self, request: ChatRequest | TextPrompt) -> int:
        return len(self.prompt_ids(request))

    def stop_strings(self, params: GenerationConfig) -> list[str]:
        stops = list(self.template.stop_strings(self.tokenizer))
        return stops + [s for s in params.stop if s not in stops]

    def stop_token_ids(self) -> list[int]:
        return list(self.template.stop_token_ids(self.tokenizer))

    # ----- checks ---------------------------------------------------------------------------------------------
    def check_params(self, params: GenerationConfig) -> None:
        defaults = GenerationConfig()
        bad = [key for key in sorted(self.unsupported) if getattr(params, key) != getattr(defaults, key)]
        if bad:
            raise ZhilingError(f"the {self.name} backend cannot honour {', '.join(bad)} "
                               f"(leave {'them' if len(bad) > 1 else 'it'} at the default, or use the hf backend)")

    def check_fits(self, prompt_tokens: int, params: GenerationConfig) -> None:
        if prompt_tokens + params.max_new_tokens > self.context_length:
            raise PromptTooLongError(prompt_tokens, params.max_new_tokens, self.context_length)

    # ----- backend primitives ---------------------------------------------------------------------------------
    @abstractmethod
    def _generate_ids(self, prompts: list[list[int]], params: GenerationConfig,
                      cancel: threading.Event) -> list[list[int]]:
        """Generated ids for each prompt (see the module docstring)."""

    @abstractmethod
    def _stream_ids(self, prompt: list[int], params: GenerationConfig, cancel: threading.Event) -> Iterator[int]:
        """Generated ids of one prompt, one at a time (see the module docstring)."""

    def close(self) -> None:
        """Free the model (the engine is unusable afterwards)."""

    # ----- text level -----------------------------------------------------------------------------------------
    def generate(self, requests: list[ChatRequest | TextPrompt], params: GenerationConfig,
                 cancel: threading.Event | None = None) -> list[Result]:
        """Answer a batch of requests (one ``Result`` each, in order)."""
        self.check_params(params)
        prompts = [self.prompt_ids(r) for r in requests]
        for ids in prompts:
            self.check_fits(len(ids), params)
        cancel = cancel or threading.Event()
        outputs = self._generate_ids(prompts, params, cancel) if prompts else []
        stops = StopStrings(self.stop_strings(params))
        stop_ids = set(self.stop_token_ids())
        results = []
        for prompt, ids in zip(prompts, outputs):
            text = IncrementalDecoder(self.tokenizer, stop_ids).decode(ids)
            cut = stops.find(text)
            if cut >= 0:
                text, reason = text[:cut], FINISH_STOP
            elif ids and ids[-1] in stop_ids:
                reason = FINISH_STOP
            elif cancel.is_set():
                reason = FINISH_CANCELLED
            else:
                reason = FINISH_LENGTH
            results.append(Result(text, reason, len(prompt), len(ids)))
        return results

    def stream(self, request: ChatRequest | TextPrompt, params: GenerationConfig,
               cancel: threading.Event | None = None) -> TextStream:
        """Stream one answer as text deltas (see ``TextStream``)."""
        self.check_params(params)
        prompt = self.prompt_ids(request)
        self.check_fits(len(prompt), params)
        cancel = cancel or threading.Event()
        stream = TextStream(cancel, len(prompt))
        stream._chunks = self._stream_text(prompt, params, cancel, stream)
        return stream

    def _stream_text(self, prompt: list[int], params: GenerationConfig, cancel: threading.Event,
                     stream: TextStream) -> Iterator[str]:
        stops = StopStrings(self.stop_strings(params))
        stop_ids = set(self.stop_token_ids())
        decoder = IncrementalDecoder(self.tokenizer, stop_ids)
        # Only the last ``longest - 1`` characters of the text already shown can be part of a stop string that
        # ends in new text, so each token scans that tail plus the text held back: the cost per token stays the
        # same however long the answer grows.
        keep = max(stops.longest - 1, 0)
        shown: list[str] = []  # deltas emitted so far
        tail = ""  # the last ``keep`` characters emitted
        pending = ""  # decoded text not emitted yet (could be the start of a stop string)
        count = 0
        reason = FINISH_LENGTH
        ids = self._stream_ids(prompt, params, cancel)
        try:
            for token in ids:
                count += 1
                if token in stop_ids:
                    reason = FINISH_STOP
                    break
                pending += decoder.push(token)
                window = tail + pending
                cut = stops.find(window, len(tail))
                if cut >= 0:
                    pending = window[len(tail):cut]
                    reason = FINISH_STOP
                    break
                safe = stops.safe_length(window) - len(tail)
                if safe > 0:
                    delta, pending = pending[:safe], pending[safe:]
                    shown.append(delta)
                    tail = (tail + delta)[-keep:] if keep else ""
                    yield delta
                if cancel.is_set():
                    break
            else:
                pending += decoder.flush()
                window = tail + pending
                cut = stops.find(window, len(tail))
                if cut >= 0:
                    pending = window[len(tail):cut]
                    reason = FINISH_STOP
            if cancel.is_set() and reason != FINISH_STOP:
                reason = FINISH_CANCELLED
            stream.result = Result("".join(shown) + pending, reason, len(prompt), count)
            if pending:
                yield pending
        finally:
            cancel.set()
            close = getattr(ids, "close", None)
            if close is not None:
                close()
            if stream.result is None:
                stream.result = Result("".join(shown), FINISH_CANCELLED, len(prompt), count)


# ----- backends --------------------------------------------------------------------------------------------------
BACKENDS: dict[str, str] = {
    "hf": "zhiling.infer.hf_engine:load_hf_engine",
    "llama.cpp": "zhiling.infer.llamacpp_engine:load_llamacpp_engine",
}


def backend_names() -> list[str]:
    return list(BACKENDS)


def load_engine(model_cfg: ModelConfig | str | None = None, adapter: str | None = None, backend: str = "hf",
                template: str | None = None, quant: QuantizationConfig | None = None,
                system: str | None = None) -> Engine:
    """Load a model behind the named backend.

    ``template`` is a template name; None uses the one recorded with the adapter (or merged model), else the
    model's own chat template or family default, exactly as training chose it. ``system`` replaces the template's
    default system prompt."""
    if backend not in BACKENDS:
        raise_unknown("backend", backend, BACKENDS)
    if model_cfg is None or isinstance(model_cfg, str):
        model_cfg = ModelConfig(name_or_path=model_cfg)
    module_name, _, function = BACKENDS[backend].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ZhilingError(f"the {backend} backend is not available in this installation") from exc
        raise
    return getattr(module, function)(model_cfg, adapter=adapter, template=template, quant=quant, system=system)
