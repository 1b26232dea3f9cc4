"""A tiny Baichuan-like causal LM for tests: one fused ``W_pack`` projection for query, key and value.

Real Baichuan / Baichuan 2 checkpoints ship their modelling code beside the weights and load with
``trust_remote_code=True``. This model does the same: ``make_baichuan_like`` registers the classes for the auto
classes, so ``save_pretrained`` copies this file into the model folder and writes an ``auto_map``; any process can
then load the folder with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and no network.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # lets ``gradient_checkpointing_enable`` checkpoint each layer
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover - older transformers
    _LayerBase = nn.Module


class BaichuanLikeConfig(PreTrainedConfig):
    model_type = "baichuan"

    def __init__(self, vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotary(x, position_ids, theta: float):
    """Rotary position embedding of ``x`` [batch, heads, seq, head_dim] at ``position_ids`` [batch, seq]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = position_ids[:, None, :, None].float() * inv_freq  # [batch, 1, seq, dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return (x.float() * angles.cos() + _rotate_half(x.float()) * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: BaichuanLikeConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, mask, position_ids):
        batch, seq, _ = hidden.shape
        q, k, v = self.W_pack(hidden).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _rotary(q, position_ids, self.theta), _rotary(k, position_ids, self.theta)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: BaichuanLikeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(_LayerBase):
    def __init__(self, config: BaichuanLikeConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, mask, position_ids):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, position_ids)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def _attention_bias(attention_mask, batch: int, seq: int, dtype, device):
    """A boolean [batch, 1, seq, seq] mask (True = may attend) from a 2-D padding mask or a ready 4-D mask."""
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal[None, None].expand(batch, 1, seq, seq)
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask == 0 if attention_mask.min() < 0 else attention_mask.bool()
    keep = attention_mask.bool()[:, None, None, :]
    return causal[None, None] & keep


class BaichuanLikePreTrainedModel(PreTrainedModel):
    config_class = BaichuanLikeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class BaichuanLikeModel(BaichuanLikePreTrainedModel):
    def __init__(self, config: BaichuanLikeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device)[None].expand(batch, seq)
        mask = _attention_bias(attention_mask, batch, seq, hidden.dtype, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, mask, position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


class BaichuanLikeForCausalLM(BaichuanLikePreTrainedModel, GenerationMixin):
    """Generation recomputes the whole sequence at every step (no key/value cache): fine for a test model."""

    def __init__(self, config: BaichuanLikeConfig):
        super().__init__(config)
        self.model = BaichuanLikeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep=0, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept).float()
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def make_baichuan_like(vocab_size: int, hidden: int = 32, layers: int = 2) -> BaichuanLikeForCausalLM:
    """A random tiny Baichuan-like model whose ``save_pretrained`` folder loads with ``trust_remote_code=True``."""
    BaichuanLikeConfig.register_for_auto_class()
    BaichuanLikeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = BaichuanLikeConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=layers)
    return BaichuanLikeForCausalLM(config)

