"""The hot folder: images a camera drops into a folder are scored, moved to the folder of their verdict, audited and
dispatched, each exactly once, across restarts.

A file is taken only once it is complete: renamed into the inbox (a camera that writes under a
temporary name, then renames: seen by Linux's inotify, taken at once), or else its size and
modification time unchanged for `settle` seconds (a camera writing in pieces); never while it has a
temporary name (hidden, `.tmp`, `.part`). Each image's verdict and its destination are recorded in
the audit database in one transaction before the file is moved; after a restart a recorded image still
in the inbox is moved to its recorded folder without being scored again, and a verdict whose message
not every target acknowledged is sent again, then and while the watcher runs (receivers see the audit id,
so a repeat is recognisable).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defectscope.data.decode import IMAGE_SUFFIXES, EncodedImage
from defectscope.errors import DefectscopeError, InputError
from defectscope.files import content_sha256, exclusive, file_sha256, glob_escape, name_max, running, tagged_name
from defectscope.clock import now
from defectscope.line.audit import AuditLog, Verdict
from defectscope.line.dispatch import Dispatcher
from defectscope.line.drift import CHECK_EVERY, Drift, recent_drift
from defectscope.line.outbox import RESEND_BATCH, send_missed, send_verdict
from defectscope.names import as_text, version_of
from defectscope.predictor import Predictor
from defectscope.settings import require_range

try:
    from inotify_simple import INotify, flags as inotify_flags
except ImportError:  # not Linux: every file settles
    INotify = None

TEMPORARY = (".tmp", ".part", ".partial", ".crdownload")
STAGED = ".moving"  # a file being moved into a verdict folder, under a hidden name
BATCH = 16  # images scored together at most
MAX_SETTLE_S = 3600.0  # the longest a file may be waited on to stop changing


@dataclass
class Folders:
    """Where images come from and where each verdict sends them."""

    inbox: Path
    good: Path
    defective: Path
    error: Path

    def check(self) -> None:
        """Raise unless the hot folder exists and the four folders differ (nothing is written)."""
        if not self.inbox.is_dir():
            raise InputError(f"the hot folder {self.inbox} does not exist")
        if len({p.resolve() for p in [self.inbox, *self.outs]}) != 4:
            raise InputError("the hot folder and the good, defective and error folders must be four different folders")

    @property
    def outs(self) -> list[Path]:
        return [self.good, self.defective, self.error]

    def of(self, verdict: str) -> Path:
        return {"good": self.good, "defective": self.defective}.get(verdict, self.error)


def check_line(folders: Folders, settle: float) -> None:
    """Raise unless a hot folder can run with these folders and this settle time; writes nothing (the CLI checks
    before it opens the audit trail or reaches a broker)."""
    require_range("settle", settle, 0, MAX_SETTLE_S)  # NaN would compare false, and no file would ever settle
    folders.check()


@dataclass
class ModelIdentity:
    """How the audit trail names the model that judged."""

    name: str
    version: str
    sha256: str
    path: Path | None = None  # the file it was loaded from, watched for a replacement (`HotFolder`)

    def message(self) -> dict[str, str]:
        """The model's fields as a verdict message names them."""
        return {"model": self.name, "model_version": self.version, "model_sha256": self.sha256}


def renamed(path: Path, tag: str) -> Path:
    """`path` with `-tag` before its suffix, its stem shortened where the name would pass the file system's limit
    (a camera's 250-character name stays placeable)."""
    return path.with_name(tagged_name(path.name, tag, name_max(path.parent)))


def place(source: Path, folder: Path, digest: str) -> Path | None:
    """Move a judged file into `folder` so that it appears there whole (a temporary name, then a rename); a different
    file of the same name already there is kept, and this one gets its sha256 prefix in its name. None, and the file
    back in the hot folder, when its bytes are no longer those judged (`digest`): written over after it was read, its
    new content was never scored and waits for its own turn."""
    staged = folder / f"{staging_prefix(digest)}{os.getpid()}{STAGED}"  # not the source's name: that may be too long
    try:
        shutil.move(source, staged)  # a rename on one file system; copy and delete across two
    except FileNotFoundError:  # it left the hot folder
        raise
    except OSError as exc:
        if source.exists():  # the copy across file systems failed (a full disk, say): what it wrote goes, the source stays
            staged.unlink(missing_ok=True)
        raise DefectscopeError(f"cannot move {source.name} into {folder}: {exc.strerror or exc}; it stays in the hot "
                               "folder with its verdict recorded, and the next start moves it") from exc
    now_holds = content_sha256(staged)
    if now_holds != digest:  # back under its name or, where a new file took that name, under its content's; never over
        for back in (source, renamed(source, now_holds[:8]), renamed(source, now_holds)):
            if not back.exists():
                shutil.move(staged, back)
                break
            if content_sha256(back) == now_holds:  # the same content waits there already
                staged.unlink()
                break
        return None
    return land(staged, folder / source.name, digest)


