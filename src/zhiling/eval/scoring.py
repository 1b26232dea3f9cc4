"""The model side of multiple-choice evaluation: log-likelihood of each option's continuation after the prompt.

Prompts are plain text (zero- or few-shot, built by ``zhiling.eval.mc``). By default they go to the model as they
are, the way base models are evaluated on C-Eval / CMMLU / MMLU. With a chat template (``--template``, or the one
recorded with the adapter when ``--chat`` is given) the prompt becomes the user turn and each option the start of
the assistant's answer, which is how a fine-tuned chat model sees questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from zhiling.eval.likelihood import target_logprobs


class OptionScorer:
    """``score_options(prompts, options) -> [[sum log p(option | prompt)] per option] per prompt``."""

    def __init__(self, model, tokenizer, template=None, batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.advance: Callable[[int], None] | None = None

    def _prompt_ids(self, prompt: str) -> list[int]:
        if self.template is not None:
            return self.template.encode_prompt(self.tokenizer, None, [], prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None and getattr(self.tokenizer, "add_bos_token", True) else ids

    def __call__(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        sequences, targets, owners = [], [], []
        for index, (prompt, choices) in enumerate(zip(prompts, options)):
            prompt_ids = self._prompt_ids(prompt)
            for choice in choices:
                # the option is tokenized on its own, as the continuation the model would write after the prompt
                option_ids = self.tokenizer.encode(choice, add_special_tokens=False)
                sequences.append(prompt_ids + option_ids)
                targets.append([False] * len(prompt_ids) + [True] * len(option_ids))
                owners.append(index)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores = target_logprobs(self.model, sequences, targets, pad, self.batch_size)
        out: list[list[float]] = [[] for _ in prompts]
        for owner, (total, _) in zip(owners, scores):
            out[owner].append(total)
        return out


@dataclass
class ScoringModel:
    """A model to score with, resolved but not loaded yet: the tokenizer and template are ready, so a bad template
    name or data file fails before the (slow) weights load."""

    cfg: Any
    source: Any
    adapter: str | None
    tokenizer: Any
    template: Any = None
    where: str | None = None  # where the template came from ("template 'chatml' recorded with the adapter")

    def load(self):
        from zhiling.models import load_model

        return load_model(self.cfg, adapter=self.adapter, source=self.source)


def prepare_scoring_model(model: str | None, adapter: str | None = None, template: str | None = None,
                          use_template: bool = True) -> ScoringModel:
    """Resolve a model (hub id, folder, GGUF, or the default), load its tokenizer (the adapter's own when training
    saved one) and, with ``use_template``, pick the template: ``template`` if named, else the one recorded with the
    adapter or model, else the model's own (``models.chat_setup.resolve_chat_setup``, as for chat and training)."""
    from zhiling.config import ModelConfig
    from zhiling.models.chat_setup import resolve_chat_setup

    cfg = ModelConfig(name_or_path=model)
    setup = resolve_chat_setup(cfg, template, adapter=adapter)
    prepared = ScoringModel(cfg, setup.source, adapter, setup.tokenizer)
    if use_template:
        prepared.template, prepared.where = setup.template, setup.template_origin
    return prepared


def load_option_scorer(model: str | None, adapter: str | None = None, template: str | None = None,
                       chat: bool = False, batch_size: int = 8) -> OptionScorer:
    """An ``OptionScorer`` for a model (hub id, folder, GGUF, or the default) with an optional adapter."""
    prepared = prepare_scoring_model(model, adapter, template, use_template=template is not None or chat)
    return OptionScorer(prepared.load(), prepared.tokenizer, prepared.template, batch_size)
