"""K-quant quantization (q4_k_m) with llama.cpp's own quantizer, through llama-cpp-python.

The Python converter writes f16 / bf16 / q8_0 itself but has no k-quants; ``llama_model_quantize`` (the library
behind llama.cpp's ``llama-quantize`` tool, exposed by llama-cpp-python) does. It runs in a subprocess
(``python -m zhiling.export.quantize IN OUT TYPE``) so that its C-level log lines can drive a progress bar and a
crash in native code cannot take the calling process with it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from zhiling.errors import ZhilingError
from zhiling.models.gguf_file import require_llama_cpp

FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize_in_process(source: str, target: str, kind: str) -> int:
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = os.cpu_count() or 1
    return int(llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)))


def gguf_tensor_count(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        return len(GGUFReader(str(path)).tensors)
    except Exception:  # an unreadable file: the quantizer reports the real problem
        return None


def quantize(source: Path, target: Path, kind: str) -> Path:
    """Quantize GGUF ``source`` to ``target`` (``kind`` in ``FTYPES``), with a progress bar."""
    from zhiling.export.converter import run_logged

    if kind not in FTYPES:
        raise ZhilingError(f"quantization '{kind}' is not one of {', '.join(FTYPES)}")
    require_llama_cpp()
    command = [sys.executable, "-m", "zhiling.export.quantize", str(source), str(target), kind]
    run_logged(command, dict(os.environ), f"Quantizing to {kind}", gguf_tensor_count(source),
               re.compile(r"^\s*\[\s*\d+/\s*\d+\]"))
    if not target.is_file():
        raise ZhilingError(f"llama.cpp's quantizer finished but wrote no {target}")
    return target


if __name__ == "__main__":
    code = quantize_in_process(sys.argv[1], sys.argv[2], sys.argv[3])
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
    sys.exit(1 if code else 0)
