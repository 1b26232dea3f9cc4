"""Training methods: which parameters train and how the base model is wrapped.

lora / dora / rslora / qlora wrap the base model in a PEFT LoRA adapter (qlora on a 4-bit base; lora may also sit on
an 8-bit base with ``quantization.bits: 8``); ``full`` trains every weight; ``freeze`` trains only the last N decoder
layers. Target modules: explicit names, ``all-linear`` (every linear layer but the output head), or ``auto``: the
family's attention projections (the classic Chinese LoRA recipes: ``q/k/v/o_proj``; Baichuan's fused ``W_pack``;
ChatGLM and Bloom's fused ``query_key_value``). Names are checked against the model before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zhiling.config import LoraConfig, QuantizationConfig, ZhilingConfig
from zhiling.errors import ConfigError, ZhilingError

ADAPTER_METHODS = ("lora", "dora", "rslora", "qlora")

_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAMILY_TARGETS: dict[str, list[str]] = {
    **{family: _QKVO for family in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
        "gemma3_text", "glm", "glm4", "olmo", "olmo2")},
    "baichuan": ["W_pack", "o_proj"],
    "chatglm": ["query_key_value", "dense"],
    "bloom": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "gpt_neox": ["query_key_value", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "internlm2": ["wqkv", "wo"],
    "gpt2": ["c_attn", "c_proj"],
}
# Families not in the table: the first group whose names all exist in the model.
_ATTENTION_GROUPS = [_QKVO, ["W_pack", "o_proj"], ["query_key_value", "dense"], ["qkv_proj", "o_proj"],
                     ["wqkv", "wo"], ["q_proj", "v_proj"]]


@dataclass
class PreparedModel:
    model: object
    method: str
    trainable_params: int
    total_params: int
    target_modules: list[str] = field(default_factory=list)
    trained_layers: list[int] = field(default_factory=list)  # freeze: indices of the trained decoder layers

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS


# ----- quantization --------------------------------------------------------------------------------------------------
def method_quantization(cfg: ZhilingConfig) -> QuantizationConfig | None:
    """The quantization the method needs: qlora -> 4-bit; lora may sit on a 4/8-bit base; full/freeze need none."""
    method, quant = cfg.training.method, cfg.quantization
    if method == "qlora":
        if quant.bits == 8:
            raise ConfigError("training.method=qlora trains on a 4-bit base, but quantization.bits=8; for LoRA on an "
                              "8-bit base use training.method=lora with quantization.bits=8")
        return quant.model_copy(update={"bits": 4})
    if quant.bits and method in ("full", "freeze"):
        raise ConfigError(f"training.method={method} updates the base weights, which cannot be trained in "
                          f"{quant.bits} bits; remove quantization.bits or use an adapter method (lora, qlora)")
    return quant if quant.bits else None


# ----- target modules ------------------------------------------------------------------------------------------------
def _output_layer_names(model) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def linear_layer_names(model) -> list[str]:
    """Leaf names of the linear layers (plain, 4-bit or 8-bit) other than the output head, in model order."""
    import torch

    heads = _output_layer_names(model)
    names: list[str] = []
    for name, module in model.named_modules():
        if name in heads or not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names and leaf not in ("lm_head", "output", "embed_out"):
            names.append(leaf)
    return names


def resolve_target_modules(model, lora: LoraConfig) -> list[str]:
    """The leaf module names the adapter attaches to, checked against the model."""
    linear = linear_layer_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    wanted = lora.target_modules
    if wanted == "all-linear" or wanted == ["all-linear"]:
        if not linear:
            raise ZhilingError("target_modules=all-linear: this model has no linear layers besides the output head")
        return linear
    if wanted == "auto" or wanted == ["auto"]:
        candidates = [FAMILY_TARGETS[model_type]] if model_type in FAMILY_TARGETS else []
        for group in candidates + _ATTENTION_GROUPS:
            if all(name in linear for name in group):
                return list(group)
        raise ZhilingError(f"no default LoRA target modules for model type '{model_type}'; set lora.target_modules "
                           f"to some of its linear layers ({', '.join(linear)}) or to all-linear")
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [name for name in names if name not in linear]
    if missing:
        family = f" ({model_type})" if model_type else ""
        raise ConfigError(f"lora.target_modules: no linear layer named {', '.join(repr(m) for m in missing)} in this "
                          f"model{family}; its linear layers are: {', '.join(linear)} (or use all-linear / auto)")
    return names


# ----- decoder layers (freeze) ---------------------------------------------------------------------------------------
def decoder_layers(model):
    """The model's list of decoder layers: the longest ``ModuleList`` of identical blocks."""
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ZhilingError("training.method=freeze: cannot find the decoder layers of this model")
    return best


def _freeze_all_but_last(model, count: int) -> list[int]:
    name, layers = decoder_layers(model)
    if count > len(layers):
        raise ConfigError(f"training.freeze_trainable_layers={count}, but the model has only {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    trained = list(range(len(layers) - count, len(layers)))
    for index in trained:
        for param in layers[index].parameters():
            param.requires_grad_(True)
    return trained


# ----- preparing the model -------------------------------------------------------------------------------------------
def peft_lora_config(cfg: ZhilingConfig, targets: list[str]):
    from peft import LoraConfig as PeftLoraConfig

    lora, method = cfg.lora, cfg.training.method
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          modules_to_save=list(lora.modules_to_save) or None, bias=lora.bias, task_type="CAUSAL_LM",
                          use_dora=method == "dora", use_rslora=method == "rslora")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their real number of values."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training.

    bitsandbytes (0.50) converts a ``Linear4bit`` weight to an AVX512-BF16 layout the first time the layer runs in
    eval mode without gradients (a validation pass, a check), and from then on uses a kernel that has no backward:
    gradients stop flowing through every 4-bit layer, silently (LoRA weights below it get zero gradients). Turning
    the conversion off keeps the training path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_model(model, cfg: ZhilingConfig, quantized: bool) -> PreparedModel:
    """Make only the method's parameters trainable (wrapping in a new PEFT adapter where needed).

    A model that already carries an adapter (``init_adapter``) keeps it and trains it further.
    """
    method = cfg.training.method
    gradient_checkpointing = cfg.training.gradient_checkpointing
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_4bit_trainable_on_cpu(model)
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] = []
    trained_layers: list[int] = []
    if method in ADAPTER_METHODS:
        import warnings

        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            targets = sorted(model.peft_config["default"].target_modules or [])
        else:
            targets = resolve_target_modules(model, cfg.lora)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = get_peft_model(model, peft_lora_config(cfg, targets))
    elif method == "freeze":
        trained_layers = _freeze_all_but_last(model, cfg.training.freeze_trainable_layers)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ZhilingError(f"training.method={method}: no parameter is trainable")
    return PreparedModel(model, method, trainable, total, targets, trained_layers)
