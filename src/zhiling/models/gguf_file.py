"""What zhiling reads and writes in a GGUF file besides the weights, and the library that runs one.

Shared by the llama.cpp backend (``infer/llamacpp_engine.py``) and the GGUF export (``export/``), so it stands below
both. The export writes zhiling's template record under ``TEMPLATE_KEY`` so that the file alone tells the backend
the exact training prompt (the Jinja chat template says how to render text, but not the stop strings or how prompts
are cut into tokens); both sides encode and decode that record here. llama-cpp-python runs GGUF files for the
backend and quantizes them (q4_k_m) for the export.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhiling.errors import ZhilingError

TEMPLATE_KEY = "zhiling.template"


def template_record(template) -> str:
    """The text stored under ``TEMPLATE_KEY``: the template's dictionary as JSON."""
    return json.dumps(template.to_dict(), ensure_ascii=False)


def template_from_record(record: str, path: str | Path):
    """The template stored under ``TEMPLATE_KEY`` of the GGUF file ``path`` (named in the error)."""
    from zhiling.data.templates import template_from_dict

    try:
        return template_from_dict(json.loads(record))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ZhilingError(f"{path}: metadata {TEMPLATE_KEY} is not a valid template record ({exc})") from None


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ZhilingError("q4_k_m quantization and the llama.cpp backend need llama-cpp-python: "
                           "pip install 'zhiling[gguf]'") from exc
    return llama_cpp
