"""Several processes and machines: the torchrun command line, and DeepSpeed / FSDP config files.

``zhiling train CONFIG --nproc N`` re-runs the same command under ``python -m torch.distributed.run``; each process
runs the ordinary training loop, which joins the process group through accelerate (NCCL on GPUs, gloo on CPU).

``training.distributed_config`` takes a DeepSpeed JSON file (ZeRO stage 0-3) or an accelerate config YAML
(``distributed_type: DEEPSPEED`` or ``FSDP``). Both are checked when the config is loaded, before anything heavy:
values that zhiling decides itself (batch size, accumulation, clipping, optimizer) must be ``auto`` or agree with the
training section, so the two files can never disagree silently.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zhiling.config import TrainingConfig
from zhiling.errors import ConfigError, ZhilingError
from zhiling.names import suggestion


@dataclass
class DistributedSetup:
    kind: str  # "deepspeed", "fsdp" or "ddp"
    path: str
    plugin_kwargs: dict[str, Any] = field(default_factory=dict)
    num_processes: int | None = None
    mixed_precision: str | None = None

    def describe(self) -> str:
        if self.kind == "deepspeed":
            config = self.plugin_kwargs.get("hf_ds_config") or {}
            stage = config.get("zero_optimization", {}).get("stage", self.plugin_kwargs.get("zero_stage", 0))
            return f"DeepSpeed ZeRO-{stage} ({self.path})"
        if self.kind == "fsdp":
            return f"FSDP {self.plugin_kwargs.get('sharding_strategy', 'FULL_SHARD')} ({self.path})"
        return f"DDP ({self.path})"


# ----- DeepSpeed JSON ------------------------------------------------------------------------------------------------
_OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def _auto_or_equal(config: dict, key: str, expected, where: str, setting: str) -> None:
    value = config.get(key, "auto")
    if value != "auto" and value != expected:
        raise ConfigError(f"{where}: {key} is {value!r} but {setting} is {expected!r}; set it to \"auto\" "
                          f"(zhiling fills it in) or make the two agree")


def check_deepspeed_dict(config: Any, where: str, training: TrainingConfig) -> dict:
    """Validate a DeepSpeed config against the training section; returns it unchanged."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a DeepSpeed config must be a JSON object, not {type(config).__name__}")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage!r}")
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part)
        if offload is None:
            continue
        if not isinstance(offload, dict) or offload.get("device", "none") not in _OFFLOAD_DEVICES:
            raise ConfigError(f"{where}: zero_optimization.{part}.device must be one of {', '.join(_OFFLOAD_DEVICES)}")
        if offload.get("device") == "nvme" and not offload.get("nvme_path"):
            raise ConfigError(f"{where}: zero_optimization.{part} offloads to nvme but gives no nvme_path")
        if part == "offload_param" and offload.get("device", "none") != "none" and stage != 3:
            raise ConfigError(f"{where}: offload_param needs ZeRO stage 3 (this config has stage {stage})")
    _auto_or_equal(config, "train_micro_batch_size_per_gpu", training.per_device_batch_size, where,
                   "training.per_device_batch_size")
    _auto_or_equal(config, "gradient_accumulation_steps", training.gradient_accumulation_steps, where,
                   "training.gradient_accumulation_steps")
    _auto_or_equal(config, "gradient_clipping", training.max_grad_norm, where, "training.max_grad_norm")
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ConfigError(f"{where}: remove the '{owned}' section; the {owned} comes from the training section "
                              f"(training.optimizer / training.lr_scheduler)")
    enabled = [name for name in ("fp16", "bf16")
               if isinstance(config.get(name), dict) and config[name].get("enabled") is True]
    if len(enabled) > 1:
        raise ConfigError(f"{where}: fp16 and bf16 cannot both be enabled")
    if enabled and training.precision not in ("auto", enabled[0]):
        raise ConfigError(f"{where}: {enabled[0]} is enabled but training.precision is {training.precision}")
    return config


def read_deepspeed_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None


