"""``zhiling train CONFIG --dry-run``: everything a run would do, short of loading weights and training.

The model is built on PyTorch's ``meta`` device from its config (no weights read, so a 7B plan takes seconds), the
method applied to it to count trainable parameters, the data tokenized (and cached for the real run) to count
tokens, micro-batches and steps, and memory estimated from those numbers. Every check that the real run makes
before training (config, data files, adapter fit, output folder, distributed config) runs here too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from zhiling.config import ZhilingConfig
from zhiling.data.templates import resolve_template
from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.errors import ZhilingError
from zhiling.models.loader import (check_adapter_matches, load_tokenizer, model_type_of, resolve_device,
                                   resolve_dtype, resolve_source)
from zhiling.train.batches import packing_budget
from zhiling.train.data import load_train_data
from zhiling.train.launch import load_distributed_config
from zhiling.train.methods import method_quantization, prepare_model
from zhiling.train.optim import check_names
from zhiling.train.outputs import claim_output_dir, model_id
from zhiling.train.packing import LengthGroupedBatchSampler, PackedBatchSampler
from zhiling.train.stages import stage_configs


@dataclass
class RunPlan:
    name: str
    model: str
    model_type: str | None
    method: str
    template: str
    trainable_params: int
    total_params: int
    target_modules: list[str]
    rows: int
    eval_rows: int
    tokens_per_epoch: int
    label_tokens_per_epoch: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    packing: str
    device: str
    dtype: str
    memory: dict[str, float] = field(default_factory=dict)  # part -> bytes
    distributed: str | None = None
    output_dir: str = ""
    processes: int = 1


def text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def meta_model(cfg: ZhilingConfig, source):
    """The model's architecture on the meta device: shapes and parameter counts, no memory, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ZhilingError(f"could not read the config of model '{source.origin}': {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def _bytes_of(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


