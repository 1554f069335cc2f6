"""On the line: the audit trail survives kill -9, the hot folder judges each image exactly once across restarts and
never takes a file that is still being written, and verdicts reach a real MQTT broker and a retried webhook."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from defectscope import load_dataset
from defectscope.artifacts import load_model
from defectscope.errors import DefectscopeError, InputError, SettingsError
from defectscope.files import file_sha256
from defectscope.line import hotfolder
from defectscope.clock import now
from defectscope.line.audit import AuditLog, ChainCheck, Verdict, export_parquet, verify_chain
from defectscope.line.dispatch import Dispatcher, JsonLines, Mqtt, Webhook, broker_address
from defectscope.line.hotfolder import Folders, HotFolder, ModelIdentity
from defectscope.names import as_text


def _verdict(name: str = "a.png") -> Verdict:
    return Verdict(now(), "part", "v1", "0" * 64, 1.0, 0.01, "f" * 64, name, 8, 8, "upload", 0.5, 0.5, "good", 0, "operator")


def test_a_recorded_verdict_survives_kill_9(tmp_path: Path) -> None:
    database = tmp_path / "audit.sqlite"
    script = ("import sys, time\nfrom tests.test_line import _verdict\nfrom defectscope.line.audit import AuditLog\n"
              f"log = AuditLog({str(database)!r})\nlog.record([_verdict('kept.png')])\nprint('recorded', flush=True)\n"
              "time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    assert writer.stdout.readline().strip() == "recorded"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    records = AuditLog(database).query()
    assert [r["image_name"] for r in records] == ["kept.png"] and records[0]["verdict"] == "good"


def test_audit_queries_filter_and_page_and_export_to_parquet(tmp_path: Path) -> None:
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    log = AuditLog(tmp_path / "audit.sqlite")
    log.record([_verdict(f"{i}.png") for i in range(5)])
    log.record([Verdict(**{**_verdict("bad.png").__dict__, "verdict": "defective", "model": "other"})])
    assert [r["image_name"] for r in log.query(limit=2)] == ["bad.png", "4.png"]  # newest first
    assert [r["image_name"] for r in log.query(limit=2, offset=2)] == ["3.png", "2.png"]
    assert [r["image_name"] for r in log.query(verdict="defective")] == ["bad.png"]
    assert log.query(model="part", verdict="defective") == [] and len(log.query(since="2000-01-01")) == 6
    assert log.get(6)["image_name"] == "bad.png"
    for missing in (0, 7, 2**63, -(2**63) - 1):  # beyond SQLite's integers too: not found, not a crash
        with pytest.raises(InputError, match=f"no audit record {missing}"):
            log.get(missing)
    log.record([Verdict(**{**_verdict("ten.png").__dict__, "time": "2001-02-03T10:00:00.500000+00:00"})])
    for ten in ("2001-02-03T10:00:00Z", "2001-02-03T11:00:00+01:00", "2001-02-03T10:00:00", "2001-02-03T10:00"):
        assert [r["image_name"] for r in log.query(since=ten, until="2001-02-03T10:00:01Z")] == ["ten.png"]
        assert log.query(since="2001-02-03", until=ten) == []  # the same instant however it is written
    for bad in ("notadate", "2001-13-01", "10:00"):  # never read as text that sorts after every record
        with pytest.raises(InputError, match="must be an ISO 8601 time"):
            log.query(since=bad)
    log.record([_verdict("later.png")])  # at the clock's time, long after the fixed one (the queries above: clock-free)
    assert export_parquet(tmp_path / "audit.sqlite", tmp_path / "audit.parquet") == 8
    table = pyarrow_parquet.read_table(tmp_path / "audit.parquet")
    assert table.num_rows == 8 and {"time", "model_sha256", "image_sha256", "verdict", "role"} <= set(table.column_names)
    for database, said in ((tmp_path / "none.sqlite", "does not exist"), (tmp_path, "is not a file")):
        with pytest.raises(InputError, match=f"audit database {database} {said}"):
            export_parquet(database, tmp_path / "other.parquet")


def test_an_audit_export_streams_a_page_at_a_time_and_replaces_only_its_own_file(tmp_path: Path, cli) -> None:
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    log = AuditLog(tmp_path / "audit.sqlite")
    log.record([_verdict(f"{i}.png") for i in range(7)])
    log.close()
    out = tmp_path / "audit.parquet"
    assert export_parquet(tmp_path / "audit.sqlite", out, page=3) == 7
    stored = pyarrow_parquet.ParquetFile(out)
    assert [stored.metadata.row_group(g).num_rows for g in range(stored.num_row_groups)] == [3, 3, 1]
    assert stored.read().column("image_name").to_pylist() == [f"{i}.png" for i in range(7)]  # oldest first, all
    empty = tmp_path / "empty.sqlite"
    AuditLog(empty).close()
    assert export_parquet(empty, tmp_path / "none.parquet") == 0
    assert pyarrow_parquet.read_schema(tmp_path / "none.parquet").field("score").type == "double"  # typed, not null
    again = cli("audit", "export", tmp_path / "audit.sqlite", "-o", out)  # our own export: replaced
    assert again.code == 0 and "wrote 7 verdicts" in again.out
    log = AuditLog(tmp_path / "audit.sqlite")
    log.record([Verdict(**{**_verdict(f"day{day}.png").__dict__, "time": f"2001-02-0{day}T12:00:00+00:00"}) for day in (3, 4)])
    log.close()
    day = cli("audit", "export", tmp_path / "audit.sqlite", "-o", out, "--since", "2001-02-04T00:00+01:00",
              "--until", "2001-02-05")  # 23:00 UTC on the 3rd, to midnight UTC on the 5th
    assert day.code == 0 and pyarrow_parquet.read_table(out).column("image_name").to_pylist() == ["day4.png"]
    before = out.read_bytes()
    undated = cli("audit", "export", tmp_path / "audit.sqlite", "-o", out, "--since", "last week")
    assert undated.code == 2 and "since must be an ISO 8601 time" in undated.err and out.read_bytes() == before
    backwards = cli("audit", "export", tmp_path / "audit.sqlite", "-o", out, "--since", "2001-02-05",
                    "--until", "2001-02-04T23:00-01:00")  # the same instant: an empty range, not "0 verdicts"
    assert backwards.code == 2 and "must be before until" in backwards.err and out.read_bytes() == before
    foreign = tmp_path / "theirs.parquet"
    pyarrow_parquet.write_table(pyarrow_parquet.read_table(out).replace_schema_metadata(None), foreign)
    (tmp_path / "notes.txt").write_text("precious")
    for kept in (foreign, tmp_path / "notes.txt"):
        before = kept.read_bytes()
        refused = cli("audit", "export", tmp_path / "audit.sqlite", "-o", kept)
        assert refused.code == 2 and "was not written by defectscope" in refused.err and kept.read_bytes() == before
    assert cli("audit", "export", tmp_path / "audit.sqlite", "-o", foreign, "--force").code == 0
    trail = tmp_path / "audit.sqlite"
    for itself in (trail, Path(f"{trail}-wal"), tmp_path / "." / "audit.sqlite"):  # the database is never its export
        before = trail.read_bytes()
        refused = cli("audit", "export", trail, "-o", itself, "--force")
        assert refused.code == 2 and "is the audit database" in refused.err and trail.read_bytes() == before
        assert not Path(f"{trail}-wal").exists() or Path(f"{trail}-wal").read_bytes()[:4] != b"PAR1"
    os.mkfifo(tmp_path / "pipe")  # never opened (it would wait for a writer), refused
    assert cli("audit", "export", tmp_path / "audit.sqlite", "-o", tmp_path / "pipe").code == 2


@pytest.fixture(scope="module")
def model(served_folder: Path):
    return load_model(served_folder / "part.dsmodel")


def _line(tmp_path: Path, model, dispatch: Dispatcher | None = None, **options) -> HotFolder:
    folders = Folders(tmp_path / "in", tmp_path / "good", tmp_path / "defective", tmp_path / "error")
    folders.inbox.mkdir(exist_ok=True)
    identity = ModelIdentity("part", "v1", "0" * 64)
    return HotFolder(model, identity, folders, AuditLog(tmp_path / "audit.sqlite"), dispatch or Dispatcher([]),
                     **{"settle": 0.2, "poll": 0.05, **options})


def _drop(demo_root: Path, inbox: Path, count: int) -> dict[str, str]:
    """Copy test images into the hot folder (written under a temporary name, then renamed); name -> sha256."""
    dropped = {}
    for sample in load_dataset(demo_root).test[:count]:
        name = f"{sample.defect}-{sample.path.name}"
        shutil.copy(sample.path, inbox / f"{name}.tmp")
        (inbox / f"{name}.tmp").rename(inbox / name)
        dropped[name] = file_sha256(inbox / name)
    return dropped


def _where(line: HotFolder) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in (line.folders.inbox, line.folders.good, line.folders.defective, line.folders.error):
        for path in folder.iterdir():
            found.setdefault(path.name, []).append(folder.name)
    return found


def test_the_hot_folder_judges_each_image_once_and_waits_for_a_file_being_written(model, demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    line = _line(tmp_path, model)
    dropped = _drop(demo_root, line.folders.inbox, 8)
    source = load_dataset(demo_root).test[-1].path.read_bytes()
    (line.folders.inbox / "camera.png.part").write_bytes(source)  # written under a temporary name: left alone

    def camera() -> None:  # writes growing.png in 20 pieces, one every 50 ms (the settle time is 200 ms)
        with (line.folders.inbox / "growing.png").open("wb") as stream:
            for start in range(0, len(source), -(-len(source) // 20)):
                stream.write(source[start : start + -(-len(source) // 20)])
                stream.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=camera)
    writer.start()
    assert line.run(limit=9) == 9
    writer.join()
    where = _where(line)
    assert all(len(where[name]) == 1 and where[name][0] != "in" for name in [*dropped, "growing.png"])
    assert where["camera.png.part"] == ["in"]
    records = line.audit.query()
    assert len(records) == 9 and {r["image_name"] for r in records} == {*dropped, "growing.png"}
    growing = next(r for r in records if r["image_name"] == "growing.png")
    assert growing["verdict"] != "error" and growing["image_sha256"] == hashlib.sha256(source).hexdigest()  # taken whole
    expected = dict(zip(dropped, model.predict([demo_root / "test" / n.split("-")[0] / n.split("-", 1)[1] for n in dropped]).verdicts))
    for record in records:
        if record["image_name"] in expected:
            assert record["verdict"] == expected[record["image_name"]] == where[record["image_name"]][0]
            assert record["image_sha256"] == dropped[record["image_name"]] and record["source"] == "hot folder"
            assert record["width"] == record["height"] == 128  # the demo images' size, from their headers


def test_the_hot_folder_says_once_what_it_never_takes(model, demo_root: Path, tmp_path: Path) -> None:
    said: list[str] = []
    line = _line(tmp_path, model, say=said.append)
    dropped = _drop(demo_root, line.folders.inbox, 1)
    (line.folders.inbox / "part.gif").write_bytes((line.folders.inbox / next(iter(dropped))).read_bytes())
    os.mkfifo(line.folders.inbox / "pipe.png")
    (line.folders.inbox / "archive").mkdir()  # a folder (a verdict folder may be one) is not announced
    (line.folders.inbox / "camera.png.part").write_bytes(b"being written")  # nor is a temporary name
    assert line.run(limit=1) == 1
    for _ in range(3):
        line.ready()
    left = [text for text in said if "never judged" in text]
    assert len(left) == 2 and left[0].startswith("part.gif in the hot folder is not named as an image")
    assert left[1].startswith("pipe.png in the hot folder is not a regular file")
    (line.folders.inbox / "part.gif").unlink()
    line.ready()
    (line.folders.inbox / "part.gif").write_bytes(b"again")  # a new arrival of that name: said again
    line.ready()
    assert sum("part.gif" in text for text in said) == 2


def test_a_file_settled_by_its_own_time_waits_one_scan_not_the_settle_time(model, demo_root: Path,
                                                                          tmp_path: Path) -> None:
    """After a restart the images left in the inbox were written long ago: one scan that finds them unchanged
    is enough. A file modified just now still waits the whole settle time."""
    line = _line(tmp_path, model, settle=30.0)
    dropped = _drop(demo_root, line.folders.inbox, 3)
    for name in dropped:
        os.utime(line.folders.inbox / name, (time.time() - 60, time.time() - 60))
    fresh = line.folders.inbox / "fresh.png"
    fresh.write_bytes((line.folders.inbox / next(iter(dropped))).read_bytes())
    assert line.ready() == []  # first sight: not yet confirmed
    time.sleep(line.poll)
    assert [path.name for path in line.ready()] == sorted(dropped)  # unchanged a scan later; the fresh one waits
    with (line.folders.inbox / sorted(dropped)[0]).open("ab") as stream:
        stream.write(b"\0")  # written to again: it starts over
    time.sleep(line.poll)
    assert [path.name for path in line.ready()] == sorted(dropped)[1:]


def test_a_file_renamed_into_the_hot_folder_is_taken_without_settling(model, demo_root: Path, tmp_path: Path) -> None:
    """A camera that writes under a temporary name and then renames: the rename (inotify) says the file is whole, so
    it is judged at once; a file written in place at the same moment still waits its settle time."""
    line, stop, judged = _line(tmp_path, model, settle=30.0), threading.Event(), []
    watcher = threading.Thread(target=lambda: judged.append(line.run(stop=stop)))
    watcher.start()
    deadline = time.monotonic() + 20
    while line._arrivals is None and time.monotonic() < deadline:  # watching
        time.sleep(0.01)
    start = time.monotonic()
    dropped = _drop(demo_root, line.folders.inbox, 2)
    (line.folders.inbox / "in-place.png").write_bytes((line.folders.inbox / next(iter(dropped))).read_bytes())
    while len(line.audit.query()) < 2 and time.monotonic() - start < 20:
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # a few more scans, which must leave the file written in place alone
    stop.set()
    watcher.join()
    assert judged == [2] and elapsed < 20  # not the 30 s of settling
    where = _where(line)
    assert where["in-place.png"] == ["in"] and all(where[name] != ["in"] for name in dropped)


@pytest.mark.parametrize("clock", [1000.1, 34200.123, 40000.0])  # monotonic seconds: an uptime of 17 min, 9.5 h, 11 h
def test_a_renamed_file_is_ready_whatever_the_clock_reads(model, demo_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, clock: float) -> None:
    """At some clock readings (2^15 to 2^17 s of uptime among them) `clock - (clock - 0.2)` is a hair under 0.2: a
    renamed file must not hinge on it (it stayed in the inbox for good)."""
    line = _line(tmp_path, model, settle=0.2)
    monkeypatch.setattr(hotfolder.time, "monotonic", lambda: clock)
    line._arrivals = hotfolder.Arrivals(line.folders.inbox)
    try:
        dropped = _drop(demo_root, line.folders.inbox, 2)
        for scan in range(2):  # taken at once, and still ready on the next scan if it was not judged yet
            assert [path.name for path in line.ready()] == sorted(dropped)
    finally:
        line._arrivals.close()


def test_a_restart_finishes_a_judged_image_without_judging_it_again(model, demo_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = _line(tmp_path, model)
    dropped = _drop(demo_root, first.folders.inbox, 4)

    def power_cut(*_args):
        raise KeyboardInterrupt  # the run stops after recording the verdicts, before moving a file

    monkeypatch.setattr(hotfolder, "place", power_cut)
    with pytest.raises(KeyboardInterrupt):
        first.run(limit=4)
    assert len(first.audit.query()) == 4 and sorted(p.name for p in first.folders.inbox.iterdir()) == sorted(dropped)
    monkeypatch.undo()
    scored = []
    second = _line(tmp_path, model)
    original = second.judge
    second.judge = lambda paths: scored.extend(paths) or original(paths)
    assert second.run(limit=0) == 0  # recovery alone
    assert scored == [] and len(second.audit.query()) == 4  # nothing judged twice, no record added
    where = _where(second)
    assert all(len(where[name]) == 1 and where[name][0] in ("good", "defective") for name in dropped)


def test_a_run_stopped_between_the_two_renames_leaves_no_image_hidden(model, demo_root: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the image was renamed out of the inbox under its hidden staging name, before its own name: the
    restart recorded it as moved where no file was, and the image stayed hidden for good."""
    first = _line(tmp_path, model)
    dropped = _drop(demo_root, first.folders.inbox, 2)

    replace = os.replace

    def power_cut(source, target):
        if str(source).endswith(".moving"):  # the rename that gives the staged image its name
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(hotfolder.os, "replace", power_cut)
    with pytest.raises(KeyboardInterrupt):
        first.run(limit=2)
    monkeypatch.undo()
    hidden = [p for folder in first.folders.outs for p in folder.glob(".*.moving")]
    assert len(hidden) == 1  # the first image: out of the inbox, not yet under its name
    second = _line(tmp_path, model)
    assert second.run(limit=0) == 0  # recovery alone: nothing judged again
    where = _where(second)
    assert all(where[name] in (["good"], ["defective"]) for name in dropped) and not hidden[0].exists()
    assert all(Path(r["kept"]).is_file() and Path(r["kept"]).name in dropped for r in second.audit.query())


