"""Model versions: every model file a served name has held, kept by content with its parent; one of them active.

A model file is under version control once it has a store: once served, promoted or rolled back, or written over
in place by `calibrate` or `update`. From then on every write of defectscope's over it (those, or a `fit`) keeps the
file it replaces and records the new one, active, with that one as its parent (`keeping_replaced`).

The store lives beside the served files, in a hidden folder (never served itself): for each name, each version's
file (`<version>.dsmodel`, the version being its sha256's first 12 hex digits) and `history.json` (the versions in
the order they were recorded, and every activation). The served file `NAME.dsmodel` always holds the active
version's bytes; promoting writes them there atomically, and rolling back promotes the version active before.
Pruning removes the files of the versions active longest ago (never the active one's); their entries stay in the
history, marked pruned, so the trail still names every version a verdict came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectscope.clock import now
from defectscope.errors import DefectscopeError, InputError, ModelChanged
from defectscope.files import file_sha256, write_atomic
from defectscope.names import MODEL_SUFFIX, SAFE_NAME, VERSION_DIGITS, version_of

STORE = ".defectscope-versions"
LOCK_FILE = ".lock"  # in the store: held while a change is made
VERSION = re.compile(rf"[0-9a-f]{{{VERSION_DIGITS}}}")  # a version as `version_of` makes it


class UnknownVersion(InputError):
    """A version the model does not have."""


class NoEarlierVersion(InputError):
    """A rollback with no version active before the current one."""


class PrunedVersion(InputError):
    """A version whose file was pruned."""


class DamagedVersion(DefectscopeError):
    """A version whose kept file is missing, or no longer holds it."""


@dataclass
class VersionStore:
    """The versions of the model files served from `folder`: one change at a time, across threads and processes."""

    folder: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, model_file: Path) -> tuple[VersionStore, str]:
        """The store beside a model file (one per folder in a process, so its lock is shared), and the model's name."""
        if model_file.suffix != MODEL_SUFFIX:
            raise InputError(f"{model_file} is not a {MODEL_SUFFIX} model file; versions are kept for model files")
        if not model_file.is_file():
            raise InputError(f"no model file at {model_file}")
        return _store(Path(model_file).parent.resolve()), model_file.name.removesuffix(MODEL_SUFFIX)

    def served_file(self, name: str) -> Path:
        return self.folder / f"{name}{MODEL_SUFFIX}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time: this process's threads (its lock), then every process on the store (an OS lock on
        its lock file, waited for: the service and the command line change one store, and each reads, changes and
        writes its history); where the file system takes no such lock, this process's only."""
        import fcntl  # POSIX only, as the service's lines are

        with self._lock:
            (self.folder / STORE).mkdir(exist_ok=True)
            with open(self.folder / STORE / LOCK_FILE, "a") as handle:  # the lock goes with the handle
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                except OSError:  # e.g. ENOLCK on some network shares
                    pass
                yield

    def history(self, name: str) -> dict[str, Any]:
        """{"active": version or None, "versions": [{version, sha256, parent, action, time}], "activations": [...]}."""
        path = self._folder(name) / "history.json"
        if not path.is_file():
            return {"active": None, "versions": [], "activations": []}
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DefectscopeError(f"the version history {path} cannot be read ({exc}); restore it from a backup") from exc
        if not _well_formed(history):
            raise DefectscopeError(f"the version history {path} is damaged (not the versions, the active one and the "
                                   "activations it records); restore it from a backup")
        return history

    def record(self, name: str, source: Path, action: str, parent: str | None = None) -> dict[str, Any]:
        """Keep `source` as a version of `name` (once per content) with its parent and what made it; returns its entry."""
        with self._locked():
            return self._record(name, source, action, parent)

    def adopt(self, name: str, action: str = "served", parent: str | None = None) -> dict[str, Any]:
        """Record the served file as it is now and make it active (the first time a name is served, or after it was
        replaced: its parent is then the version active before, or `parent`, e.g. 'other@version')."""
        with self._locked():
            return self._adopt(name, action, parent)

    def promote(self, name: str, version: str, action: str = "promote") -> Path:
        """Make `version` the active one: its bytes replace the served file (atomically). Returns the served file."""
        with self._locked():
            return self._activate(name, version, action)

    def rollback(self, name: str) -> str:
        """Promote the version that was active before the current one; returns it."""
        with self._locked():
            return self._rollback(name)

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove the files of all but the `keep` versions active most recently (the active one among them; versions
        never active count as older than any that was, newest recorded first); returns the versions pruned."""
        if keep < 1:
            raise InputError(f"keep must be at least 1 (the active version), got {keep}")
        if not self.history(name)["versions"]:
            return []  # nothing written: a name never served gets no store
        with self._locked():
            history = self.history(name)
            last = {entry["version"]: i for i, entry in enumerate(history["activations"])}
            order = sorted(range(len(history["versions"])), reverse=True,
                           key=lambda i: (last.get(history["versions"][i]["version"], -1), i))
            pruned = [history["versions"][i] for i in order[keep:] if "pruned" not in history["versions"][i]
                      and history["versions"][i]["version"] != history["active"]]
            if not pruned:
                return []  # nothing written: a name never served gets no store
            damaged = [entry["version"] for entry in pruned if not VERSION.fullmatch(str(entry["version"]))]
            if damaged:  # a name from the file becomes a path to remove: only a version's own file name may
                raise DefectscopeError(f"the version history of {name} names {damaged[0]!r}, which is no version; "
                                       "restore history.json from a backup")
            for entry in pruned:
                entry["pruned"] = now()
            self._write(name, history)  # first: a file left behind by a crash is harmless, a missing one is not
            for entry in pruned:
                (self._folder(name) / f"{entry['version']}{MODEL_SUFFIX}").unlink(missing_ok=True)
            return [entry["version"] for entry in pruned]

    def promote_file(self, name: str, version: str) -> Path:
        """`promote` of a file that may have been put in place by hand: the file as it is now is kept first, so nothing
        is lost, once `version` is known to be kept (or to be that file's own); a refused promote writes nothing."""
        self._check_promotable(name, version)  # before the lock, whose file is a write
        with self._locked():
            self._check_promotable(name, version)
            self._adopt(name, "found", None)
            return self._activate(name, version, "promote")

    def _check_promotable(self, name: str, version: str) -> None:
        history = self.history(name)
        entry = _entry(history, version)
        own = version_of(file_sha256(self.served_file(name))) == version
        if entry is None and not own:
            raise _unknown(name, version, history)
        if entry is not None and "pruned" in entry and not own:
            raise _pruned(name, entry)

    def rollback_file(self, name: str) -> str:
        """`rollback` of a file that may have been put in place by hand (kept first, as `promote_file`); a name with no
        recorded activation has nothing to go back to, and is refused before anything is written."""
        if not self.history(name)["activations"]:
            raise _no_earlier(name)
        with self._locked():
            self._adopt(name, "found", None)
            return self._rollback(name)

    def _adopt(self, name: str, action: str, parent: str | None) -> dict[str, Any]:
        history = self.history(name)
        entry = self._record(name, self.served_file(name), action, parent or history["active"])
        if history["active"] != entry["version"]:
            self._activate(name, entry["version"], action)
        return entry

    def _rollback(self, name: str) -> str:
        history = self.history(name)
        earlier = [v for v in reversed(history["activations"][:-1]) if v["version"] != history["active"]]
        if not earlier:
            raise _no_earlier(name)
        self._activate(name, earlier[0]["version"], "rollback")
        return earlier[0]["version"]

    def _folder(self, name: str) -> Path:
        """The name's folder in the store (a checked name: it becomes a folder name)."""
        if not SAFE_NAME.match(name):
            raise InputError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
        return self.folder / STORE / name

    def _record(self, name: str, source: Path, action: str, parent: str | None) -> dict[str, Any]:
        digest = file_sha256(source)
        history, version = self.history(name), version_of(digest)
        known = _entry(history, version)
        kept = self._folder(name) / f"{version}{MODEL_SUFFIX}"
        if not kept.is_file() or file_sha256(kept) != digest:  # missing, or damaged since: kept again whole
            write_atomic(kept, source.read_bytes())
        if known is not None:
            if known.pop("pruned", None) is not None:  # a pruned version's content came back: kept again
                self._write(name, history)
            return known
        entry = {"version": version, "sha256": digest, "parent": parent, "action": action, "time": now()}
        history["versions"].append(entry)
        self._write(name, history)
        return entry

    def _activate(self, name: str, version: str, action: str) -> Path:
        history = self.history(name)
        entry = _entry(history, version)
        if entry is None:
            raise _unknown(name, version, history)
        if "pruned" in entry:
            raise _pruned(name, entry)
        served = self.served_file(name)
        if not served.is_file() or version_of(file_sha256(served)) != version:
            data = self._kept_bytes(name, entry)  # checked before anything is written
            if served.is_file():
                self._record(name, served, "found", history["active"])  # a file put there since: kept before it is replaced
                history = self.history(name)
            write_atomic(served, data)
        history["active"] = version
        history["activations"].append({"version": version, "action": action, "time": now()})
        self._write(name, history)
        return served

    def _kept_bytes(self, name: str, entry: dict[str, Any]) -> bytes:
        """A kept version's bytes, refused unless they still hash to the sha256 recorded when it was kept."""
        kept = self._folder(name) / f"{entry['version']}{MODEL_SUFFIX}"
        if not kept.is_file():
            raise DamagedVersion(f"the file of version {entry['version']} of {name} is missing from the store ({kept}); "
                                   "nothing was changed")
        data = kept.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DamagedVersion(f"the kept file of version {entry['version']} of {name} ({kept}) no longer holds that "
                                   "version (its sha256 differs: changed or damaged since it was kept); nothing was "
                                   "changed")
        return data

    def _write(self, name: str, history: dict[str, Any]) -> None:
        write_atomic(self._folder(name) / "history.json", json.dumps(history, indent=1).encode())


def made_from(name: str, version: str) -> str:
    """The parent of a version made from another model's version: 'name@version'."""
    return f"{name}@{version}"


@contextmanager
def keeping_replaced(target: Path, action: str, source: Path | None = None, read_as: str | None = None
                     ) -> Iterator[None]:
    """Around a write of model file `target` by `action`: when it replaces a model file that has versions, or the very
    file it was made from (`source`: a threshold or taught images written in place), the replaced file is kept first,
    and the new one is recorded after the write, active, with its parent: the replaced version, or `source` as
    'name@version' when made from another file (as the service names it). A write that fails records nothing new.

    `read_as`, the sha256 `source` had when it was read: the write is refused (`ModelChanged`) when the file changed
    since (another command or the service wrote it), checked under the store's lock, so no change is lost."""
    target = Path(target)
    kept = target.suffix == MODEL_SUFFIX and target.is_file()
    in_place = source is not None and kept and target.resolve() == Path(source).resolve()
    if kept:
        store, name = VersionStore.of(target)
        kept = in_place or bool(store.history(name)["versions"])
    if not kept:
        check_unchanged(source, read_as, action)
        yield
        return
    parent = None if in_place or source is None else \
        made_from(Path(source).name.removesuffix(MODEL_SUFFIX), version_of(read_as or file_sha256(Path(source))))
    with store._locked():
        check_unchanged(source, read_as, action)
        store._adopt(name, "found", None)
        yield
        store._adopt(name, action, parent)


def check_unchanged(source: Path | None, read_as: str | None, action: str) -> None:
    """Raise `ModelChanged` when model file `source` no longer has the sha256 `read_as` it was read with."""
    if source is not None and read_as is not None and file_sha256(Path(source)) != read_as:
        raise ModelChanged(f"{source} was written by another command or the service since {action} read it (version "
                           f"{version_of(read_as)}, now {version_of(file_sha256(Path(source)))}); nothing was "
                           f"written: {action} again from the file as it is now")


def _well_formed(history: Any) -> bool:
    """Whether a history read from disk has the shape `history` gives: every field a change reads, of its type."""
    def text(value: Any) -> bool:
        return isinstance(value, str)

    return (isinstance(history, dict) and (history.get("active") is None or text(history["active"]))
            and isinstance(history.get("versions"), list) and isinstance(history.get("activations"), list)
            and all(isinstance(v, dict) and text(v.get("version")) and text(v.get("sha256")) and text(v.get("action"))
                    and text(v.get("time")) and (v.get("parent") is None or text(v["parent"]))
                    and (v.get("pruned") is None or text(v["pruned"])) for v in history["versions"])
            and all(isinstance(a, dict) and text(a.get("version")) and text(a.get("action")) and text(a.get("time"))
                    for a in history["activations"]))


def _entry(history: dict[str, Any], version: str) -> dict[str, Any] | None:
    """The history's entry of `version` (None: never kept)."""
    return next((entry for entry in history["versions"] if entry["version"] == version), None)


def _unknown(name: str, version: str, history: dict[str, Any]) -> UnknownVersion:
    known = ", ".join(entry["version"] for entry in history["versions"]) or "none"
    return UnknownVersion(f"model {name} has no version {version!r} (known: {known})")


def _pruned(name: str, entry: dict[str, Any]) -> PrunedVersion:
    return PrunedVersion(f"model {name}'s version {entry['version']} was pruned at {entry['pruned']}: its file is gone; "
                         "promote a kept version (`defectscope versions` lists them)")


def _no_earlier(name: str) -> NoEarlierVersion:
    return NoEarlierVersion(f"model {name} has no earlier active version to roll back to")


@lru_cache(maxsize=None)
def _store(folder: Path) -> VersionStore:
    return VersionStore(folder)
