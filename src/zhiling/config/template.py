from __future__ import annotations

from pydantic import Field

from zhiling.config.base import Section


class TemplateConfig(Section):
    """Prompt template used for training and recorded with the adapter for inference."""

    name: str | None = Field(
        None, description="template name (see `zhiling templates`); empty picks the model's own chat template "
                          "or the family default")
    system: str | None = Field(None, description="system prompt used when a row has none (overrides the template's)")
