from __future__ import annotations

from typing import Literal

from pydantic import Field

from zhiling.config.base import Section


class TrainingConfig(Section):
    """Optimisation and run control."""

    method: Literal["lora", "dora", "rslora", "qlora", "full", "freeze"] = Field(
        "lora", description="lora / dora / rslora adapters, qlora (4-bit base), full fine-tuning, freeze (last N layers)")
    freeze_trainable_layers: int = Field(2, ge=1, description="freeze method: how many last layers are trained")
    learning_rate: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: str = Field("adamw_torch", description="any transformers optimizer name")
    lr_scheduler: str = Field("cosine", description="any transformers scheduler name")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(0, ge=0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(3.0, gt=0.0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use num_epochs)")
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = Field(42)
    gradient_checkpointing: bool = Field(False)
    packing: bool | None = Field(None, description="padding-free packing (default: on where the model supports it)")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(3, ge=1)
    resume: bool | str = Field(True, description="true: resume from the last complete checkpoint; false; or a path")
    init_adapter: str | None = Field(None, description="start from this adapter with a fresh optimizer")
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb")
    compile: bool = Field(False, description="torch.compile the model")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto")