def test_a_copy_across_file_systems_stopped_before_removing_its_original_is_finished_once(
        model, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verdict folder on another file system: the move is a copy, then the original's removal. Stopped between
    the two, the next start placed the copy and left the original in the inbox, to be judged a second time."""
    first = _line(tmp_path, model)
    dropped = _drop(demo_root, first.folders.inbox, 1)

    def copied_then_stopped(source, target):
        shutil.copy2(source, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(hotfolder.shutil, "move", copied_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        first.run(limit=1)
    monkeypatch.undo()
    second = _line(tmp_path, model)
    assert second.run(limit=0) == 0
    assert all(_where(second)[name] in (["good"], ["defective"]) for name in dropped)  # not in the inbox too
    assert len(second.audit.query()) == 1


def test_a_move_that_fails_on_a_full_disk_leaves_the_image_in_the_hot_folder_and_no_partial_copy(
        model, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verdict folder on another, full, file system: the copy's first bytes stayed there under a hidden name, one
    more file at every start, and the watcher stopped on "No space left on device" naming the inbox's file."""
    first = _line(tmp_path, model)
    dropped = _drop(demo_root, first.folders.inbox, 1)

    def full_disk(source, target):
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hotfolder.shutil, "move", full_disk)
    with pytest.raises(DefectscopeError, match=r"cannot move .* No space left on device; it stays in the hot folder"):
        first.run(limit=1)
    monkeypatch.undo()
    assert _where(first) == {name: ["in"] for name in dropped}  # no partial copy beside it, hidden or not
    second = _line(tmp_path, model)  # space freed: the next start moves it
    assert second.run(limit=0) == 0 and all(_where(second)[name] in (["good"], ["defective"]) for name in dropped)


