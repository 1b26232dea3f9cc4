"""The root config: one section per concern, shared by every entry point (CLI, web UI, API)."""

from __future__ import annotations

from pydantic import Field

from zhiling.config.base import Section
from zhiling.config.data import DataConfig
from zhiling.config.generation import GenerationConfig
from zhiling.config.lora import LoraConfig
from zhiling.config.model import ModelConfig
from zhiling.config.output import OutputConfig
from zhiling.config.quantization import QuantizationConfig
from zhiling.config.template import TemplateConfig
from zhiling.config.training import StageConfig, TrainingConfig


class ZhilingConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    stages: list[StageConfig] = Field(default_factory=list, description="staged run: each stage trains on from the last")
