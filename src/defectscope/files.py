"""Atomic writes, strict JSON, and the rules for which existing files and folders we may replace."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from defectscope.errors import DefectscopeError, InputError, StorageError
from defectscope.names import as_text, map_nested

TEMP_SUFFIX = ".tmp"
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}  # a write's, which name no file
NAME_MAX = 255  # bytes in a file name on the common file systems (ext4, XFS, Btrfs, APFS), where one cannot say


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of `folder` takes (NAME_MAX where it cannot say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf here
        return NAME_MAX


def fitted_name(stem: str, tail: str, limit: int) -> str:
    """`stem + tail`, the stem shortened character by character until the name's bytes fit in `limit`."""
    while len(os.fsencode(stem + tail)) > limit and stem:
        stem = stem[:-1]
    return stem + tail


def tagged_name(name: str, tag: str, limit: int) -> str:
    """`name` with `-tag` before its suffix, its stem shortened until the name's bytes fit in `limit` (a digest as the
    tag keeps shortened names apart)."""
    path = Path(name)
    return fitted_name(path.stem, f"-{tag}{path.suffix}", limit)


def temporary_prefix(path: Path) -> str:
    """The start of the temporary file's name for a write of `path`: '.NAME.', or for a name too long to take the
    random part and suffix after it, its start and a digest of the whole name (stale ones are still found)."""
    room = name_max(path.parent) - 8 - len(TEMP_SUFFIX)  # mkstemp's random part, then the suffix
    if len(os.fsencode(f".{path.name}.")) <= room:
        return f".{path.name}."
    tag = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]
    return fitted_name(f".{path.name}", f"~{tag}.", room)


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary files an interrupted earlier write of `path` may have left beside it."""
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.glob(f"{glob_escape(temporary_prefix(path))}*{TEMP_SUFFIX}") if p.is_file()]


def glob_escape(name: str) -> str:
    """A file name with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_text(path: Path, text: str) -> None:
    """Write text atomically as UTF-8, the bytes of file names in it that are not UTF-8 spelled \\xNN (`as_text`)."""
    write_atomic(path, as_text(text).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file in the same folder and a rename; clears stale temporaries."""
    with atomic_stream(path) as stream:
        stream.write(data)


@contextmanager
def atomic_stream(path: Path) -> Iterator[BinaryIO]:
    """A binary stream whose bytes replace `path` at once when the block ends (a temporary file in the same folder,
    synced, then renamed); an error in the block leaves `path` as it was. Clears stale temporaries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(path):
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=TEMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS and exc.filename is None:  # a write: say of what
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
        raise


def scratch_folder(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder `defectscope-KIND-<pid>-...` of this process, made after removing this user's folders of that
    kind whose process no longer runs: a Ray worker killed with its node runs no finalizer, so the next job of that
    kind on the machine clears what it left."""
    for stale in Path(tempfile.gettempdir()).glob(f"defectscope-{kind}-*-*"):
        pid = stale.name.removeprefix(f"defectscope-{kind}-").partition("-")[0]
        if pid.isdigit() and not running(int(pid)) and stale.is_dir() and not stale.is_symlink() \
                and stale.stat().st_uid == os.getuid():
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"defectscope-{kind}-{os.getpid()}-")


def running(pid: int) -> bool:
    """Whether a process with this id runs (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_regular(path: Path, what: str = "file", max_bytes: int | None = None):
    """Open a regular file for reading without blocking (a FIFO or device is refused, never waited on); checks its size."""
    path = Path(path)
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise DefectscopeError(f"cannot read {what} {path}: it does not exist") from exc
    except IsADirectoryError as exc:
        raise DefectscopeError(f"cannot read {what} {path}: it is a folder") from exc
    except OSError as exc:
        raise DefectscopeError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    info = os.fstat(handle)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = "it is a folder"
    elif not stat.S_ISREG(info.st_mode):
        problem = "it is not a regular file (a pipe, socket or device)"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"it is {info.st_size:,} bytes, above the limit of {max_bytes:,}"
    if problem:
        os.close(handle)
        raise DefectscopeError(f"cannot read {what} {path}: {problem}")
    return os.fdopen(handle, "rb")


def read_regular(path: Path, what: str = "file", max_bytes: int | None = None,
                 inspect: Callable[[Any], None] | None = None) -> bytes:
    """A regular file's bytes (see open_regular), at most `max_bytes` of them; `inspect` sees the open file first
    (a header check, say) and may raise before anything more is read."""
    with open_regular(path, what, max_bytes) as stream:
        if inspect is not None:
            inspect(stream)
            stream.seek(0)
        try:
            if max_bytes is None:
                data = stream.read()
            else:  # read(n) first allocates n bytes, and the limit may be GBs: the size it has, then what it grew by
                size = min(os.fstat(stream.fileno()).st_size, max_bytes)
                data = stream.read(size + 1)
                if size < len(data) <= max_bytes:
                    data += stream.read(max_bytes + 1 - len(data))
        except OSError as exc:
            raise DefectscopeError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise DefectscopeError(f"cannot read {what} {path}: it grew above the limit of {max_bytes:,} bytes while read")
    return data


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read now (no cache: for files that may be replaced in place, such as a hot folder's)."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:  # a FIFO or device is refused, never waited on
        try:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        except OSError as exc:
            raise DefectscopeError(f"cannot read file {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


@lru_cache(maxsize=4096)  # a model file's, and each labelled, taught or test image's: a command hashes them once
def _sha256(path: Path, size: int, mtime: float) -> str:
    return content_sha256(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime)."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime)


def finite_or_none(data: Any) -> Any:
    """A copy of nested dicts / lists / tuples with every NaN or infinite float replaced by None."""
    return map_nested(data, lambda value: None if isinstance(value, float) and not math.isfinite(value) else value)


def json_text(data: Any, indent: int | None = 1) -> str:
    """Strict JSON: a value that is not a finite number is written as null, never as a bare NaN token."""
    return json.dumps(finite_or_none(data), indent=indent, sort_keys=True, allow_nan=False)


MAX_JSON_DEPTH = 32  # manifests and job files nest a few levels; anything deeper is damage, not data


def _refuse_constant(token: str) -> float:
    raise ValueError(f"{token} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"repeated key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _depth_before_parse(text: str | bytes) -> int:
    """Bracket nesting depth of JSON text, strings skipped (vectorized; refuses deep input before the recursive parser)."""
    data = re.sub(rb"\\.", b"__", text.encode() if isinstance(text, str) else bytes(text), flags=re.DOTALL)  # escapes out
    raw = np.frombuffer(data, np.uint8)
    outside = np.cumsum(raw == ord('"')) % 2 == 0
    step = np.isin(raw, (ord("{"), ord("["))).astype(np.int64) - np.isin(raw, (ord("}"), ord("]")))
    return int(np.max(np.cumsum(step * outside), initial=0))


def loads_strict(text: str | bytes, what: str) -> Any:
    """Parse JSON strictly: no NaN / Infinity tokens, no repeated keys, at most MAX_JSON_DEPTH levels; one clear error."""
    if _depth_before_parse(text) > MAX_JSON_DEPTH:
        raise DefectscopeError(f"{what} is not valid: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise DefectscopeError(f"{what} is not valid JSON: {exc}") from exc


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write strict JSON atomically."""
    write_text(path, json_text(data, indent) + "\n")


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


def folder_kind(folder: Path) -> str | None:
    """What defectscope made `folder` as (its marker's "what": "demo dataset", "score results", ...); None when no
    marker says so (not ours, or a marker it cannot read)."""
    try:
        kind = loads_strict(read_regular(Path(folder) / MARKER, "folder marker", 1 << 16), "folder marker").get("what")
    except (DefectscopeError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _holds_files(folder: Path) -> bool:
    return any(entry.name != MARKER for entry in Path(folder).iterdir())


def check_reusable(folder: Path, what: str, force: bool = False, forcing: str | None = "write into it") -> None:
    """Raise unless `what` may be written into the existing folder `folder`: it is empty, or defectscope made it as
    `what`, or `force` (which does what `forcing` says, as the error tells; None: the caller has no `--force`). A
    folder defectscope made as something else (a demo dataset, an experiment, a demo's output) is refused like a
    foreign one: writing there would mix outputs or replace what it holds."""
    if force or not _holds_files(folder):
        return
    kind = folder_kind(folder)
    if kind == what:
        return
    held = f"holds a {kind} written by defectscope" if kind else "is not empty and was not created by defectscope"
    hint = f" (or pass --force to {forcing})" if forcing else ""
    raise DefectscopeError(f"{what} folder {folder} {held}; choose a new or empty folder{hint}")


def claim_folder(folder: Path, force: bool | None = False, what: str = "output") -> Path:
    """Make `folder` ours to write `what` into: new or empty (then marked as `what`), or made as `what`
    (`check_reusable`); else `force` is needed (None: the caller cannot force), and a folder made as another kind
    keeps its mark."""
    folder = Path(folder)
    ancestor = _existing_ancestor(folder)
    marked = False
    if ancestor == folder:
        if not folder.is_dir():
            raise DefectscopeError(f"{what} folder {folder} is a file; give a folder")
        check_reusable(folder, what, bool(force), "write into it" if force is not None else None)
        marked = _holds_files(folder) and folder_kind(folder) is not None
    _require_writable(folder if ancestor == folder else ancestor, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not marked:
        write_atomic(folder / MARKER, (json.dumps({"created_by": "defectscope", "what": what}) + "\n").encode())
    return folder


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (after resolving links)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_apart(out: Path, source: Path, what: str, of: str) -> None:
    """Raise unless output `out` (`what`) and input `source` (`of`) lie apart, neither holding the other: what is
    written among the inputs would replace them, or be read back as inputs by the next run."""
    if inside(out, source) or inside(source, out):
        raise DefectscopeError(f"{what} {out} and {of} {source} must not contain each other; write it somewhere else")


@contextmanager
def exclusive(path: Path, busy: str, create: bool = False) -> Iterator[bool]:
    """An OS lock (flock) on `path`, a folder or a file (`create`: made if missing), for the block: while another
    process holds it, InputError(`busy`) at once. The lock goes with the process that held it (a killed run leaves
    nothing to clean up). Yields False where the file system takes no such lock (some network shares): the caller
    goes on unguarded and may say so."""
    import fcntl  # POSIX only: the runtime, which imports this module, runs elsewhere too

    handle = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError as exc:
            raise InputError(busy) from exc
        except OSError:  # e.g. EBADF or ENOLCK on NFS
            held = False
        yield held
    finally:
        os.close(handle)