def test_a_name_that_is_not_utf8_is_judged_journaled_and_moved_under_its_own_bytes(model, demo_root: Path, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera's Latin-1 name, in a folder of such a name, stopped the hot folder at every start (SQLite takes no
    such text). Now it is judged and audited with the bytes spelled \\xNN, and a restart moves it under its own name."""
    folder = tmp_path / os.fsdecode(b"Pr\xfcfstand")
    folder.mkdir()
    first = _line(folder, model)
    name = os.fsdecode(b"Teil-\xe4.png")
    (first.folders.inbox / next(iter(_drop(demo_root, first.folders.inbox, 1)))).rename(first.folders.inbox / name)

    def power_cut(*_args):
        raise KeyboardInterrupt  # the run stops after recording the verdict, before moving the file

    monkeypatch.setattr(hotfolder, "place", power_cut)
    with pytest.raises(KeyboardInterrupt):
        first.run(limit=1)
    monkeypatch.undo()
    second = _line(folder, model)
    assert second.run(limit=0) == 0  # recovery alone: the journal found the file by its bytes
    verdict = _where(second)[name]
    assert verdict in (["good"], ["defective"])
    record = second.audit.query()[0]
    assert record["image_name"] == "Teil-\\xe4.png" and record["kept"] == as_text(str(folder / verdict[0] / name))
    assert record["kept"].endswith("Pr\\xfcfstand/" + verdict[0] + "/Teil-\\xe4.png")


def test_one_hot_folder_takes_one_watcher_and_hot_folders_sharing_an_audit_database_keep_to_their_own(
        model, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def watcher(inbox: str, audit: str) -> HotFolder:
        folders = Folders(*(tmp_path / inbox / name for name in ("in", "good", "defective", "error")))
        folders.inbox.mkdir(parents=True, exist_ok=True)
        return HotFolder(model, ModelIdentity("part", "v1", "0" * 64), folders, AuditLog(tmp_path / audit),
                         Dispatcher([]), settle=0.2, poll=0.05)

    first, stop = watcher("cam1", "audit.sqlite"), threading.Event()
    running = threading.Thread(target=first.run, args=(stop,))
    running.start()
    try:
        time.sleep(0.3)
        with pytest.raises(InputError, match="another `defectscope watch` is judging"):
            watcher("cam1", "other.sqlite").run(limit=0)  # the same hot folder
    finally:
        stop.set()
        running.join(10)
    assert watcher("cam1", "other.sqlite").run(limit=0) == 0  # free again once the first stopped
    cam1, cam2 = watcher("cam1", "audit.sqlite"), watcher("cam2", "audit.sqlite")  # one database for the line
    dropped = _drop(demo_root, cam1.folders.inbox, 1)
    name = next(iter(dropped))
    monkeypatch.setattr(hotfolder, "place", lambda *_args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cam1.run(limit=1)  # recorded, then stopped before the move
    monkeypatch.undo()
    other = next(p for p in load_dataset(demo_root).test if p.defect == "good").path
    shutil.copy(other, cam2.folders.inbox / name)  # the second camera's file of the same name
    assert cam2.run(limit=0) == 0 and len(cam2.audit.unfinished_moves(cam1.journal)) == 1  # not cam2's to finish
    assert watcher("cam1", "audit.sqlite").run(limit=0) == 0
    assert not (cam1.folders.inbox / name).exists() and len(cam1.audit.query()) == 1  # moved, judged once


def test_an_image_is_scored_from_the_bytes_it_is_audited_by_and_may_leave_before_its_turn(model, demo_root: Path,
                                                                                         tmp_path: Path) -> None:
    line = _line(tmp_path, model)
    dropped = _drop(demo_root, line.folders.inbox, 3)
    first, gone, late = (line.folders.inbox / name for name in sorted(dropped))
    other = next(p.path.read_bytes() for p in load_dataset(demo_root).test if file_sha256(p.path) not in dropped.values())
    scoring = line.predictor

    class Camera:  # overwrites one image after it was taken, removes another once it was scored
        def __getattr__(self, name):
            return getattr(scoring, name)

        def predict(self, images, **options):
            first.write_bytes(other)
            prediction = scoring.predict(images, **options)
            late.unlink()
            return prediction

    original = tmp_path / "original.png"
    shutil.copy(first, original)
    gone.unlink()  # removed from the hot folder before it was judged
    said: list[str] = []
    line.predictor, line.say = Camera(), said.append
    assert line.judge([first, gone, late]) == 2
    records = {r["image_name"]: r for r in line.audit.query()}
    assert sorted(records) == sorted([first.name, late.name])
    assert records[first.name]["image_sha256"] == dropped[first.name]  # the bytes scored are the bytes audited
    assert records[first.name]["score"] == pytest.approx(float(scoring.predict([original]).scores[0]))
    assert first.read_bytes() == other  # the new content was never judged: it stays in the hot folder for its turn
    assert not any((folder / first.name).exists() for folder in (line.folders.good, line.folders.defective,
                                                                  line.folders.error))
    assert line.audit.unfinished_moves(line.journal) == []
    assert any(gone.name in text and "left the hot folder" in text for text in said)
    assert any(late.name in text and "left the hot folder" in text for text in said)
    assert any(first.name in text and "replaced" in text for text in said)
    line.predictor = scoring
    assert line.judge([first]) == 1 and len(line.audit.query()) == 3  # judged in its turn, as a new image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_watch_command_loses_nothing_across_kill_9(served_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    inbox, outs = tmp_path / "in", {kind: tmp_path / kind for kind in ("good", "defective", "error")}
    inbox.mkdir()
    dropped = _drop(demo_root, inbox, 24)
    command = [str(Path(sys.executable).with_name("defectscope")), "--quiet", "watch", str(served_folder / "part.dsmodel"),
               str(inbox), "--good-dir", str(outs["good"]), "--defective-dir", str(outs["defective"]),
               "--error-dir", str(outs["error"]), "--audit", str(tmp_path / "audit.sqlite"), "--settle", "0.1", "--jsonl"]
    watcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert json.loads(watcher.stdout.readline())["source"] == "hot folder"  # it judges
    watcher.send_signal(signal.SIGKILL)
    watcher.wait(timeout=10)
    finished = subprocess.run([*command, "--limit", "0"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    rest = subprocess.run([*command, "--limit", str(len(list(inbox.iterdir())))], capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr
    placed = {path.name: kind for kind, folder in outs.items() for path in folder.iterdir()}
    assert sorted(placed) == sorted(dropped) and not list(inbox.iterdir())  # every image in exactly one folder
    records = AuditLog(tmp_path / "audit.sqlite").query(limit=1000)
    assert sorted(r["image_name"] for r in records) == sorted(dropped)  # one record each
    assert all(placed[r["image_name"]] == ("error" if r["verdict"] == "error" else r["verdict"]) for r in records)


@pytest.fixture
def broker(tmp_path: Path):
    executable = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if executable is None:
        if os.environ.get("DEFECTSCOPE_REQUIRE_BROKER"):
            pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    port = _free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    server = subprocess.Popen([executable, "-c", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def test_verdicts_reach_a_real_mqtt_broker(broker: str, model, demo_root: Path, tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    received: list[dict] = []
    subscribed = threading.Event()
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    listener.on_subscribe = lambda *_args: subscribed.set()
    listener.on_message = lambda _client, _data, message: received.append(json.loads(message.payload))
    host, port = broker.split(":")
    listener.connect(host, int(port))
    listener.subscribe("plant/line1", qos=1)
    listener.loop_start()
    assert subscribed.wait(10)
    dispatch = Dispatcher([Mqtt(broker, "plant/line1")])
    line = _line(tmp_path, model, dispatch)
    dropped = _drop(demo_root, line.folders.inbox, 6)
    line.run(limit=6)
    dispatch.close()
    deadline = time.monotonic() + 10
    while len(received) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.loop_stop()
    assert sorted(m["image_name"] for m in received) == sorted(dropped)
    assert sorted(m["id"] for m in received) == sorted(r["id"] for r in line.audit.query())
    assert line.audit.undelivered(line.journal) == []  # every message acknowledged by the broker


class _Flaky(BaseHTTPRequestHandler):
    failures = 2
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        failing = type(self).failures > 0
        type(self).failures -= 1
        if not failing:
            type(self).bodies.append(body)
        self.send_response(503 if failing else 204)
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


def test_broker_addresses_are_read_or_refused_before_any_connection() -> None:
    assert broker_address("line-7") == ("line-7", 1883) and broker_address("10.0.0.5:8883") == ("10.0.0.5", 8883)
    assert broker_address("[::1]:1884") == ("::1", 1884) and broker_address("::1") == ("::1", 1883)
    for bad in ("mqtt://broker:1883", "broker:0", "broker:65536", ":1883", "host:", "a b", "../x", "[::1]x"):
        with pytest.raises(SettingsError, match="--mqtt must be HOST or HOST:PORT"):
            broker_address(bad)


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--mqtt", "mqtt://:0", "--mqtt must be HOST or HOST:PORT"),  # was a traceback (port 0)
    ("--mqtt", "a" * 300, "cannot reach the MQTT broker"),  # was a traceback (a name no resolver takes)
    ("--webhook", "ftp://line/verdicts", "--webhook must be an http(s) URL")])
def test_serve_refuses_a_dispatch_target_before_it_records_a_version(served_folder: Path, tmp_path: Path, cli,
                                                                     monkeypatch: pytest.MonkeyPatch, option: str,
                                                                     value: str, said: str) -> None:
    from defectscope.service import listener

    monkeypatch.setattr(listener, "serve_on", lambda *_args: None)
    model = Path(shutil.copy(served_folder / "part.dsmodel", tmp_path / "part.dsmodel"))
    result = cli("serve", model, option, value, "--port", 0)
    assert result.code == 2 and result.err.startswith(f"error: {said}") and len(result.err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [model]  # no version store beside it, no audit trail


def test_a_webhook_is_retried_until_it_answers_and_a_dead_one_is_reported() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/verdicts"
    try:
        Webhook(url, retries=3, backoff=0.01).send({"id": 7, "verdict": "defective"})
        assert _Flaky.bodies == [{"id": 7, "verdict": "defective"}] and _Flaky.failures == -1  # two refusals, then taken
        _Flaky.failures = 10
        reports: list[str] = []
        dispatch = Dispatcher([Webhook(url, retries=2, backoff=0.01)], reports.append)
        sent = threading.Event()
        dispatch.send({"id": 8}, on_sent=sent.set)
        dispatch.close()
        assert not sent.is_set() and dispatch.failed == 1 and "verdict 8 not delivered" in reports[0]
        assert "3 tries" in reports[0] and _Flaky.failures == 7
    finally:
        server.shutdown()


class _Moved(BaseHTTPRequestHandler):
    """An http URL whose server moved to https: it answers every POST with a redirect and keeps nothing."""

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(308)
        self.send_header("location", "https://line.example/verdicts")
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


def test_a_webhook_that_redirects_has_not_taken_the_verdict() -> None:
    """A 3xx counted as delivered (any status below 400 did): every verdict was marked sent while the receiver had
    none of them."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="HTTP 308, redirected to https://line.example/verdicts: give that URL"):
            Webhook(f"http://127.0.0.1:{server.server_address[1]}/verdicts", retries=1, backoff=0.01).send({"id": 9})
    finally:
        server.shutdown()


