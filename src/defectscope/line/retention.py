"""Images kept for later review: those of the chosen verdicts, one file per content, under a size cap (the least
recently seen go first), found again by the sha256 the audit trail records."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from defectscope.data.decode import IMAGE_SUFFIXES
from defectscope.errors import DefectscopeError, InputError
from defectscope.files import read_regular, write_atomic

VERDICTS = ("good", "defective", "error", "unknown")


def check_verdicts(verdicts: frozenset[str]) -> None:
    """Raise unless `verdicts` names at least one verdict, and only known ones."""
    unknown = set(verdicts) - set(VERDICTS)
    if unknown or not verdicts:
        raise InputError(f"keep images of the verdicts {', '.join(VERDICTS)}; got {', '.join(sorted(unknown)) or 'none'}")


def kept_verdicts(listed: str) -> frozenset[str]:
    """The verdicts of a comma-separated list (serve --keep-verdicts), checked."""
    verdicts = frozenset(verdict.strip() for verdict in listed.split(",") if verdict.strip())
    check_verdicts(verdicts)
    return verdicts


@dataclass
class ImageKeeper:
    """Keeps images under `folder`/VERDICT/SHA256.SUFFIX for the `verdicts` chosen, at most `max_bytes` together."""

    folder: Path
    verdicts: frozenset[str]
    max_bytes: int
    _kept: OrderedDict[Path, int] = field(default_factory=OrderedDict, repr=False)  # oldest first, with sizes
    _bytes: int = field(default=0, repr=False)  # their total
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        check_verdicts(self.verdicts)
        if self.max_bytes <= 0:
            raise InputError("the kept images' size cap must be above 0")
        self.folder.mkdir(parents=True, exist_ok=True)
        files = [path for path in self.folder.glob("*/*") if path.is_file() and _ours(path)]  # never another's file
        for path in sorted(files, key=lambda p: p.stat().st_mtime_ns):  # what an earlier run kept counts too
            self._kept[path] = path.stat().st_size
            self._bytes += self._kept[path]
        self._prune()  # a smaller cap than the last run's holds at once

    def keep(self, data: bytes, digest: str, verdict: str, name: str) -> Path | None:
        """Keep an image of a chosen verdict (once per content); returns where, or None when not kept."""
        if verdict not in self.verdicts or len(data) > self.max_bytes:
            return None
        suffix = Path(name).suffix.lower()
        target = self.folder / verdict / f"{digest}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
        with self._lock:
            if target in self._kept and _size(target) == len(data):  # seen again: it goes last of the kept
                self._kept.move_to_end(target)
                os.utime(target)  # and stays so after a restart, which orders by time
            else:  # new, or removed or cut short on disk since: written (again)
                write_atomic(target, data)
                self._bytes += len(data) - self._kept.pop(target, 0)
                self._kept[target] = len(data)
            self._prune()
        return target

    def find(self, digest: str, verdict: str) -> Path | None:
        """The kept image of this content and verdict, if it is (still) kept and on disk."""
        folder = self.folder / verdict
        with self._lock:
            return next((folder / f"{digest}{suffix}" for suffix in (*IMAGE_SUFFIXES, ".img")
                         if folder / f"{digest}{suffix}" in self._kept and (folder / f"{digest}{suffix}").is_file()),
                        None)

    def read(self, digest: str, verdict: str) -> tuple[Path, bytes] | None:
        """The kept image of this content and verdict and its bytes, when they still have that sha256: a file changed
        on disk since it was kept is not passed off as the audited image (nor kept any longer)."""
        path = self.find(digest, verdict)
        try:
            data = None if path is None else read_regular(path, "kept image", self.max_bytes)
        except DefectscopeError:  # removed or replaced by something unreadable since
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == digest:
            return path, data
        if path is not None:
            with self._lock:
                self._bytes -= self._kept.pop(path, 0)
        return None

    def _prune(self) -> None:
        """Remove the oldest kept images until the rest fit under the cap."""
        while self._bytes > self.max_bytes and self._kept:
            path, size = self._kept.popitem(last=False)
            path.unlink(missing_ok=True)
            self._bytes -= size


def _size(path: Path) -> int | None:
    """A file's size in bytes; None when it is gone."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _ours(path: Path) -> bool:
    """Whether a file is one an ImageKeeper writes: VERDICT/<64 hex digits>.<image suffix or .img>."""
    return (path.parent.name in VERDICTS and re.fullmatch(r"[0-9a-f]{64}", path.stem) is not None
            and path.suffix in {*IMAGE_SUFFIXES, ".img"})
