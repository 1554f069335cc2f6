"""The audit trail: every verdict with its model, threshold, image and caller, in an embedded SQLite database.

The database runs in WAL mode with full synchronous commits, one transaction per request or image, so
a record that was answered is on disk: killing the process (even `kill -9`) loses none. Readers never
block the writer. Export to Parquet with `defectscope audit export`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defectscope.errors import InputError, StorageError
from defectscope.names import as_text

SCHEMA_VERSION = 3  # 2: each journal row names its hot folder or the service (version 1's: see claim_unnamed); the
# targets that took a message another missed (deliveries); 3: each verdict's link in the chain (`link`)
MAX_PAGE = 1000  # records per query at most
MAX_RECORD_ID = 2**63 - 1  # SQLite's largest integer
EXPORT_PAGE = 50_000  # records an export holds in memory at once (a Parquet row group each)
EXPORT_KEY, EXPORT_MARK = b"defectscope", b"audit export"  # the schema metadata that marks an export as ours


@dataclass
class Verdict:
    """One audited verdict: what was decided about which image, by which model, when and for whom."""

    time: str  # ISO 8601, UTC
    model: str
    model_version: str
    model_sha256: str
    threshold: float | None
    stated_rate: float | None
    image_sha256: str
    image_name: str
    width: int | None
    height: int | None
    source: str  # "upload", "hot folder"
    score: float | None
    normalized: float | None
    verdict: str
    regions: int | None
    role: str
    kept: str | None = None  # where a retained copy of the image is, if any


COLUMNS = [f.name for f in fields(Verdict)]
STORAGE_FAILURES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY}  # the disk's, not the data's
TYPES = {"threshold": "REAL", "stated_rate": "REAL", "width": "INTEGER", "height": "INTEGER", "score": "REAL",
         "normalized": "REAL", "regions": "INTEGER"}


CHAINED = [name for name in COLUMNS if name != "kept"]  # what a verdict's link covers: all but where its image went


def link(previous: str, record: dict[str, Any]) -> str:
    """A verdict's link in the audit chain: the sha256 of the link before it and of its CHAINED fields, each as the
    database gives it back, so that changing, removing or reordering a record breaks every link after it."""
    fields = [_as_stored(name, record[name]) for name in CHAINED]
    return hashlib.sha256(json.dumps([previous, *fields], separators=(",", ":")).encode()).hexdigest()


def exact_name(path: str | None) -> str | bytes | None:
    """A file's name or path as the journal stores it to find the file again: text, or its bytes where they are not
    UTF-8 (SQLite keeps them as a BLOB)."""
    return path if path is None or as_text(path) == path else os.fsencode(path)


def _from_exact(stored: str | bytes | None) -> str | None:
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def _as_stored(name: str, value: Any) -> Any:
    """A field's value as SQLite gives it back: a REAL a float (NaN none), an INTEGER an int."""
    if value is None or name not in TYPES:
        return value
    value = float(value) if TYPES[name] == "REAL" else int(value)
    return None if value != value else value


def matching(model: str | None = None, verdict: str | None = None, since: str | None = None,
             until: str | None = None) -> tuple[str, list[Any]]:
    """An SQL condition on the verdicts table and its values: every filter given (a time range in ISO 8601, `since`
    inclusive, `until` exclusive, read by `as_recorded`); TRUE without any."""
    filters = [("model = ?", model), ("verdict = ?", verdict),
               ("time >= ?", None if since is None else as_recorded(since, "since")),
               ("time < ?", None if until is None else as_recorded(until, "until"))]
    given = [(clause, value) for clause, value in filters if value is not None]
    return " AND ".join(clause for clause, _ in given) or "1", [value for _, value in given]


def as_recorded(time: str, what: str) -> str:
    """An ISO 8601 time (a date, 'Z' or any offset; without one: UTC) as the audit trail writes times, so that
    comparing the text compares the instants (11:00+01:00 is 10:00 UTC)."""
    try:
        moment = datetime.fromisoformat(time)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be an ISO 8601 time such as 2026-12-07T10:00:00Z, got {time!r:.60}") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")