class _Target:
    """A network target for the dispatcher's tests: records what it is sent; may refuse, or hold until released."""

    def __init__(self, name: str, refuse: bool = False, hold: threading.Event | None = None) -> None:
        self.name, self.refuse, self.hold, self.received, self.messages = name, refuse, hold, [], []

    def send(self, message: dict) -> None:
        if self.hold is not None:
            assert self.hold.wait(10)
        if self.refuse:
            raise ConnectionError(f"{self.name} is down")
        self.received.append(message["id"])
        self.messages.append(message)


def test_a_target_that_is_down_or_slow_holds_up_no_other() -> None:
    reports: list[str] = []
    down, up = _Target("webhook", refuse=True), _Target("mqtt")
    dispatch = Dispatcher([down, up], reports.append)
    sent: list[int] = []
    for record_id in (1, 2, 3):
        dispatch.send({"id": record_id}, on_sent=lambda record_id=record_id: sent.append(record_id))
    dispatch.close()
    assert up.received == [1, 2, 3]  # the broker has every verdict although the webhook refused each
    assert sent == [] and dispatch.failed == 3  # not every target has them: sent again at the next start
    assert sorted(reports) == [f"verdict {i} not delivered: webhook is down" for i in (1, 2, 3)]
    release = threading.Event()
    slow, fast = _Target("slow", hold=release), _Target("fast")
    dispatch = Dispatcher([slow, fast])
    for record_id in (4, 5, 6):
        dispatch.send({"id": record_id}, on_sent=lambda record_id=record_id: sent.append(record_id))
    deadline = time.monotonic() + 10
    while fast.received != [4, 5, 6] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast.received == [4, 5, 6] and sent == []  # the fast target did not wait for the slow one
    release.set()
    dispatch.close()
    assert slow.received == [4, 5, 6] and sent == [4, 5, 6] and dispatch.failed == 0

    def unrecorded() -> None:
        raise OSError("disk full")

    target, reports = _Target("mqtt"), []
    dispatch = Dispatcher([target], reports.append)
    dispatch.send({"id": 7}, on_sent=unrecorded)
    dispatch.send({"id": 8}, on_sent=lambda: sent.append(8))
    dispatch.close()  # the thread outlived the failed record and sent the next verdict
    assert target.received == [7, 8] and sent[-1] == 8 and dispatch.failed == 1
    assert reports == ["verdict 7 was delivered but not recorded as such: disk full"]


