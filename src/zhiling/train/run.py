"""The training entry point: one run of the trainer, or each stage of a staged run in turn, then the summary.

It sits above both ``trainer`` (one run) and ``stages`` (a sequence of runs), so neither imports the other back."""

from __future__ import annotations

from zhiling.config import ZhilingConfig
from zhiling.train.progress import print_summary
from zhiling.train.stages import run_stages
from zhiling.train.trainer import Trainer, TrainResult


def train(cfg: ZhilingConfig, *, show_progress: bool = True, summary: bool = True, announce=None) -> TrainResult:
    """Train as the config says (a single run, or each stage in turn) and print the summary."""
    if cfg.stages:
        return run_stages(cfg, show_progress=show_progress, summary=summary, announce=announce)
    trainer = Trainer(cfg, show_progress=show_progress, announce=announce)
    result = trainer.run()
    if summary and trainer.main:
        print_summary(result)
    return result
