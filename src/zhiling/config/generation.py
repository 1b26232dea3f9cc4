from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from zhiling.config.base import Section


class GenerationConfig(Section):
    """Decoding parameters shared by chat, predict, serve, the web UI and eval.

    They mean the same for every backend. ``num_beams`` and ``no_repeat_ngram_size`` need the hf backend (another
    backend refuses them with an error rather than ignoring them). ``min_new_tokens`` keeps EOS and the template's
    stop tokens from ending an answer early; stop strings still cut it. With ``do_sample: false`` decoding is greedy
    (or beam search) and temperature / top_p / top_k have no effect. ``seed`` makes sampling repeatable.
    """

    max_new_tokens: int = Field(256, ge=1, description="most tokens to generate per answer")
    min_new_tokens: int = Field(0, ge=0, description="fewest tokens before EOS / stop tokens may end the answer")
    do_sample: bool = Field(False, description="sample instead of greedy / beam search")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature (with do_sample)")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling mass (with do_sample; 1 = off)")
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens (with do_sample; 0 = off)")
    num_beams: int = Field(1, ge=1, description="beam search width (hf backend only)")
    repetition_penalty: float = Field(1.0, gt=0.0, description="penalise tokens already present (1 = off)")
    no_repeat_ngram_size: int = Field(0, ge=0, description="never repeat an n-gram of this size (hf backend only)")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (the template's are always used)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed for sampling (0 to 2**63 - 1)")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                             f"({self.max_new_tokens})")
        return self