def test_messages_dropped_from_a_full_queue_are_reported_and_not_marked_sent(monkeypatch) -> None:
    from defectscope.line import dispatch as dispatching

    monkeypatch.setattr(dispatching, "QUEUE_LIMIT", 2)
    release, reports, sent = threading.Event(), [], []
    stuck = _Target("webhook", hold=release)
    dispatch = Dispatcher([stuck], reports.append)
    for record_id in range(1, 7):
        dispatch.send({"id": record_id}, on_sent=lambda record_id=record_id: sent.append(record_id))
    release.set()
    dispatch.close()
    lost = sorted(set(range(1, 7)) - set(stuck.received))
    assert len(lost) >= 3 and dispatch.dropped == len(lost) and dispatch.failed == len(lost)
    assert sorted(sent) == stuck.received  # only what the target took counts as sent
    assert sorted(int(r.split()[1]) for r in reports) == lost
    assert all("webhook" in r and "queue was full" in r for r in reports)


def test_a_verdict_sent_again_for_a_missing_target_is_not_printed_again(tmp_path: Path) -> None:
    import io

    from defectscope.line.outbox import send_missed, send_verdict

    audit, stream = AuditLog(tmp_path / "audit.sqlite"), io.StringIO()
    record_id = audit.record([_verdict("a.png")], outbox="serve")[0]
    down = _Target("webhook", refuse=True)
    dispatch = Dispatcher([JsonLines(stream), down])
    send_verdict(audit, dispatch, audit.get(record_id))
    dispatch.flush()
    down.refuse = False
    assert send_missed(audit, dispatch, "serve") == 1
    dispatch.close()
    assert down.received == [record_id] and audit.undelivered("serve") == []
    assert len(stream.getvalue().splitlines()) == 1  # the JSON line took it at once: printed once


def test_json_lines_are_written_at_once(tmp_path: Path) -> None:
    with (tmp_path / "out.jsonl").open("w") as stream:
        Dispatcher([JsonLines(stream)]).send({"id": 1, "verdict": "good"})
        assert (tmp_path / "out.jsonl").read_text() == '{"id": 1, "verdict": "good"}\n'


def test_an_audit_database_that_cannot_be_used_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.sqlite").write_text("my notes, not a database " * 100)
    with pytest.raises(InputError, match="is not a defectscope audit database"):
        AuditLog(tmp_path / "notes.sqlite")
    assert (tmp_path / "notes.sqlite").read_text().startswith("my notes")  # nothing of it was changed
    import sqlite3

    theirs = tmp_path / "theirs.sqlite"
    with sqlite3.connect(theirs) as database:
        database.execute("CREATE TABLE parts (serial TEXT)")
    before = theirs.read_bytes()
    with pytest.raises(InputError, match="did not write"):
        AuditLog(theirs)
    assert theirs.read_bytes() == before  # another program's database is never altered
    AuditLog(tmp_path / "ours.sqlite").close()
    assert AuditLog(tmp_path / "ours.sqlite").count() == 0  # ours opens again
    with pytest.raises(InputError, match="cannot open the audit database"):  # not even root creates files there
        AuditLog(Path("/proc/self/audit.sqlite"))


