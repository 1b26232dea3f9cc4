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


def _field(reader, key: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ZhilingError(f"{reader.path if hasattr(reader, 'path') else 'GGUF'}: no '{key}' in its metadata")
        return None
    return field


def write_spm_from_gguf(gguf_path: str | Path, out_path: str | Path) -> Path:
    """Write ``tokenizer.model`` for the SentencePiece vocabulary stored in ``gguf_path``."""
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    reader = GGUFReader(str(gguf_path))
    model = _field(reader, "tokenizer.ggml.model").contents()
    if model != "llama":
        raise ZhilingError(f"{gguf_path}: its vocabulary is '{model}', not a SentencePiece ('llama') one; "
                           f"a tokenizer.model cannot be rebuilt from it")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    pieces = [bytes(tokens.parts[index]) for index in tokens.data]
    scores_field = _field(reader, "tokenizer.ggml.scores", required=False)
    scores = list(scores_field.contents()) if scores_field is not None else [0.0] * len(pieces)
    types_field = _field(reader, "tokenizer.ggml.token_type", required=False)
    types = list(types_field.contents()) if types_field is not None else [NORMAL] * len(pieces)

    def special(name: str, default: int) -> int:
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        return int(field.contents()) if field is not None else default

    unk_id = special("unknown", -1)
    if unk_id < 0:
        unk_id = next((i for i, piece in enumerate(pieces) if piece == b"<unk>"), -1)
    if unk_id < 0:
        raise ZhilingError(f"{gguf_path}: its vocabulary has no unknown token, which SentencePiece requires")
    types = [UNKNOWN if i == unk_id else (CONTROL if kind == UNKNOWN else kind) for i, kind in enumerate(types)]
    space_field = reader.fields.get("tokenizer.ggml.add_space_prefix")
    data = encode_model(pieces, scores, types, unk_id=unk_id, bos_id=special("bos", -1), eos_id=special("eos", -1),
                        pad_id=special("padding", -1),
                        add_dummy_prefix=bool(space_field.contents()) if space_field is not None else False)
    out_path = Path(out_path)
    out_path.write_bytes(data)
    return out_path
