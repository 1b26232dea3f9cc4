"""Reading GGUF metadata, and adding string keys to a GGUF file without touching its tensors.

A GGUF file is: header (magic, version, tensor count, key count), key/value pairs, tensor infos (name, shape, type,
offset *relative to the data section*), padding to the alignment, tensor data. Adding a key therefore only
rewrites the part before the data; the data section is copied byte for byte. zhiling writes its template record
under ``TEMPLATE_KEY`` (``zhiling.template``); the key and the record's encoding are ``zhiling.models.gguf_file``,
shared with the llama.cpp backend.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from zhiling.errors import ZhilingError
from zhiling.models.gguf_file import TEMPLATE_KEY, template_from_record, template_record

_STRING = 8  # GGUFValueType.STRING
_KV_COUNT_OFFSET = 16  # magic (4) + version (4) + tensor count (8)


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct.error on files it cannot parse
        raise ZhilingError(f"{path}: not a readable GGUF file ({exc})") from exc


def read_metadata(path: str | Path, keys: tuple[str, ...]) -> dict:
    """The values of ``keys`` (None where absent)."""
    reader = _reader(Path(path))
    out = {}
    for key in keys:
        field = reader.fields.get(key)
        out[key] = field.contents() if field is not None else None
    return out


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def add_string_metadata(source: str | Path, target: str | Path, items: dict[str, str]) -> Path:
    """Copy GGUF ``source`` to ``target`` with ``items`` added as string keys (replacing none: keys that exist
    already are an error)."""
    source, target = Path(source), Path(target)
    reader = _reader(source)
    if reader.byte_order != "I":
        raise ZhilingError(f"{source}: big-endian GGUF files are not supported")
    clash = [key for key in items if key in reader.fields]
    if clash:
        raise ZhilingError(f"{source}: already has metadata {', '.join(clash)}")
    kv_fields = [field for name, field in reader.fields.items() if not name.startswith("GGUF.")]
    header_end = 24
    kv_end = max((f.offset + sum(p.nbytes for p in f.parts) for f in kv_fields), default=header_end)
    tensor_fields = [tensor.field for tensor in reader.tensors]
    infos_end = max((f.offset + sum(p.nbytes for p in f.parts) for f in tensor_fields), default=kv_end)
    alignment = reader.alignment
    data_offset = reader.data_offset
    kv_count = len(kv_fields)
    del reader  # release the memory map before copying

    extra = b"".join(_string(key) + struct.pack("<I", _STRING) + _string(value) for key, value in items.items())
    with source.open("rb") as src, target.open("wb") as dst:
        head = bytearray(src.read(kv_end))
        struct.pack_into("<Q", head, _KV_COUNT_OFFSET, kv_count + len(items))
        dst.write(head)
        dst.write(extra)
        dst.write(src.read(infos_end - kv_end))
        position = dst.tell()
        dst.write(b"\0" * ((-position) % alignment))
        src.seek(data_offset)
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
    return target


def embed_template(source: str | Path, target: str | Path, template) -> Path:
    return add_string_metadata(source, target, {TEMPLATE_KEY: template_record(template)})


def embedded_template(path: str | Path):
    """The zhiling template stored in a GGUF file, or None."""
    value = read_metadata(path, (TEMPLATE_KEY,))[TEMPLATE_KEY]
    return None if value is None else template_from_record(value, path)
