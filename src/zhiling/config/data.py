from __future__ import annotations

from pydantic import Field, field_validator

from zhiling.config.base import Section


class DataConfig(Section):
    """Training data: which datasets, how they are tokenized and cut."""

    datasets: list[str] = Field(
        default_factory=lambda: ["zhiling_zh"],
        description="dataset names from the registry, data files, or hf:NAME; mixed in order")
    eval_datasets: list[str] = Field(default_factory=list, description="held-out datasets for eval loss")
    registry: str | None = Field(None, description="extra dataset registry YAML, merged over the built-in one")
    format: str = Field("auto", description="input format for plain file paths (auto detects it)")
    max_samples: int | None = Field(None, ge=1, description="use at most this many rows of each dataset")
    val_size: float = Field(0.0, ge=0.0, description="fraction (<1) or number (>=1) of training rows held out")
    cutoff_len: int = Field(1024, ge=8, description="maximum tokens per row (prompt is cut before the response)")
    train_on_prompt: bool = Field(False, description="also train on prompt tokens")
    mask_history: bool = Field(False, description="in multi-turn rows, train only the last assistant turn")
    drop_long: bool = Field(False, description="drop rows longer than cutoff_len instead of cutting them")
    dedup: bool = Field(False, description="remove exact duplicate rows (counted and reported)")
    num_proc: int = Field(1, ge=1, description="processes for tokenization")
    cache_dir: str | None = Field(None, description="tokenized-data cache (default ~/.cache/zhiling/tokenized)")
    seed: int = Field(42, description="seed for shuffling, sampling and the validation split")

    @field_validator("datasets", "eval_datasets", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