def _first_schema_database(database: Path) -> Path:
    """An audit database as version 1 of its schema wrote it: one verdict, journaled by a hot folder, not yet moved."""
    import sqlite3

    from defectscope.line.audit import COLUMNS, TYPES

    with sqlite3.connect(database) as old:
        old.execute("PRAGMA user_version=1")
        columns = ", ".join(f"{name} {TYPES.get(name, 'TEXT')}" for name in COLUMNS)
        old.execute(f"CREATE TABLE verdicts (id INTEGER PRIMARY KEY, {columns})")
        old.execute("CREATE TABLE moves (verdict_id INTEGER PRIMARY KEY REFERENCES verdicts(id), inbox_name TEXT, "
                    "destination TEXT, moved INTEGER DEFAULT 0, delivered INTEGER DEFAULT 0)")
        old.execute(f"INSERT INTO verdicts ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})",
                    [getattr(_verdict("a.png"), name) for name in COLUMNS])
        old.execute("INSERT INTO moves (verdict_id, inbox_name, destination) VALUES (1, 'a.png', '/line/good/a.png')")
    return database


def test_an_audit_database_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    database = _first_schema_database(tmp_path / "audit.sqlite")  # one verdict recorded and not yet moved
    log = AuditLog(database)
    ids = log.record([_verdict("b.png")], moves=[("b.png", "/cam2/good/b.png")], inbox="/cam2/in")
    log.claim_unnamed("/line/in")  # the first watcher to start takes the rows that named no hot folder
    log.claim_unnamed("/cam2/in")  # the next finds none left
    assert [r["inbox_name"] for r in log.unfinished_moves("/line/in")] == ["a.png"]
    assert [r["id"] for r in log.unfinished_moves("/cam2/in")] == ids
    log.close()
    with sqlite3.connect(database) as upgraded:
        assert upgraded.execute("PRAGMA user_version").fetchone()[0] == 3
    assert verify_chain(database) == ChainCheck(2, 1, None, verify_chain(database).last_link)  # its first verdict: unchained


def test_the_audit_chain_shows_a_changed_or_removed_verdict(tmp_path: Path, cli) -> None:
    import sqlite3

    database = tmp_path / "audit.sqlite"
    log = AuditLog(database)
    threads = [threading.Thread(target=lambda i=i: [log.record([_verdict(f"{i}-{k}.png")]) for k in range(20)])
               for i in range(4)]  # writers at once keep one chain
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = log.record([_verdict("moved.png")], moves=[("moved.png", "/line/good/moved.png")], inbox="/line/in")
    log.finish_move(ids[0], "/line/good/moved.png")  # where its image went is no part of the verdict
    log.close()
    held = cli("audit", "verify", database)
    assert held.code == 0 and held.out.startswith("81 verdict(s): the chain holds; the last link is ")
    noted = held.out.split("the last link is ")[1].split(":")[0]
    cut = tmp_path / "cut.sqlite"
    with sqlite3.connect(database) as source, sqlite3.connect(cut) as copy:
        source.backup(copy)
        copy.execute("DELETE FROM moves WHERE verdict_id > 78")
        copy.execute("DELETE FROM verdicts WHERE id > 78")  # the last three verdicts removed: every link left holds
    assert cli("audit", "verify", cut).code == 0  # which the chain alone cannot see
    short = cli("audit", "verify", cut, "--noted", noted)
    assert short.code == 1 and "none has the noted link" in short.out
    again = cli("audit", "verify", database, "--noted", noted)
    assert again.code == 0 and again.out.startswith("81 verdict(s): the chain holds; the noted link is verdict 81's")
    assert cli("audit", "verify", database, "--noted", "abc").code == 2
    with sqlite3.connect(database) as hand:
        hand.execute("UPDATE verdicts SET verdict = 'defective', score = 0.9 WHERE id = 40")
    changed = cli("audit", "verify", database)
    assert changed.code == 1 and changed.out.startswith("broken at verdict 40: it was changed")
    with sqlite3.connect(database) as hand:
        hand.execute("UPDATE verdicts SET verdict = 'good', score = 0.5 WHERE id = 40")  # as it was: it holds again
    assert verify_chain(database).broken is None
    with sqlite3.connect(database) as hand:
        hand.execute("DELETE FROM moves WHERE verdict_id = 60")
        hand.execute("DELETE FROM verdicts WHERE id = 60")
    assert verify_chain(database).broken == 61  # the one after a removed verdict
    assert cli("audit", "verify", tmp_path / "none.sqlite").code == 2


def test_an_audit_database_before_the_chain_verifies_as_unchained(tmp_path: Path, cli) -> None:
    database = _first_schema_database(tmp_path / "audit.sqlite")
    before = database.read_bytes()
    result = cli("audit", "verify", database)  # read-only: a line still running the older version keeps its file
    assert result.code == 0 and "the first 1 were written before the chain began" in result.out
    assert database.read_bytes() == before


def test_exporting_an_audit_database_writes_nothing_to_it(tmp_path: Path) -> None:
    database = _first_schema_database(tmp_path / "audit.sqlite")  # as a line still running version 1 keeps it
    before = database.read_bytes()
    assert export_parquet(database, tmp_path / "out.parquet") == 1
    assert database.read_bytes() == before  # not upgraded, not even touched: a read-only copy exports too
    with pytest.raises(InputError, match="is not a defectscope audit database|did not write"):
        (tmp_path / "notes.sqlite").write_bytes(b"SQLite format 3\0" + b"\0" * 200)
        export_parquet(tmp_path / "notes.sqlite", tmp_path / "other.parquet")


