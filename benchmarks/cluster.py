"""The Scale section's cluster walk-through, run for real: `ray start` nodes, `fit-many` and `score` from a driver.

    python benchmarks/cluster.py --products ../shared/datasets/mvtec_ad/bottle ../shared/datasets/mvtec_3d_ad_rgb/tire \
        --images 10000

Starts a Ray cluster on this machine with `ray start`: a head without CPUs and two 1-CPU worker nodes,
each started in a folder of its own, after `ray get-auth-token --generate` (so they demand that token, as
Ray 2.60+ does whenever a token exists). The driver runs with another home folder, so it has the token
only through `--ray-token-file`. Its `--ray-env` installs in every worker
process a hook that refuses to open anything under the products' data or the driver's folder, so a node
sees the data only as the bytes the driver sends. Then, each as the CLI command a user types:

- `fit-many` of the products in this process and on the cluster (`--threads 1` both): wall time, and
  whether each model's tensors are identical;
- `score` of the first product's test images repeated to --images paths in this process (one thread)
  and on the cluster (2 actors x 1 thread), with one worker node killed (SIGKILL of its raylet) after
  a quarter of the parts and a new node started: rows lost, rows repeated, and rows that differ in
  any bit from this process's;
- `score` of 8 images on the cluster: Ray's fixed cost per run.

Every Ray process of the walk-through is stopped at the end (those whose command line names its folder).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from isolated import markdown_table, write_results  # noqa: I001  (benchmarks/isolated.py, beside this script)

PORT = 6390
HOOKS = Path(__file__).parents[1] / "tests"  # refuse_driver_files.py
COLUMNS = (("step", "step", "{}"), ("configuration", "configuration", "{}"), ("images", "images", "{}"),
           ("seconds", "wall s", "{:.1f}"), ("images_per_s", "images/s", "{:.1f}"), ("lost", "rows lost", "{}"),
           ("repeated", "rows repeated", "{}"), ("differ", "rows or models unlike in-process", "{}"),
           ("exit", "exit", "{}"))


def defectscope(*arguments: object, cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run the CLI as a user does; its wall time and result."""
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).with_name("defectscope")), *map(str, arguments)], cwd=cwd, env=env,
                            capture_output=True, text=True, check=False)
    return time.perf_counter() - start, result


def ray_start(folder: Path, env: dict[str, str], *arguments: str) -> set[int]:
    """`ray start` run in `folder`; the PIDs of the raylet it started."""
    before = _raylets()
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", *arguments, "--disable-usage-stats"],
                            cwd=folder, env=env, check=False, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"ray start {' '.join(arguments)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return _raylets() - before


