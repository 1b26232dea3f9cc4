"""Tiny tokenizers and random models built in the test run, so unit tests take seconds and need no download."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
               "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<reserved_102>", "<reserved_103>",
               "<reserved_106>", "<reserved_107>"]

CORPUS = [
    "下面是一条描述任务的指令。请写出恰当完成该任务的回答。", "### 指令：", "### 回答：", "### Instruction:", "### Response:",
    "Human: Assistant: User: [Round 1] 问：答：", "你好，世界！今天天气很好。", "请找出句子中的实体：张三在北京大学读书。",
    "张三_人名\n北京大学_机构名", "没有", "积极", "消极", "这部电影真好看，我很喜欢。", "服务太差了，再也不来了。",
    "The quick brown fox jumps over the lazy dog.", "Below is an instruction that describes a task.",
    "hello world, how are you? I am fine, thank you.", "0123456789", "春眠不觉晓，处处闻啼鸟。", "上海 广州 深圳 杭州 南京",
    "请列出三种水果：苹果、香蕉、橙子。", "把句子改写成疑问句：他去了上海。他去了上海吗？",
]


def make_tokenizer(path: str | Path | None = None, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on a small Chinese/English corpus (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


FAMILIES = ["llama", "qwen2", "gemma3", "bloom", "glm", "baichuan"]


def make_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bloom":
        return AutoConfig.for_model("bloom", hidden_size=hidden, n_layer=layers, n_head=4, vocab_size=vocab_size,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs = dict(common, hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if family == "gemma3":
        return AutoConfig.for_model("gemma3_text", head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
                                    **kwargs)
    if family == "glm":
        return AutoConfig.for_model("glm", head_dim=8, **kwargs)
    if family in ("llama", "qwen2"):
        return AutoConfig.for_model(family, **kwargs)
    raise ValueError(f"no tiny config for {family}")


def make_model(family: str, tokenizer, seed: int = 0, path: str | Path | None = None):
    """A random tiny model of this family (saved with the tokenizer when ``path`` is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if family == "baichuan":
        from baichuan_like import make_baichuan_like

        model = make_baichuan_like(len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_config(make_config(family, len(tokenizer)))
    if path is not None:
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return model