class AuditLog:
    """An append-only verdict log in SQLite; safe to use from several threads of one process."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """Open (or create) the audit database at `path`; `read_only`: an existing one, for reading, left as it is."""
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"the audit database {self.path} is a folder; give a file path")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            target = f"{self.path.resolve().as_uri()}?mode=ro" if read_only else str(self.path)
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30, uri=read_only)
            tables = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if (tables or read_only) and not 1 <= version <= SCHEMA_VERSION:
                self._db.close()
                raise InputError(f"{self.path} is a database defectscope did not write; it is left as it is (choose "
                                 "another file with --audit)")
            self._lock = threading.Lock()
            if read_only:
                return
            if tables and version == 1:
                self._db.execute("ALTER TABLE moves ADD COLUMN inbox TEXT")
            if tables and version < 3:  # the records before it stay unchained (`verify_chain` counts them)
                self._db.execute("ALTER TABLE verdicts ADD COLUMN chain TEXT")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # before any table: ours from the start
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            columns = ", ".join(f"{name} {TYPES.get(name, 'TEXT')}" for name in COLUMNS)
            self._db.execute(f"CREATE TABLE IF NOT EXISTS verdicts (id INTEGER PRIMARY KEY, {columns}, chain TEXT)")
            self._db.execute("CREATE INDEX IF NOT EXISTS verdicts_by_time ON verdicts (time)")
            self._db.execute("CREATE INDEX IF NOT EXISTS verdicts_by_model ON verdicts (model_sha256, id)")  # drift checks
            self._db.execute("CREATE TABLE IF NOT EXISTS moves (verdict_id INTEGER PRIMARY KEY REFERENCES verdicts(id), "
                             "inbox_name TEXT, destination TEXT, moved INTEGER DEFAULT 0, delivered INTEGER DEFAULT 0, "
                             "inbox TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS deliveries (verdict_id INTEGER REFERENCES verdicts(id), "
                             "target TEXT, PRIMARY KEY (verdict_id, target)) WITHOUT ROWID")
        except sqlite3.OperationalError as exc:  # a folder we may not write, a locked or read-only file
            raise InputError(f"cannot open the audit database {self.path}: {exc}; choose another with --audit, or "
                             "keep none with --no-audit") from exc
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a defectscope audit database: {exc}") from exc

    def record(self, verdicts: Sequence[Verdict], moves: Sequence[tuple[str, str]] | None = None,
               inbox: str | None = None, outbox: str | None = None) -> list[int]:
        """Append verdicts in one durable transaction; returns their record ids. `moves` (the hot folder `inbox`): each
        verdict's (inbox file name, destination), journaled in the same transaction until `finish_move`; `outbox` (a
        sender with nothing to move, the service): each verdict journaled under that name until `delivered`."""
        placeholders = ", ".join("?" for _ in [*COLUMNS, "chain"])
        with self._transaction():
            last = self._db.execute("SELECT chain FROM verdicts ORDER BY id DESC LIMIT 1").fetchone()
            previous, ids = (last and last[0]) or "", []
            for verdict in verdicts:
                values = {name: getattr(verdict, name) for name in COLUMNS}
                previous = link(previous, values)
                ids.append(self._db.execute(f"INSERT INTO verdicts ({', '.join(COLUMNS)}, chain) VALUES ({placeholders})",
                                            [*values.values(), previous]).lastrowid)
            for record_id, (name, destination) in zip(ids, moves or []):
                self._db.execute("INSERT INTO moves (verdict_id, inbox_name, destination, inbox) VALUES (?, ?, ?, ?)",
                                 (record_id, exact_name(name), exact_name(destination), inbox))
            for record_id in ids if outbox is not None else []:
                self._db.execute("INSERT INTO moves (verdict_id, moved, inbox) VALUES (?, 1, ?)", (record_id, outbox))
        return ids

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One durable transaction, rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:  # SQLite has rolled back itself after some errors (a full disk)
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in STORAGE_FAILURES:
                    raise StorageError(f"cannot write the audit database {self.path}: {exc}") from exc
                raise

    def _write(self, sql: str, values: tuple) -> None:
        with self._lock:
            self._db.execute(sql, values)  # autocommit: one durable statement

    def finish_move(self, record_id: int, destination: str | None) -> None:
        """The image of a journaled verdict is in its destination folder (and the record says where; None: it left the
        hot folder, or was written over, before it could be moved)."""
        self._write("UPDATE moves SET moved = 1, destination = ? WHERE verdict_id = ?", (exact_name(destination), record_id))
        self._write("UPDATE verdicts SET kept = ? WHERE id = ?", (destination and as_text(destination), record_id))

    def delivered(self, record_id: int) -> None:
        """Every dispatch target acknowledged this verdict's message (the targets that took it earlier are forgotten)."""
        with self._transaction():
            self._db.execute("UPDATE moves SET delivered = 1 WHERE verdict_id = ?", (record_id,))
            self._db.execute("DELETE FROM deliveries WHERE verdict_id = ?", (record_id,))

    def delivered_to(self, record_id: int, targets: Sequence[str]) -> None:
        """These dispatch targets acknowledged this verdict's message while another missed it."""
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO deliveries (verdict_id, target) VALUES (?, ?)",
                                 [(record_id, target) for target in targets])

    def took(self, record_id: int) -> set[str]:
        """The dispatch targets that acknowledged this verdict's message while another missed it."""
        with self._lock:
            rows = self._db.execute("SELECT target FROM deliveries WHERE verdict_id = ?", (record_id,)).fetchall()
        return {row[0] for row in rows}

    def claim_unnamed(self, inbox: str) -> None:
        """Journal rows of schema version 1, which named no hot folder, become `inbox`'s: the first watcher to start
        after the upgrade finishes them, as any watcher did before."""
        self._write("UPDATE moves SET inbox = ? WHERE inbox IS NULL", (inbox,))

    def _journal(self, condition: str, inbox: str, limit: int = -1) -> list[dict[str, Any]]:
        """Journaled verdicts of `inbox` (a hot folder's path, or a sender's name) on `condition`, oldest first, at
        most `limit` (-1: all)."""
        with self._lock:
            rows = self._db.execute(f"SELECT v.id, {', '.join('v.' + c for c in COLUMNS)}, m.inbox_name, m.destination "
                                    f"FROM verdicts v JOIN moves m ON m.verdict_id = v.id WHERE {condition} "
                                    "AND m.inbox = ? ORDER BY v.id LIMIT ?", (inbox, limit)).fetchall()
        return [{**dict(zip(["id", *COLUMNS], row)), "inbox_name": _from_exact(row[-2]), "destination": _from_exact(row[-1])}
                for row in rows]

    def unfinished_moves(self, inbox: str) -> list[dict[str, Any]]:
        """The hot folder's journaled verdicts whose image was not yet moved (a run stopped between the record and the
        move); another hot folder's, in the same database, are its own watcher's to finish."""
        return self._journal("m.moved = 0", inbox)

    def undelivered_count(self, inbox: str) -> int:
        """How many of `inbox`'s verdicts not every dispatch target has acknowledged yet."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM moves WHERE moved = 1 AND delivered = 0 AND inbox = ?",
                                        (inbox,)).fetchone()[0])

    def undelivered(self, inbox: str, limit: int = -1) -> list[dict[str, Any]]:
        """The hot folder's moved images whose verdict message not every target acknowledged yet (at most `limit`)."""
        return self._journal("m.moved = 1 AND m.delivered = 0", inbox, limit)

    def get(self, record_id: int) -> dict[str, Any]:
        if not 1 <= record_id <= MAX_RECORD_ID:  # SQLite cannot even compare a larger integer
            raise InputError(f"no audit record {record_id}")
        with self._lock:
            row = self._db.execute(f"SELECT id, {', '.join(COLUMNS)} FROM verdicts WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise InputError(f"no audit record {record_id}")
        return dict(zip(["id", *COLUMNS], row))

    def query(self, model: str | None = None, verdict: str | None = None, since: str | None = None,
              until: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Records matching every filter given (`matching`), newest first, paged."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InputError(f"limit must be 1 to {MAX_PAGE} and offset at least 0")
        where, values = matching(model=model, verdict=verdict, since=since, until=until)
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM verdicts WHERE {where} ORDER BY id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*values, limit, offset]).fetchall()
        return [dict(zip(["id", *COLUMNS], row)) for row in rows]

    def recent_scores(self, model_sha256: str, limit: int) -> list[float]:
        """The scores of the last `limit` images one model file (by its sha256) judged good or defective, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT score FROM verdicts WHERE model_sha256 = ? AND verdict IN ('good', 'defective') "
                                    "AND score IS NOT NULL ORDER BY id DESC LIMIT ?", (model_sha256, limit)).fetchall()
        return [row[0] for row in rows]

    def pages(self, size: int, since: str | None = None, until: str | None = None,
              columns: Sequence[str] = COLUMNS) -> Iterator[list[dict[str, Any]]]:
        """The records of a time range (`matching`; default: all), oldest first, `size` at a time (by id, so memory
        stays bounded however long the trail): their id and `columns`."""
        where, values = matching(since=since, until=until)
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(f"SELECT id, {', '.join(columns)} FROM verdicts WHERE id > ? AND {where} "
                                        "ORDER BY id LIMIT ?", (last, *values, size)).fetchall()
            if not rows:
                return
            yield [dict(zip(["id", *columns], row)) for row in rows]
            last = rows[-1][0]

    def chained(self) -> bool:
        """Whether the database holds links (schema version 3 on); an older one opened read-only holds none."""
        with self._lock:
            return any(row[1] == "chain" for row in self._db.execute("PRAGMA table_info(verdicts)"))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def require_database(database: Path) -> None:
    """Raise unless an audit database to read exists as a file (reading never creates one)."""
    if not database.is_file():
        raise InputError(f"audit database {database} {'is not a file' if database.exists() else 'does not exist'}")


def export_parquet(database: Path, out: Path, page: int = EXPORT_PAGE, since: str | None = None,
                   until: str | None = None, force: bool = False) -> int:
    """The records of an audit database (in a time range, as `matching` reads it; default: all) into one Parquet
    file, a row group of `page` records at a time (memory stays bounded), written atomically and marked as an audit
    export (`is_audit_export`); returns the record count. An earlier export is replaced, another file only with
    `force`, the database itself never."""
    from defectscope.files import atomic_stream, check_output_file
    from defectscope.scale.scoring import pyarrow_modules

    require_database(database)
    if Path(out).resolve() in {Path(f"{database.resolve()}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")}:
        raise InputError(f"{out} is the audit database {database} (or one of its files); export to another file")
    check_output_file(out, force, is_ours=is_audit_export)
    start, end = (None if time is None else as_recorded(time, what) for time, what in ((since, "since"), (until, "until")))
    if start is not None and end is not None and start >= end:  # a query's empty page; an export of it, a typo
        raise InputError(f"since ({since}) must be before until ({until}): no verdict lies between them")
    pyarrow = pyarrow_modules()
    names, types = ["id", *COLUMNS], {"id": "INTEGER", **TYPES}
    arrow = {"REAL": pyarrow.float64(), "INTEGER": pyarrow.int64(), "TEXT": pyarrow.string()}
    schema = pyarrow.schema([(name, arrow[types.get(name, "TEXT")]) for name in names], metadata={EXPORT_KEY: EXPORT_MARK})
    log, count = AuditLog(database, read_only=True), 0
    try:
        with atomic_stream(out) as stream, pyarrow.parquet.ParquetWriter(stream, schema) as writer:
            for rows in log.pages(page, since, until):
                writer.write_table(pyarrow.table({name: [row[name] for row in rows] for name in names}, schema=schema))
                count += len(rows)
    finally:
        log.close()
    return count


@dataclass(frozen=True)
class ChainCheck:
    """What `verify_chain` found: the records read, those before the chain began, the first record whose link does not
    follow (None: every link holds), the last link, which a trail cut short after it would not end on, and the record
    whose link is the one noted earlier (None: no record has it, or none was noted)."""

    records: int
    unchained: int
    broken: int | None
    last_link: str | None
    noted_at: int | None = None


def verify_chain(database: Path, page: int = EXPORT_PAGE, noted: str | None = None) -> ChainCheck:
    """Every link of an audit database recomputed from its records, oldest first (read-only, memory bounded). Records
    written before the chain began (schema version 2 and older) come first and are counted; after the first link,
    a record without one, or whose link does not follow from the one before and its fields, is where it broke.
    `noted`: a link read from the trail earlier, looked for among the records (a trail cut short before it, or
    rewritten, has it nowhere)."""
    require_database(database)
    if noted is not None and not re.fullmatch(r"[0-9a-f]{64}", noted):
        raise InputError(f"a noted link is the 64 hex digits `audit verify` printed; got {noted!r}")
    log = AuditLog(database, read_only=True)
    records, unchained, previous, noted_at = 0, 0, None, None
    try:
        if not log.chained():
            count = log.count()
            return ChainCheck(count, count, None, None)
        for rows in log.pages(page, columns=[*CHAINED, "chain"]):
            for row in rows:
                records += 1
                if previous is None and row["chain"] is None:
                    unchained += 1
                    continue
                if row["chain"] != link(previous or "", row):
                    return ChainCheck(records, unchained, row["id"], previous, noted_at)
                previous = row["chain"]
                noted_at = row["id"] if previous == noted else noted_at
    finally:
        log.close()
    return ChainCheck(records, unchained, None, previous, noted_at)


def is_audit_export(path: Path) -> bool:
    """Whether `path` is a Parquet file `export_parquet` wrote (its schema carries the mark), so a new export may
    replace it; anything else, or a file it cannot read, is not (nor is a FIFO or device read, never waited on)."""
    from defectscope.scale.scoring import pyarrow_modules

    if not Path(path).is_file():
        return False
    try:
        metadata = pyarrow_modules().parquet.read_schema(path).metadata or {}
    except (OSError, ValueError):  # not Parquet, unreadable
        return False
    return metadata.get(EXPORT_KEY) == EXPORT_MARK