def land(staged: Path, target: Path, digest: str) -> Path:
    """Give a staged file its name `target`; a different file of that name already there is kept, and this one gets its
    sha256 prefix in its name."""
    if target.exists() and content_sha256(target) != digest:
        target = renamed(target, digest[:8])
    os.replace(staged, target)
    return target


def staging_prefix(digest: str) -> str:
    """The start of the hidden name a file of this content has while it is moved into a verdict folder."""
    return f".{digest[:16]}."


def stranded(folder: Path, digest: str) -> Path | None:
    """A whole file of this content that a run stopped while moving it into `folder` left under its hidden staging
    name; staged files of that content cut short by a stopped run are removed."""
    found = None
    for staged in folder.glob(f"{glob_escape(staging_prefix(digest))}*{STAGED}") if folder.is_dir() else []:
        pid = staged.name.removesuffix(STAGED).rpartition(".")[2]
        if found is None and content_sha256(staged) == digest:
            found = staged
        elif pid.isdigit() and not running(int(pid)):  # not a copy another watcher is making now
            staged.unlink(missing_ok=True)
    return found


class Arrivals:
    """The names renamed into a folder, from Linux's inotify: a file that appears by a rename was written whole
    elsewhere, so it needs no settling. Without inotify (another system, a limit reached) it notes nothing and every
    file settles; a network file system may not report renames made on another machine, which then settle too."""

    def __init__(self, folder: Path) -> None:
        self.names: set[str] = set()
        self._inotify: Any = None
        if INotify is None:
            return
        try:
            self._inotify = INotify()
            self._inotify.add_watch(folder, inotify_flags.MOVED_TO | inotify_flags.MODIFY)
        except OSError:  # no inotify here, or its limits reached
            self.close()
            self._inotify = None

    def collect(self, wait: float = 0.0) -> None:
        """Note the renames reported so far, waiting up to `wait` seconds for one when there is none (else sleep)."""
        if self._inotify is None:
            time.sleep(wait)
            return
        for event in self._inotify.read(timeout=round(wait * 1000)):
            if event.mask & inotify_flags.MOVED_TO:
                self.names.add(event.name)
            elif event.mask & inotify_flags.MODIFY:  # written to after its rename: it settles like any other
                self.names.discard(event.name)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()