# ----- accelerate YAML -----------------------------------------------------------------------------------------------
_ACCELERATE_KEYS = {
    "compute_environment", "distributed_type", "mixed_precision", "num_processes", "num_machines", "machine_rank",
    "main_process_ip", "main_process_port", "main_training_function", "rdzv_backend", "same_network", "use_cpu",
    "downcast_bf16", "debug", "enable_cpu_affinity", "gpu_ids", "deepspeed_config", "fsdp_config", "tpu_env",
    "tpu_use_cluster", "tpu_use_sudo", "dynamo_config",
}
_DEEPSPEED_KEYS = {
    "deepspeed_config_file": None, "zero_stage": "zero_stage", "offload_optimizer_device": "offload_optimizer_device",
    "offload_param_device": "offload_param_device", "offload_optimizer_nvme_path": "offload_optimizer_nvme_path",
    "offload_param_nvme_path": "offload_param_nvme_path", "zero3_init_flag": "zero3_init_flag",
    "zero3_save_16bit_model": "zero3_save_16bit_model", "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping", "deepspeed_multinode_launcher": None,
}
_FSDP_KEYS = {
    "fsdp_version": "fsdp_version", "fsdp_sharding_strategy": "sharding_strategy",
    "fsdp_reshard_after_forward": "reshard_after_forward", "fsdp_auto_wrap_policy": "auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap", "fsdp_min_num_params": "min_num_params",
    "fsdp_state_dict_type": "state_dict_type", "fsdp_offload_params": "cpu_offload",
    "fsdp_backward_prefetch": "backward_prefetch", "fsdp_forward_prefetch": "forward_prefetch",
    "fsdp_use_orig_params": "use_orig_params", "fsdp_sync_module_states": "sync_module_states",
    "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "fsdp_activation_checkpointing": "activation_checkpointing", "fsdp_backward_prefetch_policy": "backward_prefetch",
}
_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
_STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT")


def _unknown(key: str, known, where: str, section: str) -> ConfigError:
    return ConfigError(f"{where}: unknown key '{section}{key}'{suggestion(key, sorted(known), otherwise='known keys')}")


