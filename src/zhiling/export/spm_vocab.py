"""A SentencePiece ``tokenizer.model`` rebuilt from the vocabulary inside a GGUF file.

A model loaded from GGUF (such as the embedded default, Gemma 3 270M) is saved with a ``tokenizer.json`` only.
llama.cpp's converter reads Gemma / Llama-2 style vocabularies from ``tokenizer.model`` (pieces, scores, types);
without it, it falls back to a byte-level BPE path that does not know this tokenizer. The GGUF file the model came
from holds exactly those pieces, scores and types, so we write them back as a SentencePiece model.

The protobuf message is small and stable, so it is encoded here by hand (no protobuf dependency):
``ModelProto { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2; NormalizerSpec normalizer_spec = 3 }``
and ``SentencePiece { string piece = 1; float score = 2; Type type = 3 }``, whose type numbers equal GGUF's token
types (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from zhiling.errors import ZhilingError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _float_field(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def encode_model(pieces: list[bytes], scores: list[float], types: list[int], *, unk_id: int, bos_id: int,
                 eos_id: int, pad_id: int, add_dummy_prefix: bool = False) -> bytes:
    """The serialized SentencePiece ``ModelProto`` for these pieces (a BPE model with byte fallback when all 256
    byte pieces are present)."""
    if not (len(pieces) == len(scores) == len(types)):
        raise ValueError("pieces, scores and types differ in length")
    body = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        body += _bytes_field(1, _bytes_field(1, piece) + _float_field(2, float(score)) + _int_field(3, int(kind)))
    byte_fallback = sum(1 for kind in types if kind == BYTE) == 256
    trainer = (_int_field(3, _BPE) + _int_field(35, int(byte_fallback)) + _int_field(40, unk_id)
               + _int_field(41, bos_id) + _int_field(42, eos_id) + _int_field(43, pad_id))
    normalizer = (_bytes_field(1, b"identity") + _int_field(3, int(add_dummy_prefix)) + _int_field(4, 0)
                  + _int_field(5, 1))
    body += _bytes_field(2, trainer) + _bytes_field(3, normalizer)
    return bytes(body)


@dataclass(frozen=True)
class GgufVocab:
    """The vocabulary stored in a GGUF file (``model`` 'llama' is SentencePiece-style)."""

    model: str
    pieces: list[bytes]
    scores: list[float]
    types: list[int]
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_space_prefix: bool


def read_gguf_vocab(gguf_path: str | Path, require_spm: bool = True) -> GgufVocab:
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    reader = GGUFReader(str(gguf_path))

    def field(key: str):
        found = reader.fields.get(key)
        if found is None:
            raise ZhilingError(f"{gguf_path}: no '{key}' in its metadata")
        return found

    model = field("tokenizer.ggml.model").contents()
    if require_spm and model != "llama":
        raise ZhilingError(f"{gguf_path}: its vocabulary is '{model}', not a SentencePiece ('llama') one; "
                           f"a tokenizer.model cannot be rebuilt from it")
    tokens = field("tokenizer.ggml.tokens")
    pieces = [bytes(tokens.parts[index]) for index in tokens.data]
    scores_field = reader.fields.get("tokenizer.ggml.scores")
    scores = list(scores_field.contents()) if scores_field is not None else [0.0] * len(pieces)
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types_field.contents()] if types_field is not None else [NORMAL] * len(pieces)

    def special(name: str, default: int = -1) -> int:
        found = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        return int(found.contents()) if found is not None else default

    unk_id = special("unknown")
    if unk_id < 0:
        unk_id = next((i for i, piece in enumerate(pieces) if piece == b"<unk>"), -1)
    space = reader.fields.get("tokenizer.ggml.add_space_prefix")
    return GgufVocab(model, pieces, scores, types, unk_id, special("bos"), special("eos"), special("padding"),
                     bool(space.contents()) if space is not None else False)


def write_spm_from_gguf(gguf_path: str | Path, out_path: str | Path) -> Path:
    """Write ``tokenizer.model`` for the SentencePiece vocabulary stored in ``gguf_path``."""
    return write_spm(read_gguf_vocab(gguf_path), out_path, str(gguf_path))


def write_spm(vocab: GgufVocab, out_path: str | Path, where: str = "GGUF") -> Path:
    """Write ``tokenizer.model`` for a SentencePiece-style GGUF vocabulary."""
    if vocab.model != "llama":
        raise ZhilingError(f"{where}: its vocabulary is '{vocab.model}', not a SentencePiece ('llama') one; "
                           f"a tokenizer.model cannot be rebuilt from it")
    if vocab.unk_id < 0:
        raise ZhilingError(f"{where}: its vocabulary has no unknown token, which SentencePiece requires")
    types = [UNKNOWN if i == vocab.unk_id else (CONTROL if kind == UNKNOWN else kind)
             for i, kind in enumerate(vocab.types)]
    data = encode_model(vocab.pieces, vocab.scores, types, unk_id=vocab.unk_id, bos_id=vocab.bos_id,
                        eos_id=vocab.eos_id, pad_id=vocab.pad_id, add_dummy_prefix=vocab.add_space_prefix)
    out_path = Path(out_path)
    out_path.write_bytes(data)
    return out_path


def added_tokens_from_gguf(vocab: GgufVocab) -> dict[str, dict]:
    """``added_tokens_decoder`` entries (tokenizer_config.json) for the control and user-defined tokens.

    SentencePiece's Python API cannot tell user-defined pieces from normal ones, so llama.cpp's converter learns
    them from here; without it tokens such as Gemma's runs of spaces would be split differently by llama.cpp."""
    return {str(i): {"content": piece.decode("utf-8", "replace"), "special": kind == CONTROL}
            for i, (piece, kind) in enumerate(zip(vocab.pieces, vocab.types)) if kind in (CONTROL, USER_DEFINED)}
