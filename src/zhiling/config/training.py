from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from zhiling.config.base import Section
from zhiling.config.output import RUN_ENTRIES
from zhiling.names import suggestion
from zhiling.owned import plain_name_problem


class TrainingConfig(Section):
    """Optimisation and run control."""

    method: Literal["lora", "dora", "rslora", "qlora", "full", "freeze"] = Field(
        "lora", description="lora / dora / rslora adapters, qlora (4-bit base), full fine-tuning, freeze (last N layers)")
    freeze_trainable_layers: int = Field(2, ge=1, description="freeze method: how many last layers are trained")
    learning_rate: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: str = Field("adamw_torch", description="adamw_torch, adamw_8bit, paged_adamw_8bit, adafactor, sgd")
    lr_scheduler: str = Field("cosine", description="linear, cosine, constant, constant_with_warmup, polynomial, "
                                                    "cosine_with_restarts, inverse_sqrt, cosine_with_min_lr")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warm-up as a share of all steps")
    warmup_steps: int = Field(0, ge=0, description="warm-up steps (wins over warmup_ratio when set)")
    per_device_batch_size: int = Field(4, ge=1, description="rows per micro-batch (packing: their token budget)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(3.0, gt=0.0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use num_epochs)")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping (0: off)")
    seed: int = Field(42)
    gradient_checkpointing: bool = Field(False)
    packing: bool | None = Field(None, description="padding-free packing (default: on where the model supports it)")
    packing_tokens: int | None = Field(
        None, ge=8, description="token budget of one packed micro-batch (default: cutoff_len on CPU, "
                               "per_device_batch_size x cutoff_len on GPUs)")
    group_by_length: bool = Field(True, description="unpacked batches: group rows of similar length (less padding)")
    loss: Literal["label_only", "full"] = Field(
        "label_only", description="label_only: LM head and cross-entropy only where labels exist, in chunks; "
                                  "full: the model's logits at every position")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1, description="eval loss on the validation split every N steps")
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(3, ge=1, description="keep this many most recent checkpoints")
    resume: bool | str = Field(True, description="true: resume from the last complete checkpoint; false; or a path")
    resume_changes: list[str] = Field(
        default_factory=list, description="settings a resume may change, applied from the checkpoint's step on: "
                                          "learning_rate, weight_decay, max_grad_norm, lr_scheduler, warmup_steps, "
                                          "warmup_ratio, max_steps, num_epochs, gradient_checkpointing, compile")
    init_adapter: str | None = Field(None, description="start from this adapter with a fresh optimizer")
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb")
    compile: bool = Field(False, description="torch.compile the model")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA where supported, fp16 on older CUDA, fp32 on CPU and MPS")
    distributed_config: str | None = Field(
        None, description="DeepSpeed JSON (ZeRO-2/3) or accelerate config YAML (DeepSpeed / FSDP) for multi-GPU runs")

    @field_validator("report_to", "resume_changes", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip() and part.strip() != "none"]
        return value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]):
        unknown = [name for name in value if name not in ("tensorboard", "wandb")]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r} (choose from: tensorboard, wandb)")
        return value


_STAGE_SECTIONS = ("data", "training", "lora", "template")


def stage_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a stage (its folder OUTPUT/NAME), or None. Also checked on names read back from a
    staged run's zhiling.json, since zhiling deletes those folders when the run is replaced."""
    problem = plain_name_problem(name)
    if problem is None and name.lower() in {entry.lower() for entry in RUN_ENTRIES}:
        problem = f"it is one of the run's own files and folders ({', '.join(RUN_ENTRIES)})"
    return problem


class StageConfig(Section):
    """One stage of a staged run: its own data and steps, starting from the previous stage's adapter.

    Each section here holds overrides of the same section of the root config (``data: {datasets: [coig]}``).
    """

    name: str = Field(description="stage name; its outputs go to OUTPUT/NAME")
    data: dict[str, Any] = Field(default_factory=dict, description="overrides of the data section")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of the training section")
    lora: dict[str, Any] = Field(default_factory=dict, description="overrides of the lora section")
    template: dict[str, Any] = Field(default_factory=dict, description="overrides of the template section")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str):
        problem = stage_name_problem(value)
        if problem:
            raise ValueError(f"stage name {value!r} must be a plain folder name: {problem}")
        return value

    @model_validator(mode="after")
    def _known_keys(self):
        from zhiling.config.data import DataConfig
        from zhiling.config.lora import LoraConfig
        from zhiling.config.template import TemplateConfig

        owners = {"data": DataConfig, "training": TrainingConfig, "lora": LoraConfig, "template": TemplateConfig}
        for section in _STAGE_SECTIONS:
            fields = owners[section].model_fields
            for key in getattr(self, section):
                if key not in fields:
                    hint = suggestion(key, fields, prefix=f"{section}.", otherwise="valid keys")
                    raise ValueError(f"stage '{self.name}': unknown key '{section}.{key}'{hint}")
        if "init_adapter" in self.training:
            raise ValueError(f"stage '{self.name}': training.init_adapter is set by the stage order "
                             f"(each stage starts from the previous stage's adapter)")
        return self
