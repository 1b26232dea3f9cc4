"""zhiling (指令): Chinese-first instruction fine-tuning of large language models."""

__version__ = "0.1.0"
