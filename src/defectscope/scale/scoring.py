"""`score`: batch scoring into a Parquet dataset, resumable, in this process or with Ray Data.

The images are split into fixed chunks; chunk i becomes the file `part-<i>.parquet`, written
atomically once the whole chunk is scored. A part file therefore exists only for a complete
chunk, so an interrupted run resumes with the chunks that have none (and scores again the chunks
holding an 'error' row): no image is missing or scored twice. `_job.json` pins the model (by its
sha256) and the image list (resolved on the driver); a different job refuses the folder.
Read the result with `pyarrow.parquet.read_table(folder)` (or pandas, Polars, DuckDB, Spark).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from defectscope.data.decode import expand_inputs
from defectscope.errors import DefectscopeError
from defectscope.files import claim_folder, file_sha256, json_text, loads_strict, read_regular, write_atomic
from defectscope.jobs import connect_ray
from defectscope.prediction import prediction_rows

CHUNK_IMAGES = 256  # images per part file: one predict call, bounded memory
JOB_FILE = "_job.json"  # Parquet readers skip names starting with '_' or '.'
LOCK_FILE = ".lock"  # held (flock) by the run writing into the folder
COLUMNS = ("path", "score", "normalized", "verdict", "error")


def pyarrow_modules() -> Any:
    """pyarrow with its parquet module loaded, or one clear error naming the extra to install."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise DefectscopeError("writing Parquet needs pyarrow: pip install 'defectscope[ray]'") from exc
    return pyarrow


def part_path(out: Path, chunk: int) -> Path:
    return out / f"part-{chunk:06d}.parquet"


def write_chunk(model: Any, out: Path, chunk: int, paths: Sequence[str]) -> int:
    """Score one chunk and write its part file atomically; returns the number of images."""
    pyarrow = pyarrow_modules()
    rows = prediction_rows([Path(p) for p in paths], model.predict(list(paths), map_size="input", keep_going=True))
    table = pyarrow.table({column: [row.get(column) for row in rows] for column in COLUMNS},
                          schema=pyarrow.schema([("path", pyarrow.string()), ("score", pyarrow.float64()),
                                                 ("normalized", pyarrow.float64()), ("verdict", pyarrow.string()),
                                                 ("error", pyarrow.string())]))
    buffer = io.BytesIO()
    pyarrow.parquet.write_table(table, buffer)
    write_atomic(part_path(out, chunk), buffer.getvalue())
    return len(rows)