def test_a_hot_folder_that_cannot_be_locked_is_still_watched_and_says_so(model, demo_root: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    def no_locks(_handle, _operation):
        raise OSError(errno.EBADF, "Bad file descriptor")  # as NFS answers an exclusive lock on a folder

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said: list[str] = []
    line = _line(tmp_path, model, say=said.append)
    dropped = _drop(demo_root, line.folders.inbox, 2)
    assert line.run(limit=2) == 2 and len(line.audit.query()) == len(dropped)
    assert any("cannot be locked" in text for text in said)


def test_a_closed_json_lines_reader_is_a_missed_target_and_the_line_goes_on(model, demo_root: Path,
                                                                             tmp_path: Path) -> None:
    """`watch --jsonl | consumer`: when the consumer ended, the watcher stopped at its next verdict with exit 1 and
    not a word (click's broken-pipe exit). Now the line goes on judging and moving, each verdict not printed is
    said and stays journaled, and the next start sends it again."""
    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    reports: list[str] = []
    line = _line(tmp_path, model, Dispatcher([JsonLines(Gone())], reports.append))
    dropped = _drop(demo_root, line.folders.inbox, 3)
    assert line.run(limit=3) == 3
    assert all(_where(line)[name] in (["good"], ["defective"]) for name in dropped)
    assert len(reports) == 3 and all("the reader of the JSON lines closed its end" in text for text in reports)
    assert len(line.audit.undelivered(line.journal)) == 3
    printed = io.StringIO()
    again = _line(tmp_path, model, Dispatcher([JsonLines(printed)]))
    again.run(limit=0)  # the next start, with a reader
    assert sorted(json.loads(text)["id"] for text in printed.getvalue().splitlines()) == [1, 2, 3]


def test_verdicts_a_target_missed_are_sent_again_once_it_is_back_without_a_restart(model, demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    class Recovering(_Target):
        def send(self, message: dict) -> None:
            if not back.is_set():
                raise ConnectionError("webhook is down")
            super().send(message)

    back, reports = threading.Event(), []
    target, broker = Recovering("webhook"), _Target("mqtt")
    dispatch = Dispatcher([target, broker], reports.append)
    line = _line(tmp_path, model, dispatch, redeliver=0.2)
    dropped = _drop(demo_root, line.folders.inbox, 3)
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    running.start()
    try:
        deadline = time.monotonic() + 20
        while len(reports) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(reports) >= 3 and target.received == []  # every verdict missed while the target was down
        back.set()
        while line.audit.undelivered(line.journal) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        running.join(10)
        dispatch.close()
    ids = sorted(r["id"] for r in line.audit.query())
    assert len(ids) == len(dropped) and sorted(set(target.received)) == ids  # all of them, once it was back
    assert line.audit.undelivered(line.journal) == []
    assert all(message == line.audit.get(message["id"]) for message in target.messages)  # sent again as first sent
    assert sorted(broker.received) == ids  # the target that took them at once never sees them again


def test_a_file_written_over_goes_back_without_replacing_a_new_file_of_its_name(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, good = tmp_path / "in", tmp_path / "good"
    inbox.mkdir(), good.mkdir()
    (inbox / "a.png").write_bytes(b"written over")
    judged = hashlib.sha256(b"what was judged").hexdigest()
    hashed = hotfolder.content_sha256

    def camera_writes_again(path: Path) -> str:  # the camera writes a.png anew while the old one is being staged
        if not (inbox / "a.png").exists():
            (inbox / "a.png").write_bytes(b"the next part")
        return hashed(path)

    monkeypatch.setattr(hotfolder, "content_sha256", camera_writes_again)
    assert hotfolder.place(inbox / "a.png", good, judged) is None
    over = hashlib.sha256(b"written over").hexdigest()
    assert (inbox / "a.png").read_bytes() == b"the next part"  # kept
    assert (inbox / f"a-{over[:8]}.png").read_bytes() == b"written over"  # back, under its content's name
    assert list(good.iterdir()) == []


def test_serve_with_json_lines_keeps_stdout_for_verdicts(served_folder: Path, tmp_path: Path, cli,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.service import listener

    started = []
    monkeypatch.setattr(listener, "serve_on", lambda *_args: started.append(True))
    result = cli("serve", served_folder / "part.dsmodel", "--jsonl", "--audit", tmp_path / "audit.sqlite", "--port", 0)
    assert result.code == 0 and started
    assert result.out == "" and "serving part" in result.err  # a reader of the JSON lines gets JSON only


def test_watch_runs_its_model_once_before_the_first_part(served_folder: Path, tmp_path: Path, cli,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine sets itself up on its first run: at start, not on the first part dropped into the hot folder."""
    from conftest import count_runs
    from defectscope import predictor as predictors

    runs = count_runs(monkeypatch, predictors)
    (tmp_path / "in").mkdir()
    result = cli("watch", served_folder / "part.dsmodel", tmp_path / "in", "--limit", "0", "--audit", tmp_path / "audit.sqlite",
                 *(option for kind in ("good", "defective", "error") for option in (f"--{kind}-dir", tmp_path / kind)))
    assert result.code == 0, result.err
    assert len(runs) == 1 and runs[0][0] == 1  # one blank frame, and no part was there


def test_watch_refuses_bad_folders_and_settle_times_before_it_writes_anything(served_folder: Path, tmp_path: Path,
                                                                             cli) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    outs = [option for kind in ("good", "defective", "error") for option in (f"--{kind}-dir", tmp_path / kind)]
    for settle, said in (("nan", "must be a finite number"), ("inf", "must be a finite number"), ("-1", "must be in")):
        refused = cli("watch", served_folder / "part.dsmodel", inbox, *outs, "--settle", settle, "--limit", "0")
        assert refused.code == 2 and refused.err.startswith(f"error: field 'settle' {said}")
    same = cli("watch", served_folder / "part.dsmodel", inbox, *outs[:-1], inbox, "--limit", "0")
    assert same.code == 2 and "four different folders" in same.err
    topic = cli("watch", served_folder / "part.dsmodel", inbox, *outs, "--mqtt-topic", "plant/a", "--limit", "0")
    assert topic.code == 2 and topic.err.strip() == "error: --mqtt-topic applies with --mqtt only"
    for wrong in ("plant/#", "plant/+/line1", ""):  # the broker would refuse every verdict ("" took the default)
        refused = cli("watch", served_folder / "part.dsmodel", inbox, *outs, "--mqtt", "127.0.0.1:1", "--mqtt-topic",
                      wrong, "--limit", "0")
        assert refused.code == 2 and refused.err.startswith("error: --mqtt-topic must be an MQTT topic to publish to")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in"]  # no audit trail, no verdict folders
    with pytest.raises(SettingsError, match="settle"):  # the library checks it too: NaN would leave every file waiting
        HotFolder(load_model(served_folder / "part.dsmodel"), ModelIdentity("part", "1", "0" * 64),
                  Folders(inbox, tmp_path / "good", tmp_path / "defective", tmp_path / "error"),
                  AuditLog(tmp_path / "audit.sqlite"), Dispatcher([]), settle=float("nan"))


def test_the_hot_folder_says_once_when_its_parts_drift_from_the_training_goods(served_folder: Path, demo_root: Path,
                                                                               tmp_path: Path) -> None:
    from dataclasses import replace

    model = load_model(served_folder / "part.dsmodel")  # its own copy: the calibration is changed below
    calibration = model.calibration
    model.calibration = replace(calibration, good_median=calibration.good_median - 3 * calibration.good_std)
    said: list[str] = []
    line = _line(tmp_path, model, say=said.append, drift_every=10)
    train = load_dataset(demo_root).train
    for batch in (train[:30], train[30:40]):  # good parts, each now well above the stated goods' median
        for sample in batch:
            shutil.copy(sample.path, line.folders.inbox / f"{sample.path.name}.tmp")
            (line.folders.inbox / f"{sample.path.name}.tmp").rename(line.folders.inbox / sample.path.name)
        assert line.run(limit=len(batch)) == len(batch)
        drifts = [text for text in said if text.startswith("drift:")]
        assert len(drifts) == 1 and "of the last 30 parts" in drifts[0]  # said when found, not again at the next check
    assert not any(text.startswith("no drift") for text in said)


def _retained(broker: str, topic: str) -> list[dict]:
    """What a subscriber that connects now receives on `topic` within 10 s: the broker's retained message."""
    import paho.mqtt.client as mqtt

    received: list[dict] = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda _client, _data, message: received.append(json.loads(message.payload))
    host, port = broker.split(":")
    listener.connect(host, int(port))
    listener.subscribe(topic, qos=1)
    listener.loop_start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.loop_stop()
    return received


def test_the_drift_checks_turn_is_published_retained_for_a_subscriber_that_comes_later(broker: str, served_folder: Path,
                                                                                      demo_root: Path, tmp_path: Path
                                                                                      ) -> None:
    from dataclasses import replace

    from defectscope.line.dispatch import DriftNotice

    model = load_model(served_folder / "part.dsmodel")
    model.calibration = replace(model.calibration, good_median=model.calibration.good_median - 3 * model.calibration.good_std)
    identity = ModelIdentity("part", "v1", "0" * 64)
    notice = DriftNotice(broker, "plant/line1", identity.message(), report=pytest.fail)
    line = _line(tmp_path, model, on_drift=notice, drift_every=20)
    for sample in load_dataset(demo_root).train[:20]:  # good parts, now well above the stated goods' median
        shutil.copy(sample.path, line.folders.inbox / f"{sample.path.name}.tmp")
        (line.folders.inbox / f"{sample.path.name}.tmp").rename(line.folders.inbox / sample.path.name)
    assert line.run(limit=20) == 20
    notice.close()
    received = _retained(broker, "plant/line1/drift")  # subscribed only now: the broker kept the state
    assert len(received) == 1 and received[0]["drifted"] is True and received[0]["model_sha256"] == "0" * 64
    assert received[0]["message"].startswith("drift:") and received[0]["parts"] == 20


def test_a_drift_notice_the_broker_does_not_take_is_reported_and_the_line_goes_on(broker: str) -> None:
    from defectscope.line.dispatch import DriftNotice
    from defectscope.line.drift import score_drift

    said: list[str] = []
    notice = DriftNotice(broker, "plant/line1", {}, report=said.append)

    def refuse(_message: dict) -> None:
        raise ConnectionError("the broker did not acknowledge a message within 5 s")

    notice.target.send = refuse
    notice(score_drift(None, []))  # no exception: the hot folder keeps judging
    notice.close()
    assert len(said) == 1 and "did not reach MQTT broker" in said[0]


def test_watch_with_mqtt_publishes_the_drift_state(broker: str, served_folder: Path, demo_root: Path, tmp_path: Path,
                                                   cli) -> None:
    from dataclasses import replace

    from defectscope.artifacts import set_threshold

    calibration = load_model(served_folder / "part.dsmodel").calibration
    moved = replace(calibration, good_median=calibration.good_median - 3 * calibration.good_std)
    model = set_threshold(served_folder / "part.dsmodel", moved, tmp_path / "part.dsmodel")
    inbox = tmp_path / "in"
    inbox.mkdir()
    dataset = load_dataset(demo_root)
    for i, sample in enumerate([*dataset.train, *[s for s in dataset.test if not s.label]]):  # 50 good parts: a check
        shutil.copy(sample.path, inbox / f"{i:03d}.png")
    assert len(list(inbox.iterdir())) == 50  # all there before watch starts: --limit 50 then ends
    result = cli("watch", model, inbox, "--limit", 50, "--audit", tmp_path / "audit.sqlite", "--mqtt", broker,
                 "--mqtt-topic", "plant/line1",
                 *(option for kind in ("good", "defective", "error") for option in (f"--{kind}-dir", tmp_path / kind)))
    assert result.code == 0, result.err
    assert "drift:" in result.out + result.err
    received = _retained(broker, "plant/line1/drift")
    assert len(received) == 1 and received[0]["drifted"] is True and received[0]["model"] == "part"
    assert received[0]["model_sha256"] == file_sha256(model)


def test_the_watcher_says_when_its_model_file_no_longer_holds_the_version_judging(model, served_folder: Path,
                                                                                  tmp_path: Path) -> None:
    """`calibrate -o MODEL` in place while `watch` ran: the line went on with the old threshold, and nothing said so."""
    from defectscope.files import file_sha256
    from defectscope.pipeline import recalibrate

    loaded, other = tmp_path / "part.dsmodel", tmp_path / "other.dsmodel"
    shutil.copyfile(served_folder / "part.dsmodel", loaded)
    recalibrate(loaded, other, false_alarm_rate=0.2)
    digest, said = file_sha256(loaded), []
    line = _line(tmp_path, model, say=said.append)
    line.model = ModelIdentity("part", digest[:12], digest, loaded)
    stop = threading.Event()
    watcher = threading.Thread(target=lambda: line.run(stop=stop))
    watcher.start()

    def said_with(fragment: str) -> list[str]:
        deadline = time.monotonic() + 20
        while not [line for line in said if fragment in line] and time.monotonic() < deadline:
            time.sleep(0.02)
        return [line for line in said if fragment in line]

    try:
        data = other.read_bytes()
        with open(loaded, "wb") as copying:  # copied over it, slowly (cp): a file half written is no version
            copying.write(data[: len(data) // 2])
            copying.flush()
            time.sleep(0.5)
            copying.write(data[len(data) // 2 :])
        changed = said_with("now holds version")
        assert changed == [f"{loaded} now holds version {file_sha256(other)[:12]}; this watcher still judges with "
                           f"version {digest[:12]}: start it again to judge with the file as it is now"]
        shutil.copyfile(served_folder / "part.dsmodel", loaded)  # rolled back
        assert said_with("again, the version judging")
        time.sleep(0.2)
        assert len(said_with("now holds version")) == 1  # said once per change, not at every scan
        assert {line.split(" now holds ")[1].split(";")[0] for line in said_with("now holds")} <= {
            f"version {file_sha256(other)[:12]}", "no whole model (being written, or damaged)"}  # never the half file's
    finally:
        stop.set()
        watcher.join()


def test_a_name_as_long_as_the_file_system_allows_is_judged_and_placed(model, demo_root: Path, tmp_path: Path) -> None:
    """A 254-character name: the move staged it as '.NAME.PID.moving', past the 255-byte limit, and the watcher stopped
    with 'File name too long' on every start (its verdict recorded, its move never done); a verdict folder that held
    another file of that name needed NAME-digest.png, too long as well."""
    line = _line(tmp_path, model)
    name = "é" * 100 + "a" * 50 + ".png"  # 254 bytes in UTF-8
    good = load_dataset(demo_root).test
    shutil.copy(good[-1].path, line.folders.inbox / name)
    for folder in line.folders.outs:
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"an earlier part's image, kept")
    assert line.run(limit=1) == 1
    placed = [p for folder in line.folders.outs for p in folder.iterdir() if p.read_bytes() == good[-1].path.read_bytes()]
    assert len(placed) == 1 and len(os.fsencode(placed[0].name)) <= 255 and placed[0].name.endswith(".png")
    assert all((folder / name).read_bytes() == b"an earlier part's image, kept" for folder in line.folders.outs)
    assert not list(line.folders.inbox.iterdir())
