"""The one model loader: hub id, local folder, GGUF file, or the embedded default; optional 4/8-bit; optional adapter.

Every command (train, chat, predict, serve, eval, merge, export) loads models through here, so device, dtype and
quantization choices are made in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhiling.config import ModelConfig, QuantizationConfig
from zhiling.errors import ZhilingError
from zhiling.models.gguf_convert import default_model_dir, ensure_converted


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer are read from after resolution (``path`` is a folder or a hub id)."""

    path: str
    kind: str  # "default", "gguf", "folder", "hub"
    origin: str  # what the user gave


def resolve_source(cfg: ModelConfig) -> ModelSource:
    name = cfg.name_or_path
    if not name or name == "default":
        return ModelSource(str(default_model_dir(cfg.cache_dir)), "default", "default (Gemma 3 270M, embedded)")
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or (cfg.gguf_file and path.is_dir()):
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise ZhilingError(f"model: GGUF file not found: {gguf}")
        return ModelSource(str(ensure_converted(gguf, cfg.cache_dir)), "gguf", str(gguf))
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = (" (it looks like a LoRA adapter: pass it as --adapter, with the base model as --model)"
                    if (path / "adapter_config.json").is_file() else "")
            raise ZhilingError(f"model: folder {path} has no config.json{hint}")
        return ModelSource(str(path), "folder", name)
    if path.exists():
        raise ZhilingError(f"model: {path} is neither a model folder nor a .gguf file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ZhilingError(f"model: folder not found: {name}")
    if cfg.gguf_file:
        from huggingface_hub import hf_hub_download

        gguf = Path(hf_hub_download(name, cfg.gguf_file, revision=cfg.revision))
        return ModelSource(str(ensure_converted(gguf, cfg.cache_dir)), "gguf", f"{name}/{cfg.gguf_file}")
    return ModelSource(name, "hub", name)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ZhilingError(f"model.device is '{device}' but CUDA is not available on this machine")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ZhilingError("model.device is 'mps' but MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """auto: bf16 on CUDA where supported, fp16 on older CUDA, fp32 on CPU (bf16 matmul is slow there) and MPS."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    """The tokenizer, with a pad token guaranteed (the EOS when the model defines none)."""
    from transformers import AutoTokenizer

    source = source or resolve_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, revision=cfg.revision if source.kind == "hub" else None,
                                                  trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise ZhilingError(f"could not load the tokenizer of '{source.origin}': {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def bnb_config(quant: QuantizationConfig | None, device: str):
    """A transformers ``BitsAndBytesConfig`` for 4/8-bit loading, or None."""
    if quant is None or not quant.bits:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ZhilingError("4/8-bit loading needs bitsandbytes: pip install 'zhiling[qlora]'") from exc
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = (resolve_dtype("auto", device) if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute)


def load_model(cfg: ModelConfig, quant: QuantizationConfig | None = None, adapter: str | None = None,
               source: ModelSource | None = None, trainable_adapter: bool = False):
    """Load the causal LM on the resolved device and dtype; with ``adapter``, wrap it in that PEFT adapter."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if source.kind == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = bnb_config(quant, device)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        raise ZhilingError(f"could not load model '{source.origin}': {exc}") from exc
    if quantization is None:
        model.to(device)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    return model


def attach_adapter(model, adapter: str, trainable: bool = False):
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ZhilingError(f"adapter: {adapter} has no adapter_config.json (expected a PEFT adapter folder, "
                           f"such as OUTPUT/adapter of a training run)")
    check_adapter_matches(model, path)
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def check_adapter_matches(model, adapter_dir: Path) -> None:
    """Refuse an adapter whose recorded base model shape differs from this model's (a wrong base model)."""
    import json

    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0]
            for prefix in ("base_model.model.", ""):
                stripped = name[len(prefix):] if name.startswith(prefix) else name
                if stripped in modules:
                    break
            else:
                config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
                raise ZhilingError(f"adapter {adapter_dir} does not fit this model: it has no module '{name}' "
                                   f"(the adapter was trained on {config.get('base_model_name_or_path') or 'another model'})")
            module = modules[stripped]
            shape = handle.get_slice(key).get_shape()
            in_features = getattr(module, "in_features", None)
            out_features = getattr(module, "out_features", None)
            if ".lora_A." in key and in_features is not None and shape[1] != in_features:
                raise ZhilingError(f"adapter {adapter_dir} does not fit this model: {name} takes {in_features} inputs "
                                   f"here but {shape[1]} in the adapter (trained on a different base model)")
            if ".lora_B." in key and out_features is not None and shape[0] != out_features:
                raise ZhilingError(f"adapter {adapter_dir} does not fit this model: {name} gives {out_features} "
                                   f"outputs here but {shape[0]} in the adapter (trained on a different base model)")


def model_type_of(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None) -> str | None:
    """The config's ``model_type`` (picks the family default template), or None when there is no readable config.
    ``revision`` applies to a hub model only, as in ``load_tokenizer``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                          revision=revision if source.kind == "hub" else None).model_type
    except (OSError, ValueError):
        return None
