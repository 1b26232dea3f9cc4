from __future__ import annotations

from pydantic import Field

from zhiling.config.base import Section


class GenerationConfig(Section):
    """Decoding parameters shared by chat, predict, serve and eval (same meaning for every backend)."""

    max_new_tokens: int = Field(256, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    do_sample: bool = Field(False, description="sample instead of greedy / beam search")
    temperature: float = Field(0.7, gt=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    num_beams: int = Field(1, ge=1, description="beam search width (hf backend only)")
    repetition_penalty: float = Field(1.0, gt=0.0)
    no_repeat_ngram_size: int = Field(0, ge=0, description="hf backend only")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (the template's are always used)")
    seed: int | None = Field(None, description="seed for sampling")
