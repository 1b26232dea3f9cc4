from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from zhiling.config.base import Section


class LoraConfig(Section):
    """Adapter shape (lora, dora, rslora, qlora)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        "auto", description="module names, 'all-linear' (every linear layer but the LM head), or 'auto' (the family's "
                    "attention projections: q/k/v/o_proj, Baichuan W_pack, GLM/Bloom query_key_value)")
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full and saved with the adapter (e.g. lm_head)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases are trained")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
