"""The ``hf`` backend: transformers ``generate`` on a base model (+ an unmerged PEFT adapter) or a merged folder.

CUDA, CPU or MPS (``model.device``), full precision or 4/8-bit through the loader. Batches are left-padded.
Every ``GenerationConfig`` field is honoured; all of them are passed explicitly, so a model's own
``generation_config.json`` (a default temperature, repetition penalty ...) never changes what zhiling asked for.

Sampling never touches torch's global random generator: each request draws from its own ``torch.Generator``
(seeded with ``seed``, else from the OS), through ``SampleWithGenerator`` at the end of the logits processors, so
a seeded request repeats exactly whatever else runs beside it (threads, later a shared batch) and reseeds nobody.
Only beam *sampling* (``num_beams > 1`` with ``do_sample``) uses transformers' own draw: it runs one at a time
with the global state saved and restored around it.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from transformers.generation import LogitsProcessor, StoppingCriteria

from zhiling.config import GenerationConfig, ModelConfig, QuantizationConfig
from zhiling.infer.engine import Engine, StopStrings
from zhiling.models.chat_setup import resolve_chat_setup
from zhiling.models.loader import load_model

DEFAULT_CONTEXT = 2048  # for models whose config states no limit (ALiBi models such as BLOOM)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


def context_length_of(config, tokenizer=None) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _CONTEXT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return DEFAULT_CONTEXT


def hf_generation_config(params: GenerationConfig, stop_ids: list[int], pad_id: int | None):
    """The transformers ``GenerationConfig`` for our parameters (every field set, none inherited)."""
    from transformers import GenerationConfig as HFGenerationConfig

    kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
                  do_sample=params.do_sample, num_beams=params.num_beams,
                  repetition_penalty=params.repetition_penalty, no_repeat_ngram_size=params.no_repeat_ngram_size,
                  eos_token_id=list(stop_ids) or None, pad_token_id=pad_id, num_return_sequences=1)
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    # greedy / beam search: sampling values stay unset (transformers ignores the model's defaults for them)
    return HFGenerationConfig(**kwargs)


class SampleWithGenerator(LogitsProcessor):
    """Draws the next token from the (already warped) scores with a request's own ``torch.Generator`` and leaves it
    the only choice, so greedy decoding takes it: sampling without the global random state."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)


def sampling_processors(params: GenerationConfig, generator) -> list:
    """temperature, top-k, top-p (transformers' order), then the draw with ``generator``."""
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors + [SampleWithGenerator(generator)]


_GLOBAL_RNG = threading.Lock()  # beam sampling: the only path that draws from torch's global generator


class StopStringCriteria(StoppingCriteria):
    """Ends a row once the text it generated holds a stop string (checked on the decoded tail only)."""

    def __init__(self, tokenizer, stops: StopStrings, prompt_length: int, skip_ids: set[int]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_length = prompt_length
        self.skip_ids = skip_ids
        longest = max((len(s) for s in stops.stops), default=0)
        self.window = 4 * longest + 8  # tokens: a character is at most 4 byte-level tokens

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids[:, self.prompt_length:].tolist():
            tail = [t for t in row[-self.window:] if t not in self.skip_ids]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done.append(bool(self.stops.stops) and self.stops.find(text) >= 0)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CancelCriteria(StoppingCriteria):
    """Ends every row once ``cancel`` is set (client gone, Ctrl-C, stop string seen by the streaming consumer)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class QueueStreamer:
    """A transformers streamer that hands each new token id to a queue (the prompt, sent first, is skipped)."""

    END = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(self.END)


class HFEngine(Engine):
    name = "hf"
    unsupported = frozenset()

    def __init__(self, model, tokenizer, template, **kwargs):
        super().__init__(tokenizer, template, **kwargs)
        self.model = model

    # ----- helpers --------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.stop_token_ids() or [0])[0]

    def _batch(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt):] = 1
        device = self.model.device
        return ids.to(device), mask.to(device), width

    def _generate_kwargs(self, prompts: list[list[int]], params: GenerationConfig, cancel: threading.Event):
        import torch
        from transformers.generation import LogitsProcessorList, StoppingCriteriaList

        ids, mask, width = self._batch(prompts)
        stop_ids = self.stop_token_ids()
        criteria = [CancelCriteria(cancel)]
        stops = StopStrings(self.stop_strings(params))
        if stops.stops:
            criteria.append(StopStringCriteria(self.tokenizer, stops, width, set(stop_ids)))
        kwargs = dict(input_ids=ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList(criteria))
        if params.do_sample and params.num_beams == 1:  # our own draw, after greedy's processors
            generator = torch.Generator(device=self.model.device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
            kwargs["logits_processor"] = LogitsProcessorList(sampling_processors(params, generator))
            params = params.model_copy(update={"do_sample": False})
        kwargs["generation_config"] = hf_generation_config(params, stop_ids, self.pad_id)
        return kwargs, width

    def _run_generate(self, kwargs: dict, params: GenerationConfig):
        import torch

        with torch.inference_mode():
            if not (params.do_sample and params.num_beams > 1):
                return self.model.generate(**kwargs)
            device = self.model.device
            devices = [device.index or 0] if device.type == "cuda" else []
            with _GLOBAL_RNG, torch.random.fork_rng(devices=devices, device_type=device.type):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                return self.model.generate(**kwargs)

    def _trim(self, row: list[int], stop_ids: set[int]) -> list[int]:
        """Generated ids up to and including the first stop token; trailing padding removed."""
        for index, token in enumerate(row):
            if token in stop_ids:
                return row[:index + 1]
        pad = self.pad_id
        end = len(row)
        while end and row[end - 1] == pad:
            end -= 1
        return row[:end]

    # ----- backend primitives ---------------------------------------------------------------------------------
    def _generate_ids(self, prompts: list[list[int]], params: GenerationConfig,
                      cancel: threading.Event) -> list[list[int]]:
        kwargs, width = self._generate_kwargs(prompts, params, cancel)
        output = self._run_generate(kwargs, params)
        stop_ids = set(self.stop_token_ids())
        return [self._trim(row, stop_ids) for row in output[:, width:].tolist()]

    def _stream_ids(self, prompt: list[int], params: GenerationConfig, cancel: threading.Event) -> Iterator[int]:
        if params.num_beams > 1:  # beams are only final at the end: the answer comes in one piece
            yield from self._generate_ids([prompt], params, cancel)[0]
            return
        kwargs, _ = self._generate_kwargs([prompt], params, cancel)
        streamer = QueueStreamer()
        kwargs["streamer"] = streamer
        failure: list[BaseException] = []

        def run():
            try:
                self._run_generate(kwargs, params)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                failure.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, name="zhiling-hf-generate", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = streamer.queue.get()
                if item is QueueStreamer.END:
                    break
                yield item
            finished = True
            if failure:
                raise failure[0]
        finally:
            if not finished:  # the consumer stopped early (stop string, client gone, Ctrl-C): end generate
                cancel.set()
            thread.join()

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_hf_engine(model_cfg: ModelConfig, *, adapter: str | None = None, template: str | None = None,
                   quant: QuantizationConfig | None = None, system: str | None = None) -> HFEngine:
    setup = resolve_chat_setup(model_cfg, template, adapter=adapter, system=system)
    model = load_model(model_cfg, quant, adapter=adapter, source=setup.source)
    model.eval()
    return HFEngine(model, setup.tokenizer, setup.template,
                    context_length=context_length_of(model.config, setup.tokenizer), model_id=setup.source.origin,
                    adapter_id=str(adapter) if adapter else None, template_origin=setup.template_origin)