def _processes(needle: bytes) -> set[int]:
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _raylets() -> set[int]:
    return {pid for pid in _processes(b"raylet") if b"/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def rows_of(table_folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(table_folder).to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=Path, nargs="+", required=True, help="Product folders (MVTec layout).")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from defectscope.artifacts import load_model

    scratch = Path(tempfile.mkdtemp(prefix="cluster-walk-"))
    home, driver, temp = scratch / "cluster-home", scratch / "driver", scratch / "ray"
    for folder in (home, driver, temp):
        folder.mkdir()
    products = [path.resolve() for path in args.products]
    base = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    cluster_env = {**base, "HOME": str(home), "RAY_AUTH_MODE": "token", "OMP_WAIT_POLICY": "PASSIVE"}
    driver_env = {**base, "HOME": str(driver), "OMP_NUM_THREADS": "1"}  # this process's scores: one thread, as the actors
    address = f"127.0.0.1:{PORT}"
    rows: list[dict] = []
    try:
        token = driver / "token"  # made on the head; its nodes find it in their home, the driver only in this file
        token.write_text(subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                                        env=cluster_env, check=True, capture_output=True, text=True).stdout)
        ray_start(scratch / "head", cluster_env, "--head", f"--port={PORT}", "--num-cpus=0", f"--temp-dir={temp}",
                  "--include-dashboard=false")
        nodes = [ray_start(scratch / f"node-{i}", cluster_env, f"--address={address}", "--num-cpus=1")
                 for i in (1, 2)]
        (driver / "env.yaml").write_text(yaml.safe_dump({
            "env_vars": {"PYTHONPATH": str(HOOKS), "DRIVER_ONLY": os.pathsep.join(map(str, [*products, driver]))},
            "worker_process_setup_hook": "refuse_driver_files.install"}))
        on_ray = ("--ray", address, "--ray-token-file", "token", "--ray-env", "env.yaml")

        plan = {"products": [{"name": path.name, "data": str(path)} for path in products]}
        fits = {}
        for name, extra in (("here", ()), ("cluster", on_ray)):
            (driver / name).mkdir()
            (driver / name / "plan.yaml").write_text(yaml.safe_dump(plan))
            seconds, result = defectscope("fit-many", f"{name}/plan.yaml", "--threads", "1", *extra, cwd=driver,
                                          env=driver_env)
            fits[name] = (seconds, result)
            print(f"fit-many ({name}): exit {result.returncode}, {seconds:.1f} s", flush=True)
            if result.returncode:
                sys.exit(f"fit-many ({name}) failed:\n{result.stdout}\n{result.stderr[-3000:]}")
        unlike = 0
        for path in products:
            here = load_model(driver / "here" / "models" / f"{path.name}.dsmodel").tensors()
            there = load_model(driver / "cluster" / "models" / f"{path.name}.dsmodel").tensors()
            unlike += not (here.keys() == there.keys() and all(here[k].equal(there[k]) for k in here))
        for name, configuration in (("here", "this process, 1 thread"),
                                    ("cluster", "2 nodes x 1 CPU, one task per product")):
            seconds, result = fits[name]
            rows.append({"step": "fit-many", "configuration": configuration, "images": None, "seconds": seconds,
                         "differ": f"{unlike} of {len(products)} models" if name == "cluster" else None,
                         "exit": result.returncode})

        model = driver / "cluster" / "models" / f"{products[0].name}.dsmodel"
        tests = sorted(str(p) for p in (products[0] / "test").rglob("*.png"))
        (driver / "images.txt").write_text("\n".join(tests[i % len(tests)] for i in range(args.images)) + "\n")
        # This process's scores of the same list: the same chunks and batches (an image's last bits depend on the
        # batch it is scored in), one thread as each actor.
        seconds, reference_run = defectscope("score", model, "images.txt", "--out", "reference", cwd=driver,
                                             env=driver_env)
        if reference_run.returncode:
            sys.exit(f"the reference scores failed: {reference_run.stderr}")
        reference = sorted(rows_of(driver / "reference"), key=lambda row: (row["path"], row["score"]))
        rows.append({"step": "score", "configuration": "this process, 1 thread", "images": args.images,
                     "seconds": seconds, "images_per_s": args.images / seconds, "exit": reference_run.returncode})

        killed = threading.Event()

        def kill_a_node() -> None:
            parts = max(1, args.images // 256 // 4)
            while len(list((driver / "scores").glob("part-*.parquet"))) < parts:
                time.sleep(0.2)
            for pid in nodes[0]:
                os.kill(pid, signal.SIGKILL)
            killed.set()
            ray_start(scratch / "node-3", cluster_env, f"--address={address}", "--num-cpus=1")

        killer = threading.Thread(target=kill_a_node, daemon=True)
        killer.start()
        seconds, result = defectscope("score", model, "images.txt", "--out", "scores", "--workers", "2", "--threads",
                                      "1", *on_ray, cwd=driver, env=driver_env)
        listed = collections.Counter((driver / "images.txt").read_text().split())
        table = rows_of(driver / "scores") if (driver / "scores").is_dir() else []
        written = collections.Counter(row["path"] for row in table)
        rows.append({"step": "score", "configuration": "2 actors x 1 thread, a node killed midway" if killed.is_set()
                     else "2 actors x 1 thread (the node kill came too late)", "images": args.images,
                     "seconds": seconds, "images_per_s": args.images / seconds,
                     "lost": sum((listed - written).values()), "repeated": sum((written - listed).values()),
                     "differ": sum(a != b for a, b in zip(sorted(table, key=lambda row: (row["path"], row["score"])),
                                                          reference)) if len(table) == len(reference) else "n/a",
                     "exit": result.returncode})
        (driver / "few.txt").write_text("\n".join(tests[:8]) + "\n")
        seconds, result = defectscope("score", model, "few.txt", "--out", "few", "--workers", "2", "--threads", "1",
                                      *on_ray, cwd=driver, env=driver_env)
        rows.append({"step": "score", "configuration": "8 images: Ray's fixed cost per run", "images": 8,
                     "seconds": seconds, "exit": result.returncode})
        seconds, no_token = defectscope("score", model, "few.txt", "--out", "no-token", "--ray", address, cwd=driver,
                                         env=driver_env)
        rows.append({"step": "score", "configuration": "8 images, without --ray-token-file", "seconds": seconds,
                     "exit": no_token.returncode})
        for row in rows:
            print(row, flush=True)
        stem = f"cluster-{products[0].name}"
        write_results(args.out, stem, rows, markdown_table(rows, COLUMNS))
        print("without a token:", no_token.stderr.strip().splitlines()[-1:])
    finally:
        for pid in _processes(str(temp).encode()) | _processes(str(scratch).encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
