"""The training loop: one run from config to adapter, resumable exactly at any checkpoint.

Why our own loop (on accelerate) rather than transformers' Trainer: exact resume needs the data position, the
micro-batch plan and every RNG under our control, and the loss must be normalised over the label tokens of a whole
optimizer step (all micro-batches, all processes) for packed batches to train like padded ones. accelerate gives the
process group (DDP on CPU or GPU, DeepSpeed, FSDP) and mixed precision; the rest reads top to bottom in ``run``:

1. checks that need nothing heavy (output folder, method, optimizer names, distributed config)
2. tokenizer, template, data (tokenized once, cached by content)
3. model and method (LoRA / QLoRA / full / freeze; ``init_adapter``)
4. the micro-batch plan, optimizer, schedule; resume from the last complete checkpoint
5. the loop: per optimizer step, the loss is summed over every micro-batch of every process and divided by their
   label tokens; log, evaluate and checkpoint at step boundaries
6. the adapter (or model) with tokenizer and template, zhiling.json, loss.png, and a summary
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from zhiling.config import ZhilingConfig
from zhiling.data.templates import resolve_template
from zhiling.data.tokenize import describe_report
from zhiling.errors import CheckpointError, RunStopped, ZhilingError
from zhiling.models.loader import load_model, load_tokenizer, model_type_of, resolve_device, resolve_source
from zhiling.train import checkpoint as ckpt
from zhiling.train import fingerprint
from zhiling.train.batches import Batching, choose_batching, count_labels, eval_micro_batches, to_device
from zhiling.train.compile import maybe_compile
from zhiling.train.data import TrainData, load_train_data
from zhiling.train.launch import DistributedSetup, check_runtime, load_distributed_config, make_plugin
from zhiling.train.loss import CausalLMLoss
from zhiling.train.methods import PreparedModel, method_quantization, prepare_model
from zhiling.train.metrics_log import MetricsLog, Trackers, check_trackers, plot_loss
from zhiling.train.optim import build_optimizer, build_scheduler, check_names
from zhiling.train.outputs import (chat_command, claim_output_dir, model_id, now, read_record, save_final, versions,
                                   write_record)
from zhiling.train.packing import useful_tokens
from zhiling.train.progress import RateMeter, TrainProgress
from zhiling.train.runlock import RunLock
from zhiling.train.stopping import StopRequests


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    is_adapter: bool
    steps: int = 0
    tokens: int = 0
    label_tokens: int = 0
    train_seconds: float = 0.0
    final_loss: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    chat_command: str = ""
    skipped: bool = False
    resumed_from: str | None = None
    stages: list["TrainResult"] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"output_dir": str(self.output_dir), "final_dir": str(self.final_dir), "steps": self.steps,
                "tokens": self.tokens, "label_tokens": self.label_tokens, "train_seconds": round(self.train_seconds, 2),
                "final_loss": self.final_loss, "final_eval_loss": self.final_eval_loss,
                "best_eval_loss": self.best_eval_loss, "chat_command": self.chat_command}


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def mixed_precision(precision: str, device: str, setup: DistributedSetup | None) -> str:
    """accelerate's mixed_precision: bf16 autocast on CUDA where supported, fp16 on older CUDA, none on CPU / MPS."""
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    if setup is not None and setup.mixed_precision:
        return setup.mixed_precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    def __init__(self, cfg: ZhilingConfig, *, show_progress: bool = True, announce=None):
        """``announce`` receives the run's one-line messages (default: printed to stderr by rank 0)."""
        self.cfg = cfg
        self.show_progress = show_progress
        self.announce = announce
        self.out = Path(cfg.output.dir)
        self.lock: RunLock | None = None
        self.stop = StopRequests(self.say)
        self.stop_votes = 0.0

    # ----- small helpers -------------------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def say(self, message: str) -> None:
        if not self.main:
            return
        if self.announce is not None:
            self.announce(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def _sum_across(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (a no-op for one process)."""
        if self.acc.num_processes == 1:
            return [float(v) for v in values]
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return [float(v) for v in self.acc.reduce(tensor, reduction="sum").tolist()]

    def _collate(self, indices: list[int]) -> dict:
        return self._collate_from(self.data.train, indices)

    def _collate_from(self, dataset, indices: list[int]) -> dict:
        rows = dataset[indices]
        features = [{"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"])]
        return to_device(self.batching.collator(features), self.acc.device)

    # ----- 1. checks -------------------------------------------------------------------------------------------------
    def _make_accelerator(self, device: str):
        from accelerate import Accelerator

        plugin = make_plugin(self.setup) if self.setup is not None else None
        kwargs = dict(cpu=device == "cpu", mixed_precision=mixed_precision(self.cfg.training.precision, device,
                                                                            self.setup))
        if self.setup is not None and self.setup.kind == "deepspeed":
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.training.per_device_batch_size
            kwargs["deepspeed_plugin"] = plugin
            kwargs["gradient_accumulation_steps"] = self.cfg.training.gradient_accumulation_steps
        elif self.setup is not None and self.setup.kind == "fsdp":
            kwargs["fsdp_plugin"] = plugin
        return Accelerator(**kwargs)

    def _check(self) -> None:
        cfg = self.cfg
        self.setup = (load_distributed_config(cfg.training.distributed_config, cfg.training)
                      if cfg.training.distributed_config else None)
        check_runtime(self.setup)
        self.quant = method_quantization(cfg)
        check_names(cfg.training)
        check_trackers(cfg.training.report_to)
        self.accepted = fingerprint.accepted_changes(cfg.training.resume_changes)
        if cfg.training.init_adapter:
            if cfg.training.method not in ("lora", "dora", "rslora", "qlora"):
                raise ZhilingError(f"training.init_adapter continues an adapter, but training.method is "
                                   f"{cfg.training.method}; use an adapter method (lora, qlora, ...)")
            if not (Path(cfg.training.init_adapter) / "adapter_config.json").is_file():
                raise ZhilingError(f"training.init_adapter: {cfg.training.init_adapter} is not a PEFT adapter folder "
                                   f"(no adapter_config.json); give OUTPUT/adapter of an earlier run")
        device = resolve_device(cfg.model.device)
        self.acc = self._make_accelerator(device)
        if device.startswith("cuda") and self.acc.num_processes > 1:
            device = str(self.acc.device)
        self.device = device
        self.source = resolve_source(cfg.model)
        self.identity = {"model": model_id(cfg, self.source), "method": cfg.training.method}
        self.previous = None
        if self.main:
            # refuse a folder that is not this run's before writing a lock into it; then claim it under the lock
            claim_output_dir(self.out, self.identity, cfg.output.overwrite, cfg.training.resume, check_only=True)
            self.lock = RunLock(self.out).acquire()
            state = claim_output_dir(self.out, self.identity, cfg.output.overwrite, cfg.training.resume)
            self.previous = None if state.fresh else state.record
        self.acc.wait_for_everyone()
        if not self.main:
            self.previous = read_record(self.out)

    # ----- 2. tokenizer, template, data ------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model, self.source)
        self.model_type = model_type_of(self.source, cfg.model.trust_remote_code)
        self.template, origin = resolve_template(cfg.template.name, self.tokenizer, self.model_type,
                                                 adapter=cfg.training.init_adapter, system=cfg.template.system)
        self.say(f"template: {origin}")
        with self.acc.main_process_first():
            self.data: TrainData = load_train_data(cfg, self.template, self.tokenizer, announce=self.say)
        held = f", {self.data.eval_rows:,} rows for eval loss" if self.data.eval is not None else ""
        self.say(f"data: {describe_report(self.data.report)}{held}")

    def _already_finished(self) -> TrainResult | None:
        """The same run finished in this folder: nothing to do. A different finished run: refuse."""
        record = self.previous
        self.run_hash = fingerprint.settings_hash(self.cfg.model_dump(mode="json")) + ":" + self.data.key
        if not record or record.get("status") != "finished":
            return None
        final_dir = self.out / ("adapter" if self.cfg.training.method in ("lora", "dora", "rslora", "qlora")
                                else "model")
        if record.get("run_hash") == self.run_hash:
            if not final_dir.is_dir():
                return None  # its result was removed: train it again (from its last checkpoint, if any)
            metrics = record.get("metrics", {})
            return TrainResult(self.out, final_dir, final_dir.name == "adapter", metrics.get("steps", 0),
                               metrics.get("tokens", 0), metrics.get("label_tokens", 0),
                               metrics.get("train_seconds", 0.0), metrics.get("final_loss"),
                               metrics.get("final_eval_loss"), metrics.get("best_eval_loss"),
                               record.get("chat_command", ""), skipped=True)
        changes = fingerprint.differences(fingerprint.result_settings(record.get("config", {})),
                                          fingerprint.result_settings(self.cfg.model_dump(mode="json")))
        what = fingerprint.describe(dict(list(changes.items())[:6])) if changes else "the training data changed"
        raise ZhilingError(f"output.dir {self.out} holds a finished run with different settings ({what}); choose "
                           f"another output.dir, set training.resume=false to train this one again from scratch, or "
                           f"output.overwrite=true")

    # ----- 3. model --------------------------------------------------------------------------------------------------
    def _load_model(self) -> None:
        cfg = self.cfg
        set_seed(cfg.training.seed)
        model_cfg = cfg.model.model_copy(update={"device": self.device})
        if cfg.training.method in ("full", "freeze") and model_cfg.dtype == "auto":
            import torch

            if resolve_device(self.device).startswith("cuda") and not torch.cuda.is_bf16_supported():
                model_cfg = model_cfg.model_copy(update={"dtype": "float32"})  # fp16 weights cannot be trained
        model = load_model(model_cfg, self.quant, adapter=cfg.training.init_adapter, source=self.source,
                           trainable_adapter=True)
        self.prepared: PreparedModel = prepare_model(model, cfg, quantized=self.quant is not None)
        self.model = self.prepared.model
        share = 100.0 * self.prepared.trainable_params / max(self.prepared.total_params, 1)
        where = f" on {', '.join(self.prepared.target_modules)}" if self.prepared.target_modules else ""
        if self.prepared.trained_layers:
            where = f" (layers {self.prepared.trained_layers[0]}-{self.prepared.trained_layers[-1]})"
        start = f", continuing {cfg.training.init_adapter}" if cfg.training.init_adapter else ""
        self.say(f"model: {self.source.origin}, {cfg.training.method}{where}{start}; "
                 f"{self.prepared.trainable_params:,} of {self.prepared.total_params:,} parameters trained "
                 f"({share:.2f}%)")

    # ----- 4. plan, optimizer, resume --------------------------------------------------------------------------------
    def _plan(self) -> None:
        cfg, training = self.cfg, self.cfg.training
        self.processes, self.rank = self.acc.num_processes, self.acc.process_index
        lengths = [int(n) for n in self.data.train["length"]]
        self.batching: Batching = choose_batching(self.model, self.tokenizer, lengths, training, cfg.data.cutoff_len,
                                                  self.processes, self.rank, str(self.acc.device))
        self.accum = training.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.batching.micro_batches(0)) / self.accum)
        if training.max_steps > 0:
            self.total_steps = training.max_steps
        else:
            self.total_steps = max(1, math.ceil(training.num_epochs * self.steps_per_epoch))
        self.eval_batches = []
        if self.data.eval is not None:
            eval_lengths = [int(n) for n in self.data.eval["length"]]
            self.eval_batches = eval_micro_batches(eval_lengths, self.batching, training.per_device_batch_size,
                                                   self.processes, self.rank)
        self.fingerprint = fingerprint.build(cfg.model_dump(mode="json"), {
            "processes": self.processes, "data": self.data.key, "packing": self.batching.packing,
            "packing_tokens": self.batching.packing_tokens, "mixed_precision": str(self.acc.mixed_precision)})
        self.say(f"plan: {self.total_steps:,} steps ({self.steps_per_epoch:,} per epoch), {self.accum} micro-batch"
                 f"{'es' if self.accum > 1 else ''} per step per process, {self.processes} process"
                 f"{'es' if self.processes > 1 else ''}; {self.batching.note}")

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg.training)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.training, self.total_steps)
        label_only = None if self.cfg.training.loss == "label_only" else False
        self.loss_fn = CausalLMLoss(self.model, label_only=label_only)
        self.sharded = self.setup is not None and self.setup.kind in ("deepspeed", "fsdp")
        self.loss_module, self.optimizer = self.acc.prepare(self.loss_fn, self.optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    # ----- resume -----------------------------------------------------------------------------------------------------
    def _find_resume_point(self) -> tuple[Path, ckpt.TrainState, dict] | None:
        """The checkpoint to continue from, read and checked: the one training.resume names, or the newest complete
        one (a damaged newest checkpoint is set aside, and the run falls back to the one before and says so)."""
        resume = self.cfg.training.resume
        root = self.out / "checkpoints"
        if self.main:
            for leftover in ckpt.remove_partial(root):
                self.say(f"removed an unfinished checkpoint save: {leftover.name}")
        if resume is False:
            return None
        if isinstance(resume, str):
            return self._open_checkpoint(Path(resume))  # no fallback: the user named this one
        found = None
        if self.main:
            found = self._newest_usable(root)
        self.acc.wait_for_everyone()  # rank 0 has set damaged checkpoints aside
        if not self.main:
            found = self._newest_usable(root)
        return found

    def _newest_usable(self, root: Path) -> tuple[Path, ckpt.TrainState, dict] | None:
        damaged = []
        for _, path in reversed(ckpt.list_checkpoints(root)):
            try:
                return self._open_checkpoint(path)
            except ckpt.DamagedCheckpoint as exc:
                damaged.append(path.name)
                if self.main:
                    aside = ckpt.set_aside(path)
                    self.say(f"{path.name} is damaged ({exc}); set aside as {aside.name}, falling back to the "
                             f"previous checkpoint")
        if damaged:
            raise CheckpointError(f"no usable checkpoint under {root}: every one is damaged ({', '.join(damaged)}, "
                                  f"set aside as .damaged); set training.resume=false to start the run over")
        return None

    def _open_checkpoint(self, path: Path) -> tuple[Path, ckpt.TrainState, dict]:
        """Read a checkpoint without applying it: state, fingerprint check, then its files (no pickle)."""
        saved = ckpt.read_state(path)
        self._check_fingerprint(path, saved)
        ckpt.check_complete(path, self.sharded, self.prepared.is_adapter)
        files = {}
        if not self.sharded:
            weights = (path / "adapter" / "adapter_model.safetensors" if self.prepared.is_adapter
                       else path / "trainable.safetensors")
            files["weights"] = ckpt.load_safetensors(weights)
            # on the CPU: load_state_dict moves each state to its parameter's device (DDP on CPU says "cpu:0",
            # which torch.load cannot map)
            files["optimizer"] = ckpt.load_torch(path / "optimizer.pt", map_location="cpu")
        files["scheduler"] = ckpt.load_torch(path / "scheduler.pt")
        files["rng"] = ckpt.load_torch(path / "rng.pt")
        if not isinstance(files["rng"], list) or len(files["rng"]) != self.processes:
            raise ckpt.DamagedCheckpoint(f"{path / 'rng.pt'}: not the generator states of {self.processes} "
                                         f"process{'es' if self.processes > 1 else ''}")
        return path, saved, files

    def _check_fingerprint(self, path: Path, saved: ckpt.TrainState) -> None:
        """Refuse a checkpoint whose settings differ, unless every difference is accepted (training.resume_changes)."""
        if saved.fingerprint.get("version") != fingerprint.FINGERPRINT_VERSION:
            raise CheckpointError(f"cannot resume from {path}: it was written by an older zhiling, whose checkpoints "
                                  f"do not record every setting of the run; finish it with that version, or set "
                                  f"training.resume=false to start over")
        changes = fingerprint.differences(saved.fingerprint, self.fingerprint)
        refused = {key: value for key, value in changes.items() if key not in self.accepted}
        if refused:
            allowed = [key.split(".", 1)[1] for key in refused if key in fingerprint.RESUMABLE]
            hint = (f"; or continue with the new values from step {saved.step} on: "
                    f"training.resume_changes=[{', '.join(allowed)}]" if len(allowed) == len(refused) else "")
            raise CheckpointError(f"cannot resume from {path}: settings differ from the checkpoint's: "
                                  f"{fingerprint.describe(refused)}. Set them back, or set training.resume=false to "
                                  f"start this run over (or choose another output.dir){hint}")
        self.applied_changes = changes

    def _resume(self) -> None:
        self.state = ckpt.TrainState(fingerprint=self.fingerprint)
        self.resumed_from = None
        self.rng_to_restore = None
        self.applied_changes = {}
        self.resumes = list((self.previous or {}).get("resumes", []))
        found = self._find_resume_point()
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if found is None:
            if self.main:
                (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
            return
        path, saved, files = found
        fresh_groups = [{key: value for key, value in group.items() if key != "params"}
                        for group in self.optimizer.param_groups]
        if self.sharded:
            self.acc.load_state(str(path / "engine"))
        else:
            self._load_weights(path, files["weights"])
            try:
                self.optimizer.load_state_dict(files["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{path / 'optimizer.pt'}: does not fit this run's optimizer ({exc})") from None
        if self.applied_changes:
            self._apply_changes(fresh_groups, saved.step)
            self.resumes.append({"from": str(path), "step": saved.step,
                                 "changed": {key: list(value) for key, value in self.applied_changes.items()}})
        else:
            self.scheduler.load_state_dict(files["scheduler"])
        self.state = saved
        self.state.fingerprint = self.fingerprint
        self.rng_to_restore = files["rng"]
        self.resumed_from = str(path)
        if self.main:
            self.metrics.keep_until(saved.step)
        changed = (f" with {fingerprint.describe(self.applied_changes)} from here on" if self.applied_changes
                   else "")
        self.say(f"resuming from {path} (step {saved.step:,} of {self.total_steps:,}){changed}; "
                 f"training.resume=false starts over")

    def _apply_changes(self, fresh_groups: list[dict], step: int) -> None:
        """training.resume_changes: the optimizer's hyperparameters as this run's config sets them (loading the
        optimizer state brought back the old ones), and the schedule built from the new settings, advanced to
        ``step``, so the learning rate from the next step on is the new schedule's."""
        for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
            group.update(fresh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no step is taken here
            for _ in range(step):
                self.scheduler.step()

    def _load_weights(self, path: Path, weights: dict) -> None:
        hint = ("Was it written with another model, method, lora.rank or lora.target_modules? Resume it with those "
                "settings, or set training.resume=false to start over")
        if self.prepared.is_adapter:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(self.model).items()}
            ckpt.check_fit(path / "adapter" / "adapter_model.safetensors", weights, expected, hint)
            set_peft_model_state_dict(self.model, weights)
        else:
            expected = {name: tuple(p.shape) for name, p in self.model.named_parameters() if p.requires_grad}
            ckpt.check_fit(path / "trainable.safetensors", weights, expected, hint)
            self.model.load_state_dict(weights, strict=False)

    # ----- 5. the loop -----------------------------------------------------------------------------------------------
    def _train_step(self, group: list[list[int]]) -> tuple[float, float, int, int]:
        """One optimizer step over ``group`` (this process's micro-batches): (loss, grad norm, tokens, labels)."""
        import torch

        batches = [self._collate(indices) for indices in group]
        weights = [1.0] * len(batches)
        if self.sharded and len(batches) < self.accum:  # DeepSpeed counts micro-batches: pad with weight 0
            weights += [0.0] * (self.accum - len(batches))
            batches += [batches[0]] * (self.accum - len(batches))
        local_labels = sum(count_labels(b) for b, w in zip(batches, weights) if w)
        local_tokens = sum(useful_tokens(b) for b, w in zip(batches, weights) if w)
        labels = self._sum_across([local_labels])[0]
        scale = self.processes / max(labels, 1.0) * (self.accum if self.setup and self.setup.kind == "deepspeed"
                                                     else 1)
        loss_sum = 0.0
        for index, (batch, weight) in enumerate(zip(batches, weights)):
            last = index == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.processes == 1 else self.acc.no_sync(self.loss_module)
            with sync:
                with self.acc.autocast():
                    out = self.loss_module(**batch)
                self.acc.backward(out.loss_sum * (scale * weight))
            loss_sum += float(out.loss_sum.detach()) * weight
        if self.cfg.training.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.trainable, self.cfg.training.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the stop requests ride along with the step's last reduction, so every process stops at the same step
        total_loss, tokens, self.stop_votes = self._sum_across([loss_sum, local_tokens, float(self.stop.requested)])
        grad_norm = float(norm) if norm is not None else float("nan")
        return total_loss / max(labels, 1.0), grad_norm, int(tokens), int(labels)

    def _evaluate(self) -> float | None:
        import torch

        if not self.eval_batches and self.data.eval is None:
            return None
        module = self.loss_module if self.sharded else self.loss_fn
        module.eval()
        loss_sum, labels = 0.0, 0
        try:
            with torch.no_grad(), self.acc.autocast():
                for indices in self.eval_batches:
                    out = module(**self._collate_from(self.data.eval, indices))
                    loss_sum += float(out.loss_sum)
                    labels += out.n_tokens
        finally:
            module.train()
        total, count = self._sum_across([loss_sum, labels])
        return total / count if count else None

    def _log_step(self, loss: float, grad_norm: float, lr: float, meter: RateMeter, progress: TrainProgress) -> None:
        state, training = self.state, self.cfg.training
        state.log_loss_sum += loss
        state.log_steps += 1
        if state.step % training.logging_steps and state.step != self.total_steps:
            return
        rate = meter.read()
        record = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / self.steps_per_epoch, 4),
                  "loss": state.log_loss_sum / state.log_steps, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": round(rate, 1), "tokens": state.tokens}
        state.log_loss_sum, state.log_steps = 0.0, 0
        self.last_loss = record["loss"]
        if self.main:
            self.metrics.log(record)
        progress.update(state.step, record["loss"], rate)

    def _maybe_evaluate(self, progress: TrainProgress) -> None:
        state = self.state
        if self.data.eval is None or (state.step % self.cfg.training.eval_steps and state.step != self.total_steps):
            return
        loss = self._evaluate()
        if loss is None:
            return
        state.last_eval_loss = loss
        state.best_eval_loss = loss if state.best_eval_loss is None else min(state.best_eval_loss, loss)
        if self.main:
            self.metrics.log({"step": state.step, "eval_loss": loss})
        progress.print(f"step {state.step}: eval loss {loss:.4f}")

    def _save_checkpoint(self) -> None:
        import torch

        rng = ckpt.capture_rng()
        states = [rng]
        if self.processes > 1:
            import torch.distributed as dist

            states = [None] * self.processes
            dist.all_gather_object(states, rng)
        root = self.out / "checkpoints"

        def write_files(folder: Path) -> None:
            if not self.sharded:
                if self.prepared.is_adapter:
                    self.model.save_pretrained(str(folder / "adapter"))
                else:
                    from safetensors.torch import save_file

                    save_file({name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters()
                               if p.requires_grad}, str(folder / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(states, folder / "rng.pt")

        if self.sharded:  # every process writes its shard of model and optimizer into the temporary folder
            tmp = root / f"checkpoint-{self.state.step}.tmp-shared"
            if self.main:
                tmp.mkdir(parents=True, exist_ok=True)
            self.acc.wait_for_everyone()
            self.acc.save_state(str(tmp / "engine"))
            self.acc.wait_for_everyone()
            if self.main:
                ckpt.write_checkpoint(root, self.state, lambda folder: (write_files(folder), _move(tmp, folder)),
                                      self.cfg.training.save_total_limit)
        elif self.main:
            ckpt.write_checkpoint(root, self.state, write_files, self.cfg.training.save_total_limit)
        self.acc.wait_for_everyone()

    def _loop(self) -> None:
        state, training = self.state, self.cfg.training
        self.last_loss = None
        progress = TrainProgress(self.total_steps, state.step, enabled=self.show_progress and self.main)
        meter = RateMeter()
        if self.rng_to_restore is not None:
            ckpt.restore_rng(self.rng_to_restore[self.rank])
        self.loss_module.train()
        started = time.perf_counter()
        try:
            while state.step < self.total_steps:
                micro = self.batching.micro_batches(state.epoch)
                steps_here = math.ceil(len(micro) / self.accum)
                while state.step_in_epoch < steps_here and state.step < self.total_steps:
                    first = state.step_in_epoch * self.accum
                    lr = self.scheduler.get_last_lr()[0]
                    loss, grad_norm, tokens, labels = self._train_step(micro[first:first + self.accum])
                    state.step += 1
                    state.step_in_epoch += 1
                    state.tokens += tokens
                    state.label_tokens += labels
                    meter.add(tokens)
                    progress.update(state.step)
                    self._log_step(loss, grad_norm, lr, meter, progress)
                    self._maybe_evaluate(progress)
                    now_time = time.perf_counter()
                    state.train_seconds += now_time - started
                    started = now_time
                    saving = state.step % training.save_steps == 0 and state.step < self.total_steps
                    if saving:
                        self._save_checkpoint()
                    if self.stop_votes and state.step < self.total_steps:
                        self._stop(saved=saving)
                if state.step_in_epoch >= steps_here:
                    state.epoch += 1
                    state.step_in_epoch = 0
        finally:
            progress.close()

    def _stop(self, saved: bool) -> None:
        """A stop was requested (SIGTERM / Ctrl-C on some process): checkpoint this step, then end the run."""
        import signal

        if not saved:
            self._save_checkpoint()
        signum = self.stop.signum or signal.SIGTERM  # another process got the signal
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after step {self.state.step:,} of "
                         f"{self.total_steps:,}; the checkpoint is {self.out / 'checkpoints'}/checkpoint-"
                         f"{self.state.step}. Run the same command to continue", exit_code=128 + int(signum))

    # ----- 6. outputs ------------------------------------------------------------------------------------------------
    def _record(self, status: str, **extra) -> dict:
        record = {"status": status, "identity": self.identity, "run_hash": self.run_hash,
                  "config": self.cfg.model_dump(mode="json"), "template": self.template.to_dict(),
                  "data": {"train": self.data.sources, "eval": self.data.eval_sources,
                           "tokenized": self.data.report, "key": self.data.key,
                           "train_rows": self.data.train_rows, "eval_rows": self.data.eval_rows},
                  "versions": versions(), "started_at": self.started_at}
        if self.resumes:
            record["resumes"] = self.resumes  # settings changed on resume (training.resume_changes), and where
        record.update(extra)
        return record

    def _finish(self) -> TrainResult:
        state = self.state
        is_adapter = self.prepared.is_adapter
        final_dir = self.out / ("adapter" if is_adapter else "model")
        result = TrainResult(self.out, final_dir, is_adapter, state.step, state.tokens, state.label_tokens,
                             state.train_seconds, self.last_loss, state.last_eval_loss, state.best_eval_loss,
                             chat_command(self.identity["model"], final_dir, is_adapter), resumed_from=self.resumed_from)
        model = self.model
        if self.sharded:
            state_dict = self.acc.get_state_dict(self.loss_module)
            state_dict = {key[len("model."):] if key.startswith("model.") else key: value
                          for key, value in state_dict.items()}
        if self.main:
            if self.sharded:
                model.save_pretrained = _with_state_dict(model.save_pretrained, state_dict)
            save_final(model, self.tokenizer, self.template, self.out, is_adapter)
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", title=f"{self.out.name}: loss")
            write_record(self.out, self._record("finished", finished_at=now(), metrics=result.to_json(),
                                                final=final_dir.name, chat_command=result.chat_command))
        self.acc.wait_for_everyone()
        return result

    # ----- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                return self._run()
            finally:
                if self.lock is not None:
                    self.lock.release()

    def _run(self) -> TrainResult:
        self._check()
        self._load_data()
        finished = self._already_finished()
        if finished is not None:
            self.say(f"{self.out} already holds this finished run; nothing to do (training.resume=false trains it "
                     f"again)")
            return finished
        self._load_model()
        self._plan()
        if self.cfg.training.compile:
            # decoder layers compiled in place (the label-only loss calls the body, not the top-level module),
            # probed on a real micro-batch so the graphs fit the training inputs
            maybe_compile(self.model, True, example_batch=self._collate(self.batching.micro_batches(0)[0]))
        self._build_optimizer()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._resume()
        self.started_at = (self.previous or {}).get("started_at") if self.resumed_from else None
        self.started_at = self.started_at or now()
        trackers = None
        if self.main:
            write_record(self.out, self._record("running"))
            if self.cfg.training.report_to:
                trackers = Trackers(self.cfg.training.report_to, self.out, self.out.name,
                                    self.cfg.model_dump(mode="json"))
                self.metrics.trackers = trackers
        try:
            with self.stop:
                self._loop()
            return self._finish()
        finally:
            if trackers is not None:
                trackers.close()


def _move(source: Path, folder: Path) -> None:
    import shutil

    shutil.move(str(source / "engine"), str(folder / "engine"))
    shutil.rmtree(source, ignore_errors=True)


def _with_state_dict(save, state_dict):
    def save_with(*args, **kwargs):
        kwargs.setdefault("state_dict", state_dict)
        return save(*args, **kwargs)

    return save_with