class ChunkWriter:
    """A Ray Data actor: loads the model once, then scores and writes the chunks it is given on `threads` threads
    (the driver's count: convolution results depend on it in their last bits)."""

    def __init__(self, model_path: str, out: str, threads: int) -> None:
        import torch

        from defectscope.predictor import load_predictor

        torch.set_num_threads(threads)
        self.model, self.out = load_predictor(Path(model_path), threads=threads), Path(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [write_chunk(self.model, self.out, int(chunk), json.loads(paths))
                  for chunk, paths in zip(batch["chunk"], batch["paths"])]
        return {"chunk": batch["chunk"], "images": images}


def _inputs(inputs: Sequence[Path]) -> list[str]:
    """Images and folders, or text files listing one image per line (blank lines and '#' comments skipped)."""
    listed: list[Path] = []
    for item in map(Path, inputs):
        if item.suffix == ".txt" and item.is_file():
            lines = item.read_text(encoding="utf-8").splitlines()
            listed += [item.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            listed.append(item)
    return [os.path.abspath(path) for path in expand_inputs(listed)]  # resolved here, on the driver


IDENTITY = ("model_sha256", "images", "images_sha256", "chunk_images")  # what makes two runs one job


def _same_job(path: Path, job: dict) -> bool:
    """Whether the job file at `path` is this job: the same model (by content, however its path is spelled), the same
    images in the same chunks."""
    try:
        recorded = loads_strict(read_regular(path, "job file", 1 << 20), str(path))
    except DefectscopeError:
        return False  # unreadable: another job
    return isinstance(recorded, dict) and all(recorded.get(key) == job[key] for key in IDENTITY)


def _done(part: Path) -> bool:
    """A chunk is done when its part file exists and holds no 'error' row (those are scored again on resume)."""
    if not part.is_file():
        return False
    verdicts = pyarrow_modules().parquet.read_table(part, columns=["verdict"]).column("verdict").to_pylist()
    return "error" not in verdicts


@contextmanager
def _job_lock(out: Path) -> Iterator[None]:
    """An OS lock on the job folder for the whole run: a second writer is refused (even with --force), and the lock
    goes with the process that held it (a killed run leaves nothing to clean up)."""
    handle = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DefectscopeError(f"another score job is writing into {out}; wait for it to finish, or choose another "
                                   "folder (--force does not take a folder in use)") from exc
        yield
    finally:
        os.close(handle)


def _failed_rows(out: Path) -> int:
    """Rows of the whole dataset (resumed parts too) whose image could not be scored."""
    verdicts = pyarrow_modules().parquet.read_table(out, columns=["verdict"]).column("verdict").to_pylist()
    return sum(verdict == "error" for verdict in verdicts)


def score_to_parquet(model_path: Path, inputs: Sequence[Path], out: Path, ray_address: str | None = None,
                     workers: int = 2, force: bool = False, chunk_images: int = CHUNK_IMAGES,
                     threads: int | None = None) -> dict[str, Any]:
    """Score every image into the Parquet dataset `out`, continuing an interrupted run of the same job.

    The model is loaded (and so checked) before the folder is touched; the folder is locked for the run.
    On Ray, `workers` actors each hold the model and `threads` CPUs (default: this process's torch
    threads, which gives bit-identical scores to scoring here). `failed` counts the rows whose image
    could not be scored.
    """
    from defectscope.predictor import load_predictor

    pyarrow_modules()
    paths = _inputs(inputs)
    if not paths:
        raise DefectscopeError("no images to score: the inputs list none")
    model = load_predictor(Path(model_path))  # a bad model is refused before anything is written
    job = {"model": os.path.abspath(model_path), "model_sha256": file_sha256(Path(model_path)), "images": len(paths),
           "images_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(), "chunk_images": chunk_images}
    out = Path(out)
    existing = out / JOB_FILE
    if existing.is_file() and not _same_job(existing, job) and not force:
        raise DefectscopeError(f"{out} holds results of another scoring job (other model or images); "
                               "choose a new folder, or pass --force to start this job there")
    claim_folder(out, force, "score results")
    with _job_lock(out):
        if existing.is_file() and not _same_job(existing, job):
            for stale in out.glob("part-*.parquet"):
                stale.unlink()
        write_atomic(existing, (json_text(job) + "\n").encode())
        chunks = [(i, paths[start : start + chunk_images]) for i, start in enumerate(range(0, len(paths), chunk_images))]
        todo = [(i, chunk) for i, chunk in chunks if not _done(part_path(out, i))]
        if ray_address is None:
            scored = sum(write_chunk(model, out, i, chunk) for i, chunk in todo)
        elif todo:
            import torch

            ray = connect_ray(ray_address)
            threads = threads or torch.get_num_threads()
            items = [{"chunk": i, "paths": json.dumps(chunk)} for i, chunk in todo]
            written = ray.data.from_items(items).map_batches(
                ChunkWriter, fn_constructor_args=(str(Path(model_path).resolve()), str(out.resolve()), threads),
                batch_size=1, num_cpus=threads, concurrency=(1, max(1, min(workers, len(todo))))).take_all()
            scored = sum(int(row["images"]) for row in written)
        else:
            scored = 0
        failed = _failed_rows(out)
    return {"images": len(paths), "chunks": len(chunks), "resumed_chunks": len(chunks) - len(todo), "scored_now": scored,
            "failed": failed}
