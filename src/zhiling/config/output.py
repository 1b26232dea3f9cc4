from __future__ import annotations

from pydantic import Field

from zhiling.config.base import Section

# what a run writes into output.dir (a staged run: RUN_FILE, and one run folder per stage); nothing else there is
# zhiling's, so output.overwrite removes only these (train/outputs.py) and a stage may not take one of these names
RUN_FILE = "zhiling.json"
RUN_ENTRIES = ("adapter", "model", "checkpoints", "metrics.jsonl", "loss.png", "runs", RUN_FILE)


class OutputConfig(Section):
    """Where a run writes its adapter, checkpoints, metrics and plots."""

    dir: str = Field("outputs/run", description="output folder of the run")
    overwrite: bool = Field(False, description="replace another zhiling run in output.dir (only what a run wrote "
                                               "there is removed, never other files)")
