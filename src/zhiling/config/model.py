from __future__ import annotations

from typing import Literal

from pydantic import Field

from zhiling.config.base import Section


class ModelConfig(Section):
    """Which base model to load and how."""

    name_or_path: str | None = Field(
        None, description="Hugging Face id, local folder or .gguf file; empty means the embedded default (Gemma 3 270M)")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when that is a folder or hub id")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub (GLM, Baichuan)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on CUDA where supported, fp16 on older CUDA, fp32 on CPU and MPS")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto lets transformers choose")
    cache_dir: str | None = Field(None, description="where converted models are kept (default ~/.cache/zhiling)")
