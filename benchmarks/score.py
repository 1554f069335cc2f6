"""Batch scoring throughput: `defectscope score` in this process vs on a local Ray instance with 1 and 2 workers.

    python benchmarks/score.py --data ../shared/datasets/mvtec_ad/bottle --images 10000

Fits default PatchCore on the category's training images, lists its test images repeated to
--images paths, and scores them into Parquet with each configuration, each in its own process:
images/s, wall seconds, and peak memory of the driver and (on Ray) of the busiest worker. Every
run's Parquet output is checked complete (each listed image exactly once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from isolated import markdown_table, peak_mb, run_isolated, write_results  # noqa: I001  (benchmarks/isolated.py, beside this script)

CONFIGS = {"in-process": (None, None, None), "ray, 1 worker x 2 threads": ("local", 1, 2),
           "ray, 2 workers x 1 thread": ("local", 2, 1)}
COLUMNS = (("config", "configuration", "{}"), ("images", "images", "{}"), ("seconds", "wall s", "{:.0f}"),
           ("images_per_s", "images/s", "{:.1f}"), ("driver_peak_mb", "driver peak MB", "{:.0f}"),
           ("worker_peak_mb", "worker peak MB (max)", "{:.0f}"))


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _ray_workers() -> list[int]:
    """PIDs of Ray worker processes on this machine."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = status.read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray::" in command or b"default_worker.py" in command:
            pids.append(int(status.parent.name))
    return pids


def measure(model: Path, listing: Path, out: Path, config: str) -> dict:
    """Run one configuration (inside its own process) and sample worker memory while it runs."""
    import torch

    from defectscope.scale.scoring import score_to_parquet

    torch.set_num_threads(2)
    address, workers, threads = CONFIGS[config]
    peak = {"worker": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak["worker"] = max([peak["worker"], *(_rss_mb(pid) for pid in _ray_workers())])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = score_to_parquet(model, [listing], out, ray_address=address, workers=workers, threads=threads)
    seconds = time.perf_counter() - start
    done.set()
    import pyarrow.parquet as pq

    written = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    listed = [line for line in listing.read_text().splitlines() if line]
    if sorted(written) != sorted(listed):
        raise SystemExit(f"{config}: the output does not hold each listed image exactly once")
    return {"config": config, "images": summary["images"], "seconds": seconds, "images_per_s": summary["images"] / seconds,
            "driver_peak_mb": peak_mb(), "worker_peak_mb": peak["worker"] if address else None}


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--single", nargs=4, metavar=("MODEL", "LISTING", "OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        model, listing, out, config = args.single
        print(json.dumps(measure(Path(model), Path(listing), Path(out), config)))
        return
    from defectscope.pipeline import fit_model

    scratch = Path(tempfile.mkdtemp(prefix="score-bench-"))
    model = fit_model(args.data, "patchcore", {}, scratch / "model.dsmodel").path
    tests = sorted(str(p.resolve()) for p in (args.data / "test").rglob("*.png"))
    listing = scratch / "images.txt"
    listing.write_text("\n".join(tests[i % len(tests)] for i in range(args.images)) + "\n")
    rows = []
    for number, config in enumerate(args.configs):
        rows.append(run_isolated(__file__, ["--single", str(model), str(listing), str(scratch / f"out-{number}"), config],
                                 config))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    write_results(args.out, f"score-{args.data.name}", rows, markdown(rows))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
