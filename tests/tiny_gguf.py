"""A tiny random GGUF model (llama architecture, SentencePiece-style vocabulary) written with gguf-py, for fast
tests of the llama.cpp backend and of GGUF file handling."""

from __future__ import annotations

import numpy as np

CONTROL_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
TEXT = ("下面是一条描述任务的指令。请写出恰当完成该任务的回答。你好世界今天天气很好请找出句子中的实体张三在北京大学读书"
        "春眠不觉晓处处闻啼鸟上海广州深圳杭州南京指令回答问答：，。！？、 \n#") + "".join(map(chr, range(33, 127)))
PIECES = ["▁the", "▁a", "你好", "天气", "北京", "指令", "回答", "###", "▁###", "：\n"]


def write_tiny_gguf(path, *, chat_template=None, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, ff=128):
    """A random llama-architecture model with a SentencePiece-style vocabulary (bytes, characters, a few merges)."""
    from gguf import GGUFWriter

    tokens = ["<unk>", "<s>", "</s>", *CONTROL_TOKENS]
    types = [2, 3, 3] + [3] * len(CONTROL_TOKENS)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    singles = ["▁"] + sorted({ch for ch in TEXT if ch != " "})
    tokens += singles + PIECES
    types += [1] * (len(singles) + len(PIECES))
    scores = [0.0] * (len(tokens) - len(PIECES)) + [-float(i) for i in range(len(PIECES))]
    vocab = len(tokens)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)

    def weight(*shape, scale=0.15):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(vocab, hidden, scale=1.0))
    for block in range(layers):
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{block}.attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(f"blk.{block}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{block}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{block}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{block}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{block}.ffn_gate.weight", weight(ff, hidden))
        writer.add_tensor(f"blk.{block}.ffn_up.weight", weight(ff, hidden))
        writer.add_tensor(f"blk.{block}.ffn_down.weight", weight(hidden, ff))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden, scale=0.5))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