def estimate_memory(model, cfg: ZhilingConfig, dtype, tokens_per_micro_batch: int, trainable: int) -> dict[str, float]:
    """A rough peak-memory breakdown in bytes (weights, trainable state, activations, logits)."""
    import torch

    config = text_config(model.config)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embed", None) or 1024
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    vocab = getattr(config, "vocab_size", 32000)
    act = _bytes_of(dtype)
    bits = (method_quantization(cfg) or cfg.quantization).bits if cfg.training.method != "full" else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weights = 0.0
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or param.requires_grad:
                continue
            seen.add(id(param))
            quantized = bits and isinstance(module, torch.nn.Linear) and module is not head
            weights += param.numel() * (bits / 8 * 1.03 if quantized else act)
    adapter = cfg.training.method in ("lora", "dora", "rslora", "qlora")
    weight_bytes = 4 if adapter else act
    optimizer_bytes = 2 if "8bit" in cfg.training.optimizer else (0 if cfg.training.optimizer == "sgd" else 8)
    state = trainable * (weight_bytes + weight_bytes + optimizer_bytes)
    tokens = tokens_per_micro_batch
    per_layer = 18 * width * act
    if cfg.training.gradient_checkpointing:
        activations = tokens * (layers * 2 * width * act + per_layer)
    else:
        activations = tokens * layers * per_layer
    if cfg.model.attn_implementation != "flash_attention_2":
        activations += layers * heads * tokens * tokens * act / (1 if not cfg.training.gradient_checkpointing
                                                                  else layers)
    if cfg.training.loss == "label_only":
        logits = 2 * min(tokens, max(16, (1 << 25) // vocab)) * vocab * 4
    else:
        logits = 3 * tokens * vocab * 4
    parts = {"weights": weights, "trainable weights, gradients, optimizer": state, "activations": activations,
             "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


def _count_batches(lengths: list[int], cfg: ZhilingConfig, packing: bool, processes: int, device: str) -> int:
    """Micro-batches per epoch for each process."""
    training = cfg.training
    if packing:
        budget = packing_budget(training, cfg.data.cutoff_len, device)
        sampler = PackedBatchSampler(lengths, max(budget, max(lengths)), seed=training.seed, num_replicas=processes)
    else:
        sampler = LengthGroupedBatchSampler(lengths, training.per_device_batch_size, seed=training.seed,
                                            num_replicas=processes)
    return len(sampler.batches(0))


def plan_run(cfg: ZhilingConfig, name: str = "run", check_output: bool = True, processes: int = 1) -> RunPlan:
    """The plan of one run (one stage), making every pre-training check."""
    training = cfg.training
    setup = load_distributed_config(training.distributed_config, training) if training.distributed_config else None
    method_quantization(cfg)
    check_names(training)
    source = resolve_source(cfg.model)
    if check_output:
        claim_output_dir(Path(cfg.output.dir), {"model": model_id(cfg, source), "method": training.method},
                         cfg.output.overwrite, cfg.training.resume, check_only=True)
    tokenizer = load_tokenizer(cfg.model, source)
    model_type = model_type_of(source, cfg.model.trust_remote_code)
    template, origin = resolve_template(cfg.template.name, tokenizer, model_type, adapter=training.init_adapter,
                                        system=cfg.template.system)
    data = load_train_data(cfg, template, tokenizer, announce=lambda message: None)
    model = meta_model(cfg, source)
    if training.init_adapter:
        from peft import LoraConfig, get_peft_model

        adapter = Path(training.init_adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ZhilingError(f"training.init_adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)")
        check_adapter_matches(model, adapter)
        model = get_peft_model(model, LoraConfig.from_pretrained(str(adapter)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_model(model, cfg, quantized=False)
    lengths = [int(n) for n in data.train["length"]]
    packing = training.packing is not False
    device = resolve_device(cfg.model.device)
    micro = _count_batches(lengths, cfg, packing, processes, device)
    steps_per_epoch = math.ceil(micro / training.gradient_accumulation_steps)
    total = training.max_steps if training.max_steps > 0 else max(1, math.ceil(training.num_epochs * steps_per_epoch))
    dtype = resolve_dtype(cfg.model.dtype, device)
    per_micro = packing_budget(training, cfg.data.cutoff_len, device) if packing else \
        training.per_device_batch_size * max(lengths)
    packing_note = ("on where exact for the model (checked at start)" if training.packing is None
                    else "on" if packing else "off")
    return RunPlan(name, source.origin, model_type, training.method, f"{template.name} ({origin})",
                   prepared.trainable_params, prepared.total_params, prepared.target_modules, data.train_rows,
                   data.eval_rows, int(sum(lengths)), int(sum(_label_counts(data.train))), micro, steps_per_epoch,
                   total, packing_note, device, str(dtype).replace("torch.", ""),
                   estimate_memory(prepared.model, cfg, dtype, per_micro, prepared.trainable_params),
                   setup.describe() if setup else None, cfg.output.dir, processes)


def _label_counts(dataset):
    for batch in dataset.select_columns(["labels"]).iter(batch_size=2000):
        for row in batch["labels"]:
            yield sum(1 for token in row if token != IGNORE_INDEX)


def plan(cfg: ZhilingConfig, processes: int = 1) -> list[RunPlan]:
    """Plans of every stage (or of the single run), for ``processes`` training processes in all."""
    if not cfg.stages:
        return [plan_run(cfg, processes=processes)]
    plans = []
    for name, stage_cfg in stage_configs(cfg):
        adapter = stage_cfg.training.init_adapter
        if adapter and not Path(adapter).exists() and plans:
            stage_cfg = stage_cfg.model_copy(update={"training": stage_cfg.training.model_copy(
                update={"init_adapter": None})})  # made by the previous stage; counted as a fresh adapter
        plans.append(plan_run(stage_cfg, name, check_output=not plans, processes=processes))
    return plans


def _gib(value: float) -> str:
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 28 else f"{value / 2 ** 20:.1f} MiB"


def print_plans(plans: list[RunPlan], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for item in plans:
        table = Table(title=f"plan: {item.name}", show_header=False, title_justify="left", box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        share = 100.0 * item.trainable_params / max(item.total_params, 1)
        rows = [("model", f"{item.model} ({item.model_type or 'unknown type'})"),
                ("method", item.method + (f" on {', '.join(item.target_modules)}" if item.target_modules else "")),
                ("trainable parameters", f"{item.trainable_params:,} of {item.total_params:,} ({share:.2f}%)"),
                ("template", item.template),
                ("data", f"{item.rows:,} rows for training" + (f", {item.eval_rows:,} for eval" if item.eval_rows
                                                                else "")),
                ("tokens per epoch", f"{item.tokens_per_epoch:,} ({item.label_tokens_per_epoch:,} trained)"),
                ("packing", item.packing),
                ("micro-batches per epoch", f"{item.micro_batches_per_epoch:,} per process"),
                ("steps", f"{item.total_steps:,} ({item.steps_per_epoch:,} per epoch, {item.processes} process"
                          f"{'es' if item.processes > 1 else ''})"),
                ("device, dtype", f"{item.device}, {item.dtype}")]
        if item.distributed:
            rows.append(("distributed", item.distributed))
        rows += [(f"memory: {part}", _gib(value)) for part, value in item.memory.items()]
        rows.append(("output", item.output_dir))
        for label, value in rows:
            table.add_row(label, value)
        console.print(table)
    console.print("memory is a rough estimate (about +-30%); nothing was trained (--dry-run)")
