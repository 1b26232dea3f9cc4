from __future__ import annotations

from pydantic import Field

from zhiling.config.base import Section


class OutputConfig(Section):
    """Where a run writes its adapter, checkpoints, metrics and plots."""

    dir: str = Field("outputs/run", description="output folder of the run")
    overwrite: bool = Field(False, description="allow writing into a folder that holds another run")
