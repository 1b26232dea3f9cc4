"""Request bodies of the OpenAI-compatible API, and how they become zhiling generation parameters.

Standard fields mean what they mean in the OpenAI API (``temperature: 0`` is greedy, a positive temperature
samples). zhiling's own parameters can be sent as extra fields: ``top_k``, ``repetition_penalty``,
``min_tokens``, ``num_beams``, ``no_repeat_ngram_size``, ``do_sample``. Fields of the OpenAI API that zhiling
cannot honour (tools, logprobs, n > 1 ...) are refused with a 400 naming them rather than ignored; unknown
fields are a 422.

Every list and string has a bound (a hostile body cannot make the server hold or scan without limit): at most
``MAX_MESSAGES`` messages, ``MAX_STOPS`` stop strings of at most ``MAX_STOP_CHARS`` characters, ``MAX_BEAMS`` beams,
``MAX_TEXT_CHARS`` characters per text, ``MAX_NAME_CHARS`` per name; the body itself is bounded by the server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.infer.params import InvalidParams, update_params

MAX_MESSAGES = 1024
MAX_STOPS = 4
MAX_STOP_CHARS = 128
MAX_BEAMS = 8
MAX_TEXT_CHARS = 4_000_000
MAX_NAME_CHARS = 256

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
Stop = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
# generation parameters whose API name differs from zhiling's
API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class ApiError(ZhilingError):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send name / tool fields zhiling does not use
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")
    model: Name
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    user: Name | None = None
    # zhiling's own parameters
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    do_sample: bool | None = None

    def refuse_unsupported(self) -> None:
        checks = [("n", self.n not in (None, 1), "only n=1 is supported"),
                  ("presence_penalty", bool(self.presence_penalty), "presence_penalty is not supported; use "
                                                                    "repetition_penalty"),
                  ("frequency_penalty", bool(self.frequency_penalty), "frequency_penalty is not supported; use "
                                                                      "repetition_penalty"),
                  ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
                  ("logprobs", self.logprobs not in (None, False, 0), "logprobs are not supported"),
                  ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported")]
        for param, bad, message in checks:
            if bad:
                raise ApiError(400, message, param=param)

    def generation(self, base: GenerationConfig) -> GenerationConfig:
        """``base`` (the server's defaults) with this request's parameters applied."""
        self.refuse_unsupported()
        changes: dict[str, Any] = {}
        limit = self.max_new_tokens()
        if limit is not None:
            changes["max_new_tokens"] = limit
        if self.temperature is not None:
            if self.temperature == 0:
                changes["do_sample"] = False
            else:
                changes.update(do_sample=True, temperature=self.temperature)
        for ours, theirs in (("top_p", self.top_p), ("seed", self.seed), ("top_k", self.top_k),
                             ("repetition_penalty", self.repetition_penalty), ("min_new_tokens", self.min_tokens),
                             ("num_beams", self.num_beams), ("no_repeat_ngram_size", self.no_repeat_ngram_size),
                             ("do_sample", self.do_sample)):
            if theirs is not None:
                changes[ours] = theirs
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
            if any(not s for s in stops):
                raise ApiError(400, "stop strings must not be empty", param="stop")
            changes["stop"] = list(base.stop) + [s for s in stops if s not in base.stop]
        if "min_new_tokens" in changes and "max_new_tokens" not in changes:
            changes["max_new_tokens"] = max(base.max_new_tokens, changes["min_new_tokens"])
        try:
            return update_params(base, **changes)
        except InvalidParams as exc:
            param = exc.names[0] if exc.names else None
            raise ApiError(400, str(exc), param=API_NAMES.get(param, param)) from None

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for param in ("tools", "functions", "tool_choice", "function_call"):
            if getattr(self, param) not in (None, [], "none"):
                raise ApiError(400, "tool and function calling is not supported", param=param)
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "only the text response format is supported", param="response_format")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_MESSAGES)]
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", param="best_of")

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "send one prompt per request (a list of exactly one string)", param="prompt")
        return self.prompt[0]
