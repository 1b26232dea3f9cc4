"""One config system for every entry point: pydantic sections, YAML files, ``key=value`` overrides."""

from zhiling.config.data import DataConfig
from zhiling.config.generation import GenerationConfig
from zhiling.config.loader import build_config, config_to_yaml, load_config, parse_override, read_yaml
from zhiling.config.lora import LoraConfig
from zhiling.config.model import ModelConfig
from zhiling.config.output import OutputConfig
from zhiling.config.quantization import QuantizationConfig
from zhiling.config.root import ZhilingConfig
from zhiling.config.template import TemplateConfig
from zhiling.config.training import TrainingConfig

__all__ = [
    "DataConfig", "GenerationConfig", "LoraConfig", "ModelConfig", "OutputConfig", "QuantizationConfig",
    "TemplateConfig", "TrainingConfig", "ZhilingConfig", "build_config", "config_to_yaml", "load_config",
    "parse_override", "read_yaml",
]
