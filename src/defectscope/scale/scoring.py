"""`score`: batch scoring into a Parquet dataset, resumable, in this process or on Ray actors.

The images are split into fixed chunks; chunk i becomes the file `part-<i>.parquet`, written
atomically once the whole chunk is scored. A part file therefore exists only for a complete
chunk, so an interrupted run resumes with the chunks that have none (and scores again the chunks
holding an 'error' row, or an image whose content changed since: each row holds the sha256 of the
file it scored): no image is missing or scored twice. `_job.json` pins the model (by its
sha256) and the image list (resolved on the driver); a different job refuses the folder.
On Ray the driver alone touches files: it reads each chunk's images and sends their bytes, and writes
each part the actors send back; the model travels once through the object store. No node needs a
shared filesystem, the driver's working directory or its paths.
Read the result with `pyarrow.parquet.read_table(folder)` (or pandas, Polars, DuckDB, Spark).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from defectscope.data.decode import EncodedImage, ImageSource, expand_inputs
from defectscope.errors import DefectscopeError
from defectscope.files import (claim_folder, content_sha256, exclusive, json_text, loads_strict, read_regular,
                               scratch_folder, write_atomic)
from defectscope.jobs import RayCluster, check_cpus, connect_ray
from defectscope.names import RAY_WORKERS, as_text, check_threads
from defectscope.prediction import prediction_rows
from defectscope.progress import ProgressBar, no_progress

CHUNK_IMAGES = 256  # images per part file: one predict call, bounded memory
IN_FLIGHT = 2  # chunks out per Ray actor: one scored while the next travels
RETRIES = 3  # restarts of a Ray actor (a lost node), each sending its chunks again
RESEND_DELAY = 1.0  # seconds before a lost chunk is sent again (its actor is being started again)
JOB_FILE = "_job.json"  # Parquet readers skip names starting with '_' or '.'
LOCK_FILE = ".lock"  # held (flock) by the run writing into the folder
COLUMNS = ("path", "sha256", "score", "normalized", "verdict", "error")
MAX_LIST_BYTES = 1 << 30  # an image list: some ten million paths


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


def image_sha256(image: ImageSource) -> str | None:
    """The sha256 of an image file as it is now (of an image read as bytes: of those), or None when it cannot be read
    (its row is an 'error')."""
    if isinstance(image, EncodedImage):
        return hashlib.sha256(image.data).hexdigest() if image.data is not None else None
    try:
        return content_sha256(Path(image))
    except (DefectscopeError, OSError):
        return None


def chunk_table(model: Any, paths: Sequence[str], images: Sequence[ImageSource]) -> bytes:
    """One chunk scored: its rows (named by `paths`, with the sha256 of each image scored) as a Parquet file's
    bytes. A file is hashed just before its chunk is scored."""
    pyarrow = pyarrow_modules()
    digests = [image_sha256(image) for image in images]
    rows = prediction_rows([Path(p) for p in paths], model.predict(list(images), map_size="input", keep_going=True))
    for row, digest in zip(rows, digests):
        row["sha256"], row["path"] = digest, as_text(row["path"])  # a Parquet string is UTF-8
    table = pyarrow.table({column: [row.get(column) for row in rows] for column in COLUMNS},
                          schema=pyarrow.schema([("path", pyarrow.string()), ("sha256", pyarrow.string()),
                                                 ("score", pyarrow.float64()),
                                                 ("normalized", pyarrow.float64()), ("verdict", pyarrow.string()),
                                                 ("error", pyarrow.string())]))
    buffer = io.BytesIO()
    pyarrow.parquet.write_table(table, buffer)
    return buffer.getvalue()


def write_chunk(model: Any, out: Path, chunk: int, paths: Sequence[str]) -> int:
    """Score one chunk here and write its part file atomically; returns the number of images."""
    write_atomic(part_path(out, chunk), chunk_table(model, paths, paths))
    return len(paths)


class ChunkScorer:
    """A Ray actor: on its first chunk, rebuilds the model from its files' bytes (fetched from the object store) in a
    scratch folder of its own, removed once the model is loaded, then scores the chunks it is sent (images as bytes) on `threads` threads (the driver's
    count: convolution results depend on it in their last bits). It reads and writes nothing the driver has: the parts
    go back to the driver. Its constructor takes nothing from the object store, so an actor Ray starts again on
    another node fetches the model the same way."""

    def __init__(self, name: str, threads: int) -> None:
        self.name, self.threads, self.model = name, threads, None

    def score(self, chunk: int, images: list[EncodedImage], files: list[Any]) -> tuple[int, bytes]:
        """`files`: the model files' object reference, in a list so that Ray hands it over unresolved."""
        if self.model is None:
            self.model = self._load(files[0])
        return chunk, chunk_table(self.model, [image.path for image in images], images)

    def _load(self, files: Any) -> Any:
        import ray
        import torch

        from defectscope.predictor import load_predictor

        torch.set_num_threads(self.threads)
        with scratch_folder("score") as scratch:  # a loaded model keeps no file open
            for file_name, data in ray.get(files).items():
                (Path(scratch) / file_name).write_bytes(data)
            return load_predictor(Path(scratch) / self.name, threads=self.threads)


