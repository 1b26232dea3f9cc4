from __future__ import annotations

from typing import Literal

from pydantic import Field

from zhiling.config.base import Section


class QuantizationConfig(Section):
    """Loading the base model in 4 or 8 bits with bitsandbytes."""

    bits: Literal[None, 4, 8] = Field(None, description="4 or 8 bit base model; qlora implies 4")
    quant_type: Literal["nf4", "fp4"] = Field("nf4")
    double_quant: bool = Field(True)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto")
