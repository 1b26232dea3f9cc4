from __future__ import annotations

from pydantic import Field, field_validator

from zhiling.config.base import Section


class LoraConfig(Section):
    """Adapter shape (lora, dora, rslora, qlora)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        "auto", description="module names, 'all-linear', or 'auto' (the per-family default)")
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