def _score_on_ray(ray_address: str | RayCluster, model: Any, model_path: Path, model_sha256: str, out: Path,
                  todo: list[tuple[int, list[str]]], workers: int, threads: int, advance: Callable[[int], None]) -> int:
    """Score the chunks `todo` on Ray actors; returns the images scored. The driver reads each chunk's images and
    writes each part that comes back, so no node needs this machine's files. At most IN_FLIGHT chunks per actor
    are out at once (bounded memory); an actor whose node is lost is started again and its chunks are sent again."""
    from defectscope.predictor import model_files

    ray = connect_ray(ray_address)
    check_cpus(ray, threads)
    files = ray.put(model_files(model_path, model, model_sha256))  # the model travels once, through the object store
    scorer = ray.remote(ChunkScorer).options(num_cpus=threads, max_restarts=RETRIES, max_task_retries=RETRIES)
    room = int(ray.cluster_resources().get("CPU", 0) // threads)  # actors the cluster can run at once now
    actors = [scorer.remote(model_path.name, threads) for _ in range(max(1, min(workers, len(todo), room)))]
    pending, out_now, scored = iter(todo), {}, 0
    lost: dict[int, int] = {}  # chunk -> times its actor was lost while it was out

    def send(actor: Any, job: tuple[int, list[str]] | None) -> None:
        if job is not None:
            chunk, paths = job
            out_now[actor.score.remote(chunk, [EncodedImage.read(path) for path in paths], [files])] = (actor, job)

    for actor in actors * IN_FLIGHT:
        send(actor, next(pending, None))
    while out_now:
        (ref,), _ = ray.wait(list(out_now), num_returns=1)
        actor, job = out_now.pop(ref)
        try:
            chunk, table = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # its node or process was lost: Ray starts it again
            lost[job[0]] = lost.get(job[0], 0) + 1
            if lost[job[0]] > RETRIES:
                raise DefectscopeError(f"chunk {job[0]} was lost {RETRIES + 1} times with its Ray actor: {exc}") from exc
            time.sleep(RESEND_DELAY)
            send(actor, job)  # the part is written only from a chunk that came back: never twice
            continue
        write_atomic(part_path(out, chunk), table)
        scored += len(job[1])
        advance(len(job[1]))
        send(actor, next(pending, None))
    return scored


def _inputs(inputs: Sequence[Path], skipped: list[Path]) -> list[str]:
    """Images and folders, or text files listing one image per line (blank lines and '#' comments skipped; a UTF-8
    byte-order mark, as Windows editors write, ignored; names in another encoding kept as their bytes, as file names
    are); the folders' files not named as images go into `skipped`."""
    listed: list[Path] = []
    for item in map(Path, inputs):
        if item.suffix == ".txt" and item.is_file():
            lines = read_regular(item, "image list", MAX_LIST_BYTES).decode("utf-8-sig", "surrogateescape").splitlines()
            listed += [item.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            listed.append(item)
    return [os.path.abspath(path) for path in expand_inputs(listed, skipped)]  # resolved here, on the driver


IDENTITY = ("model_sha256", "images", "images_sha256", "chunk_images")  # what makes two runs one job


def _same_job(path: Path, job: dict) -> bool:
    """Whether the job file at `path` is this job: the same model (by content, however its path is spelled), the same
    images in the same chunks."""
    try:
        recorded = loads_strict(read_regular(path, "job file", 1 << 20), str(path))
    except DefectscopeError:
        return False  # unreadable: another job
    return isinstance(recorded, dict) and all(recorded.get(key) == job[key] for key in IDENTITY)


def _column(part: Path, name: str) -> list[Any] | None:
    """A part file's column; None when it is missing or not a part file Parquet can read (then it is written again)."""
    pyarrow = pyarrow_modules()
    try:
        return pyarrow.parquet.read_table(part, columns=[name]).column(name).to_pylist()
    except (OSError, KeyError, pyarrow.ArrowException):
        return None


def _done(part: Path, paths: Sequence[str]) -> bool:
    """A chunk is done when its part file holds its rows, no 'error' row (those are scored again on resume), and
    each image's sha256 as the file is now (an image replaced since it was scored is scored again)."""
    verdicts = _column(part, "verdict") if part.is_file() else None
    if verdicts is None or "error" in verdicts:
        return False
    return _column(part, "sha256") == [image_sha256(path) for path in paths]


def _failed_rows(parts: Sequence[Path]) -> int:
    """Rows of the job's part files (resumed ones too) whose image could not be scored; only those files are read,
    whatever else lies in the folder."""
    verdicts = [_column(part, "verdict") for part in parts]
    missing = [part.name for part, read in zip(parts, verdicts) if read is None]
    if missing:
        raise DefectscopeError(f"part file(s) {', '.join(missing[:3])} could not be read back; run the job again")
    return sum(verdict == "error" for read in verdicts for verdict in read)


def score_to_parquet(model_path: Path, inputs: Sequence[Path], out: Path, ray_address: str | RayCluster | None = None,
                     workers: int | None = None, force: bool = False, chunk_images: int = CHUNK_IMAGES,
                     threads: int | None = None, bar: ProgressBar = no_progress) -> dict[str, Any]:
    """Score every image into the Parquet dataset `out`, continuing an interrupted run of the same job.

    The model is loaded (and so checked), and Ray connected, before the folder is touched; the folder is locked for
    the run.
    On Ray, up to `workers` actors (default RAY_WORKERS; as many as the cluster's CPUs hold at the start) each hold
    the model and `threads` CPUs (default: this process's torch threads, which gives bit-identical scores to
    scoring here); without Ray neither applies, and giving either is refused. `failed` counts the rows whose image
    could not be scored, `skipped` names the folders' files not named as images.
    """
    from defectscope.predictor import load_identified

    if ray_address is None and (workers is not None or threads is not None):
        raise DefectscopeError("--workers and --threads size the Ray actors: they apply with --ray only")
    check_threads(threads)
    pyarrow_modules()
    skipped: list[Path] = []
    paths = _inputs(inputs, skipped)
    if not paths:
        raise DefectscopeError("no images to score: the inputs list none")
    model, model_sha256, _ = load_identified(Path(model_path))  # a bad model is refused before anything is written
    if ray_address is not None:
        connect_ray(ray_address)  # and a cluster that is not there
    job = {"model": os.path.abspath(model_path), "model_sha256": model_sha256, "images": len(paths),
           "images_sha256": hashlib.sha256(as_text("\n".join(paths)).encode()).hexdigest(), "chunk_images": chunk_images}
    out = Path(out)
    existing = out / JOB_FILE
    if existing.is_file() and not _same_job(existing, job) and not force:
        raise DefectscopeError(f"{out} holds results of another scoring job (other model or images); "
                               "choose a new folder, or pass --force to start this job there")
    claim_folder(out, force, "score results")
    with exclusive(out / LOCK_FILE, f"another score job is writing into {out}; wait for it to finish, or choose another "
                   "folder (--force does not take a folder in use)", create=True):
        if existing.is_file() and not _same_job(existing, job):
            for stale in out.glob("part-*.parquet"):
                stale.unlink()
        write_atomic(existing, (json_text(job) + "\n").encode())
        chunks = [(i, paths[start : start + chunk_images]) for i, start in enumerate(range(0, len(paths), chunk_images))]
        todo = [(i, chunk) for i, chunk in chunks if not _done(part_path(out, i), chunk)]
        images = sum(len(chunk) for _, chunk in todo)
        with bar(f"scoring {images} images into {len(todo)} part file(s)", images) as advance:
            if ray_address is None:
                scored = 0
                for i, chunk in todo:
                    scored += write_chunk(model, out, i, chunk)
                    advance(len(chunk))
            elif todo:
                import torch

                scored = _score_on_ray(ray_address, model, Path(model_path), model_sha256, out, todo,
                                       workers or RAY_WORKERS, threads or torch.get_num_threads(), advance)
            else:
                scored = 0
        failed = _failed_rows([part_path(out, i) for i, _ in chunks])
    return {"images": len(paths), "chunks": len(chunks), "resumed_chunks": len(chunks) - len(todo), "scored_now": scored,
            "failed": failed, "skipped": [str(path) for path in skipped]}
