"""Atomic writes, strict JSON, and the rules for which existing files and folders we may replace."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError

TEMP_SUFFIX = ".tmp"


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary files an interrupted earlier write of `path` may have left beside it."""
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_SUFFIX}") if p.is_file()]


def glob_escape(name: str) -> str:
    """A file name with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file in the same folder and a rename; clears stale temporaries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(path):
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime)."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime)


def finite_or_none(data: Any) -> Any:
    """A copy of nested dicts / lists / tuples with every NaN or infinite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def json_text(data: Any, indent: int | None = 1) -> str:
    """Strict JSON: a value that is not a finite number is written as null, never as a bare NaN token."""
    return json.dumps(finite_or_none(data), indent=indent, sort_keys=True, allow_nan=False)


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write strict JSON atomically."""
    write_atomic(path, (json_text(data, indent) + "\n").encode())


MARKER = ".defectscope-output"  # marks a folder defectscope created, whose files it may replace


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` (or itself) that exists; raise if a file sits where a folder must be."""
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            if parent != path and not parent.is_dir():
                raise DefectscopeError(f"cannot write {path}: {parent} is a file, not a folder")
            return parent
    return Path.cwd()


def _require_writable(folder: Path, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DefectscopeError(f"cannot write {path}: no permission to write in {folder}")


def check_creatable(path: Path) -> None:
    """Raise unless `path` (which need not exist) could be created: no file on its way, a writable folder above it."""
    path = Path(path)
    ancestor = _existing_ancestor(path)
    _require_writable(ancestor.parent if ancestor == path else ancestor, path)


def check_output_file(path: Path, force: bool = False, is_ours: Callable[[Path], bool] = lambda p: False) -> None:
    """Raise before any work unless `path` can be written: its folder is creatable and writable, it is not a
    folder, and an existing file is replaced only if `is_ours(path)` or with `force`."""
    path = Path(path)
    ancestor = _existing_ancestor(path)
    if ancestor == path:
        if path.is_dir():
            raise DefectscopeError(f"{path} is a folder; give a file name to write")
        if not (force or is_ours(path)):
            raise DefectscopeError(f"{path} exists and was not written by defectscope; refusing to replace it "
                                   "(choose another name, or pass --force)")
        ancestor = path.parent
    _require_writable(ancestor, path)


def is_our_folder(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def claim_folder(folder: Path, force: bool = False, what: str = "output") -> Path:
    """Make `folder` ours to write into: new or empty (then marked), or already marked; else `force` is needed."""
    folder = Path(folder)
    ancestor = _existing_ancestor(folder)
    if ancestor == folder:
        if not folder.is_dir():
            raise DefectscopeError(f"{what} folder {folder} is a file; give a folder")
        if not is_our_folder(folder) and any(folder.iterdir()) and not force:
            raise DefectscopeError(f"{what} folder {folder} is not empty and was not created by defectscope; "
                                   "choose a new or empty folder (or pass --force to write into it)")
    _require_writable(folder if ancestor == folder else ancestor, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_our_folder(folder):
        (folder / MARKER).write_text(json.dumps({"created_by": "defectscope", "what": what}) + "\n")
    return folder


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (after resolving links)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
