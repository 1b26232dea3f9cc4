"""Deleting and replacing only what zhiling wrote.

zhiling replaces outputs when asked to (``output.overwrite``, ``--overwrite``): a training run's files in
``output.dir``, a merged or exported model folder, an exported GGUF file and its Modelfile. Each carries a mark that
says zhiling wrote it (a ``Mark``): a record file in the folder (``zhiling.json`` in a run folder,
``zhiling_merge.json`` in a merged folder) or a sign inside the file (the ``zhiling.template`` GGUF key, the
Modelfile's first line). ``check_replaceable`` and ``remove_owned`` refuse, with ``NotOwnedError`` naming the path
and the reason, to replace or delete a path without its mark, a link, or a path that is, holds or lies inside an
input of the command (the base model, the adapter). A user's own folder or file is never removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zhiling.errors import ZhilingError

Inputs = Mapping[str, "str | Path | None"]  # what the input is ("the adapter") -> where


class NotOwnedError(ZhilingError):
    """zhiling was asked to delete or replace a path it did not write (or one of the command's inputs)."""


@dataclass(frozen=True)
class Mark:
    """How zhiling recognises a path it wrote: ``test(path)`` is true; ``missing`` says what such a path has that
    this one lacks ("no zhiling_merge.json in it")."""

    test: Callable[[Path], bool]
    missing: str


def record_file(name: str) -> Mark:
    """A folder zhiling wrote as a whole: it holds the record file ``name``."""
    return Mark(lambda path: path.is_dir() and (path / name).is_file(), f"no {name} in it")


_NAME_LIMIT = 255


def plain_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one folder or file name inside an output folder (None when it can): no separators,
    no ``.``/``..`` or hidden names, no control characters, no surrounding spaces."""
    if not isinstance(name, str) or not name:
        return "it is empty" if name == "" else "it is not a string"
    if any(sep in name for sep in "/\\:"):
        return "it holds a path separator (/, \\ or :)"
    if name.startswith("."):
        return "it starts with a dot"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it holds a control character"
    if name != name.strip():
        return "it starts or ends with a space"
    if len(name.encode("utf-8")) > _NAME_LIMIT:
        return f"it is longer than {_NAME_LIMIT} bytes"
    return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_not_input(target: str | Path, inputs: Inputs, what: str = "output") -> None:
    """Refuse an output that is, holds or lies inside one of ``inputs`` (paths that do not exist are skipped)."""
    given = Path(target).expanduser()
    resolved = given.resolve()
    for label, path in inputs.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if resolved == source:
            relation = "is"
        elif resolved.is_relative_to(source):
            relation = "is inside"
        elif source.is_relative_to(resolved):
            relation = "holds"
        else:
            continue
        raise NotOwnedError(f"{what} {given} {relation} {label} ({source}); zhiling never writes over or deletes "
                            f"its inputs: choose an output outside them")


def check_replaceable(target: str | Path, mark: Mark, *, inputs: Inputs | None = None, what: str = "output",
                      overwrite: bool = True, flag: str | None = "--overwrite") -> Path:
    """Check that zhiling may put something new at ``target``: it is absent, an empty folder, or carries ``mark``
    (and then ``overwrite`` must be set), and it is not one of ``inputs``. Returns ``target`` as a Path."""
    path = Path(target).expanduser()
    check_not_input(path, inputs or {}, what)
    if path.is_symlink():
        raise NotOwnedError(f"{what} {path} is a link; zhiling replaces only folders and files it wrote")
    if not path.exists() or _is_empty_dir(path):
        return path
    if not mark.test(path):
        even = f", even with {flag}" if flag else ""
        raise NotOwnedError(f"{what} {path} exists and was not written by zhiling ({mark.missing}); zhiling will not "
                            f"replace or delete it{even}. Choose another name, or move it away yourself")
    if not overwrite:
        raise ZhilingError(f"{what} {path} exists; choose another name or pass {flag} to replace it")
    return path


def remove_owned(target: str | Path, mark: Mark, *, inputs: Inputs | None = None, what: str = "output",
                 flag: str | None = "--overwrite") -> None:
    """Delete ``target`` (folder or file) after ``check_replaceable`` allows it; nothing when it is absent."""
    path = check_replaceable(target, mark, inputs=inputs, what=what, flag=flag)
    if not path.exists():
        return
    if _is_empty_dir(path):
        path.rmdir()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