@dataclass
class HotFolder:
    """Watches `folders.inbox` and judges every complete image in it with `predictor`."""

    predictor: Predictor
    model: ModelIdentity
    folders: Folders
    audit: AuditLog
    dispatch: Dispatcher
    settle: float = 0.5
    poll: float = 0.1  # seconds between scans of an idle inbox (a scan of 1,000 names and sizes takes about 2 ms)
    redeliver: float = 60.0  # seconds between tries to send again what a target missed, while the targets are idle
    say: Callable[[str], None] = lambda _text: None
    drift_every: int = CHECK_EVERY  # images judged between drift checks (`line.drift`), said when their answer turns
    on_drift: Callable[[Drift], None] | None = None  # also told when it turns (watch --mqtt: published)
    _seen: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    _left: set[str] = field(default_factory=set)  # names in the inbox it never takes, said once (while they stay)
    _arrivals: Arrivals | None = None  # while `run` watches
    _resent: int = 0  # verdicts the last recovery sent again
    _drifted: bool = False  # what the last drift check found
    _on_disk: str | None = None  # the version the model file holds when it was last said to differ
    _model_stat: tuple[int, int, int] | None = None  # the model file's size, time and inode at the last look
    _model_settled: bool = False  # whether the model file was looked at since it last changed

    def __post_init__(self) -> None:
        check_line(self.folders, self.settle)
        for folder in self.folders.outs:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def journal(self) -> str:
        """How the audit database's journal names this hot folder (several may share one database)."""
        return as_text(str(self.folders.inbox.resolve()))

    def recover(self) -> int:
        """Finish what a previous run recorded but did not complete: moves, then messages. Returns the images moved."""
        moved = 0
        self.audit.claim_unnamed(self.journal)
        for record in self.audit.unfinished_moves(self.journal):
            source, destination = self.folders.inbox / record["inbox_name"], Path(record["destination"])
            staged = stranded(destination.parent, record["image_sha256"])
            if staged is not None:  # stopped between the two renames: it gets its name
                self.audit.finish_move(record["id"], str(land(staged, destination, record["image_sha256"])))
                if source.is_file() and content_sha256(source) == record["image_sha256"]:
                    source.unlink()  # a copy across file systems stopped before it removed the original
                moved += 1
            elif source.is_file() and content_sha256(source) == record["image_sha256"]:
                moved += self._move(record["id"], source, destination.parent, record["image_sha256"])
            else:  # moved before the stop; the inbox no longer holds it
                self.audit.finish_move(record["id"], record["destination"])
        self._resent = send_missed(self.audit, self.dispatch, self.journal)
        return moved

    def _move(self, record_id: int, source: Path, folder: Path, digest: str) -> bool:
        """Move a judged image into the folder of its verdict and journal it; False when it is no longer there to move
        (taken out of the hot folder, or written over: then its new content stays for its own turn)."""
        try:
            target = place(source, folder, digest)
        except FileNotFoundError:
            target = None
            self.say(f"{source.name} left the hot folder before it was moved; its verdict is recorded")
        if target is None and source.exists():
            self.say(f"{source.name} was replaced in the hot folder after it was read; its verdict is recorded, and the "
                     "new content waits for its own turn")
        self.audit.finish_move(record_id, None if target is None else str(target))
        return target is not None

    def ready(self) -> list[Path]:
        """Complete images in the inbox: not temporary, and renamed into it (while `run` watches) or with size and
        time unchanged for `settle` seconds. A file first seen with a modification time `settle` seconds old (left by
        a stopped run) needs only one more scan that finds it unchanged: it does not wait `settle` again after a
        restart."""
        if self._arrivals is not None:
            self._arrivals.collect()
        renamed = self._arrivals.names if self._arrivals is not None else set()
        clock, wall, ready, current, left = time.monotonic(), time.time(), [], {}, {}
        for entry in os.scandir(self.folders.inbox):
            name = entry.name
            if name.startswith(".") or name.lower().endswith(TEMPORARY) or entry.is_dir():  # a verdict folder may be in it
                continue
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                left[name] = f"not named as an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if not entry.is_file():
                left[name] = "not a regular file (a pipe, socket or device)"
                continue
            if stat.st_size == 0:
                continue
            size, mtime = stat.st_size, stat.st_mtime_ns
            previous = self._seen.get(name)
            if name in renamed and (previous is None or previous[:2] == (size, mtime)):
                since = -math.inf  # renamed in whole: taken now (not `clock - settle`: float rounding leaves it a hair
                # short of `settle` ago at some clock readings, e.g. 9.1 to 36 h of uptime, and such files stayed put)
            elif previous is not None and previous[:2] == (size, mtime):
                since = previous[2]
            elif previous is None and wall - mtime / 1e9 >= self.settle:
                since = clock - self.settle + min(self.poll, self.settle)  # settled by its own time: confirm once
            else:
                since = clock
            current[name] = (size, mtime, since)
            if clock - since >= self.settle:
                ready.append(self.folders.inbox / name)
        self._seen = current
        for name in sorted(set(left) - self._left):
            self.say(f"{name} in the hot folder is {left[name]}: it is left there, never judged")
        self._left = set(left)
        if self._arrivals is not None:
            self._arrivals.names.intersection_update(current)  # forget names that left the inbox
        return sorted(ready)[:BATCH]

    def judge(self, paths: list[Path]) -> int:
        """Score, record (verdict and destination in one transaction), move and dispatch these images. Each file is
        read once: the bytes scored are the bytes the audit trail's sha256 names."""
        read = [(path, EncodedImage.read(path)) for path in paths]
        for path, image in read:
            if image.data is None and not path.exists():
                self.say(f"{path.name} left the hot folder before it was judged")
        read = [(path, image) for path, image in read if image.data is not None or path.exists()]
        if not read:
            return 0
        paths, images = [path for path, _ in read], [image for _, image in read]
        digests = [hashlib.sha256(image.data).hexdigest() if image.data is not None else content_sha256(path)
                   for path, image in read]
        prediction = self.predictor.predict(images, keep_going=True)
        calibration = self.predictor.calibration
        verdicts = prediction.verdicts if prediction.threshold else ["error"] * len(paths)
        records = []
        for i, (path, digest) in enumerate(zip(paths, digests)):
            score = float(prediction.scores[i])
            judged = math.isfinite(score) and verdicts[i] != "error"  # an error is never filed as good
            height, width = images[i].size() if judged else (None, None)
            records.append(Verdict(
                time=now(), **self.model.message(),
                threshold=prediction.threshold, stated_rate=calibration.false_alarm_rate if calibration else None,
                image_sha256=digest, image_name=as_text(path.name), width=width, height=height, source="hot folder",
                score=score if judged else None, normalized=score / prediction.threshold if judged else None,
                verdict=verdicts[i] if judged else "error", regions=None, role="hot folder"))
        moves = [(path.name, str(self.folders.of(record.verdict) / path.name)) for path, record in zip(paths, records)]
        ids = self.audit.record(records, moves=moves, inbox=self.journal)
        for record_id, path, digest, record in zip(ids, paths, digests, records):
            self._move(record_id, path, self.folders.of(record.verdict), digest)
        for record_id, record in zip(ids, records):  # the record as written, not read back (as the service sends)
            send_verdict(self.audit, self.dispatch, {"id": record_id, **asdict(record)})
        return len(paths)

    def _check_drift(self) -> None:
        """The drift check on this model file's recent verdicts; says its answer when it turns (drift found or gone)."""
        found = recent_drift(self.audit, self.model.sha256, self.predictor.calibration)
        if found.drifted != self._drifted:
            self._drifted = found.drifted
            self.say(found.message)
            if self.on_drift is not None:
                self.on_drift(found)

    def _check_model_file(self) -> None:
        """Say once when the model file no longer holds the version that judges (calibrated or taught in place,
        promoted, rolled back): this watcher goes on with the version it loaded until it is started again. A file
        is looked at once it held still for one scan (not while it is being written)."""
        path = self.model.path
        if path is None:
            return
        try:
            stat = path.stat()
            now = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        except OSError:
            now = None
        if now != self._model_stat:
            self._model_stat, self._model_settled = now, False
            return
        if self._model_settled:
            return
        self._model_settled = True
        holds = "nothing" if now is None else self._model_file_version(path) or "damaged"
        if holds == self.model.sha256:
            if self._on_disk is not None:
                self.say(f"{path} holds version {self.model.version} again, the version judging")
            self._on_disk = None
        elif holds != self._on_disk:
            self._on_disk = holds
            now_holds = {"nothing": "no model", "damaged": "no whole model (being written, or damaged)"}.get(
                holds, f"version {version_of(holds)}")
            self.say(f"{path} now holds {now_holds}; this watcher still judges with version {self.model.version}: "
                     "start it again to judge with the file as it is now")

    @staticmethod
    def _model_file_version(path: Path) -> str | None:
        """The sha256 of a whole model file (or export) at `path`; None while it is not one (half written)."""
        from defectscope.runtime import checked_manifest

        try:
            checked_manifest(path)
            return file_sha256(path)
        except (OSError, DefectscopeError):
            return None

    def run(self, stop: threading.Event | None = None, limit: int | None = None) -> int:
        """Watch until `stop` is set (or `limit` images were judged); returns the images judged."""
        stop = stop or threading.Event()
        with exclusive(self.folders.inbox, f"another `defectscope watch` is judging {self.folders.inbox}; one hot "
                                           "folder takes one watcher") as held:
            if not held:
                self.say(f"{self.folders.inbox} cannot be locked here (a network share?): make sure no other watcher "
                         "judges it")
            return self._watch(stop, limit)

    def _watch(self, stop: threading.Event, limit: int | None) -> int:
        if limit != 0:
            folders = self.folders
            self.say(f"watching {folders.inbox} with {self.model.name}: good -> {folders.good}, defective -> "
                     f"{folders.defective}, error -> {folders.error}")
        recovered = self.recover()
        if recovered:
            self.say(f"finished {recovered} image(s) a previous run had judged but not moved")
        judged, self._arrivals = 0, Arrivals(self.folders.inbox)
        checked = 0
        again = time.monotonic() + (self.poll if self._resent == RESEND_BATCH else self.redeliver)
        try:
            while not stop.is_set() and (limit is None or judged < limit):
                self._check_model_file()
                batch = self.ready()
                if batch:
                    judged += self.judge(batch)
                    if judged - checked >= self.drift_every:
                        checked = judged
                        self._check_drift()
                else:
                    self._arrivals.collect(self.poll)  # wakes at once when a file is renamed in
                if time.monotonic() >= again:  # a full batch sent: the next may follow as soon as it is through
                    resent = send_missed(self.audit, self.dispatch, self.journal)
                    again = time.monotonic() + (self.poll if resent == RESEND_BATCH else self.redeliver)
        finally:
            self._arrivals.close()
            self._arrivals = None
        return judged