def _check_mapping(value, where: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a mapping")
    return value


def _deepspeed_from_accelerate(section: dict, where: str, folder: Path, training: TrainingConfig) -> dict:
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _DEEPSPEED_KEYS:
            raise _unknown(key, _DEEPSPEED_KEYS, where, "deepspeed_config.")
        if key == "deepspeed_config_file":
            path = Path(value) if Path(value).is_absolute() else folder / value
            if not path.is_file():
                raise ConfigError(f"{where}: deepspeed_config_file not found: {path}")
            kwargs["hf_ds_config"] = check_deepspeed_dict(read_deepspeed_json(path), str(path), training)
        elif _DEEPSPEED_KEYS[key]:
            kwargs[_DEEPSPEED_KEYS[key]] = value
    if "zero_stage" in kwargs and kwargs["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: deepspeed_config.zero_stage must be 0, 1, 2 or 3, not {kwargs['zero_stage']!r}")
    for key in ("offload_optimizer_device", "offload_param_device"):
        if key in kwargs and kwargs[key] not in _OFFLOAD_DEVICES:
            raise ConfigError(f"{where}: deepspeed_config.{key} must be one of {', '.join(_OFFLOAD_DEVICES)}")
    if kwargs.get("gradient_accumulation_steps", training.gradient_accumulation_steps) != \
            training.gradient_accumulation_steps:
        raise ConfigError(f"{where}: deepspeed_config.gradient_accumulation_steps is "
                          f"{kwargs['gradient_accumulation_steps']} but training.gradient_accumulation_steps is "
                          f"{training.gradient_accumulation_steps}")
    kwargs["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    return kwargs


def _fsdp_from_accelerate(section: dict, where: str) -> dict:
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _FSDP_KEYS:
            raise _unknown(key, _FSDP_KEYS, where, "fsdp_config.")
        kwargs[_FSDP_KEYS[key]] = value
    checks = (("sharding_strategy", _SHARDING), ("auto_wrap_policy", _WRAP_POLICIES),
              ("state_dict_type", _STATE_DICT_TYPES))
    for name, allowed in checks:
        if name in kwargs and str(kwargs[name]).upper() not in allowed:
            raise ConfigError(f"{where}: fsdp_config: {name} {kwargs[name]!r} is not one of {', '.join(allowed)}")
    if "fsdp_version" in kwargs and kwargs["fsdp_version"] not in (1, 2):
        raise ConfigError(f"{where}: fsdp_config.fsdp_version must be 1 or 2")
    if isinstance(kwargs.get("transformer_cls_names_to_wrap"), str):
        kwargs["transformer_cls_names_to_wrap"] = [name.strip() for name in
                                                   kwargs["transformer_cls_names_to_wrap"].split(",")]
    return kwargs


def _read_accelerate_yaml(path: Path, training: TrainingConfig) -> DistributedSetup:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    data = _check_mapping(data, where, "an accelerate config")
    for key in data:
        if key not in _ACCELERATE_KEYS:
            raise _unknown(key, _ACCELERATE_KEYS, where, "")
    kind = str(data.get("distributed_type", "")).upper()
    if kind not in ("DEEPSPEED", "FSDP", "MULTI_GPU", "MULTI_CPU", "NO"):
        raise ConfigError(f"{where}: distributed_type must be DEEPSPEED, FSDP, MULTI_GPU, MULTI_CPU or NO "
                          f"(got {data.get('distributed_type')!r})")
    mixed = data.get("mixed_precision")
    if mixed not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"{where}: mixed_precision must be no, fp16 or bf16 (got {mixed!r})")
    processes = data.get("num_processes")
    if processes is not None and (not isinstance(processes, int) or processes < 1):
        raise ConfigError(f"{where}: num_processes must be a positive integer")
    if kind == "DEEPSPEED":
        section = _check_mapping(data.get("deepspeed_config", {}), where, "deepspeed_config")
        kwargs = _deepspeed_from_accelerate(section, where, path.parent, training)
        setup = DistributedSetup("deepspeed", where, kwargs, processes, mixed)
    elif kind == "FSDP":
        section = _check_mapping(data.get("fsdp_config", {}), where, "fsdp_config")
        setup = DistributedSetup("fsdp", where, _fsdp_from_accelerate(section, where), processes, mixed)
    else:
        setup = DistributedSetup("ddp", where, {}, processes, mixed)
    return setup


def load_distributed_config(path: str | Path, training: TrainingConfig) -> DistributedSetup:
    """Read and check a DeepSpeed JSON or accelerate YAML file, and build its accelerate plugin once as a check."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"training.distributed_config: file not found: {path}")
    if path.suffix.lower() == ".json":
        config = check_deepspeed_dict(read_deepspeed_json(path), str(path), training)
        setup = DistributedSetup("deepspeed", str(path), {"hf_ds_config": config,
                                                          "gradient_accumulation_steps":
                                                              training.gradient_accumulation_steps})
    elif path.suffix.lower() in (".yaml", ".yml"):
        setup = _read_accelerate_yaml(path, training)
    else:
        raise ConfigError(f"training.distributed_config: {path} must be a DeepSpeed .json or an accelerate .yaml file")
    make_plugin(setup)
    return setup


def make_plugin(setup: DistributedSetup):
    """The accelerate plugin object for this setup (None for plain DDP). Building it needs neither GPUs nor
    deepspeed, so it doubles as a check of the values."""
    if setup.kind == "ddp":
        return None
    import warnings

    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if setup.kind == "deepspeed":
                kwargs = dict(setup.plugin_kwargs)
                if "hf_ds_config" in kwargs:  # accelerate fills in "auto" values in place: give it a copy
                    kwargs["hf_ds_config"] = copy.deepcopy(kwargs["hf_ds_config"])
                return DeepSpeedPlugin(**kwargs)
            return FullyShardedDataParallelPlugin(**setup.plugin_kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{setup.path}: rejected by accelerate: {exc}") from None


def check_runtime(setup: DistributedSetup | None) -> None:
    """What this machine needs to run the setup (checked before training starts)."""
    if setup is None or setup.kind == "ddp":
        return
    import torch

    if not torch.cuda.is_available():
        raise ZhilingError(f"{setup.describe()} needs CUDA GPUs, and this machine has none; drop "
                           f"training.distributed_config to train with plain DDP (CPU or GPU)")
    if setup.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ZhilingError(f"{setup.describe()} needs the deepspeed package: pip install deepspeed")


# ----- torchrun ------------------------------------------------------------------------------------------------------
def torchrun_command(config: str, overrides: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None,
                     extra: list[str] | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m zhiling train CONFIG overrides``: one process per device."""
    if nproc < 1:
        raise ZhilingError(f"--nproc must be at least 1 (got {nproc})")
    if nnodes < 1:
        raise ZhilingError(f"--nnodes must be at least 1 (got {nnodes})")
    if not 0 <= node_rank < nnodes:
        raise ZhilingError(f"--node-rank must be between 0 and {nnodes - 1} (got {node_rank})")
    if nnodes > 1 and not master_addr:
        raise ZhilingError("a run over several machines needs --master-addr (the address of the node with rank 0)")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and master_addr is None and master_port is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                    f"--master_port={master_port or 29500}"]
    return command + ["-m", "zhiling", "train", config, *overrides, *(extra or [])]


# ----- the launcher and its workers live and die together -------------------------------------------------------------
def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (torchrun starts each worker in a session of
    its own, so a kill of the launcher's process group would otherwise leave the workers training on). Elsewhere a
    no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(137)


def run_torchrun(command: list[str]) -> int:
    """Run torchrun until it ends and return its exit status.

    torchrun runs in a process group of its own and dies with this process (``die_with_parent``; its workers die
    with it), so ``kill -9`` of this process or of its process group leaves no worker behind. SIGINT (Ctrl-C) and
    SIGTERM here are passed on once, as SIGTERM: torchrun sends it to the workers, which save a checkpoint at the
    next step boundary and stop. A second signal kills torchrun at once.
    """
    import signal
    import subprocess

    process = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            print(f"{signal.Signals(signum).name}: asking the workers to save a checkpoint and stop after this step "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
            process.send_signal(signal.SIGTERM)
        else:
            process.kill()

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
