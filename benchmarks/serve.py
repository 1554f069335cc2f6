"""Load test of `defectscope serve` on 127.0.0.1: throughput, latency and server memory, per engine, with and without
batching.

    python benchmarks/serve.py --data ../shared/datasets/mvtec_ad/bottle

Fits PatchCore on the category (or takes --model), measures the library's own batched images/s,
exports the model for each engine of --engines (onnxruntime, OpenVINO), then starts the server in a
subprocess for each engine and setting and sends the category's test images from 1, 4 and 16
concurrent clients: a fixed number of requests per run, each run stopped after --limit seconds at
most. Then the 16-client run of the model file and of each export again, --repeats times in turn with all their
servers up, so that the machine's drift falls on every engine alike: the p99 ratios from those medians. Ends with
a soak at 16 clients on the model file, sampling the server's resident memory.
Writes benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from isolated import write_results

from defectscope import load_dataset
from defectscope.artifacts import load_model, save_model
from defectscope.deployment import export_model
from defectscope.pipeline import fit_detector

BATCHING = ["--batch-wait-ms", "5"]
SETTINGS = {"dynamic batching (5 ms)": BATCHING,  # for the model file; the audit trail is on unless said
            "dynamic batching (5 ms), no audit trail": [*BATCHING, "--no-audit"], "no batching": ["--max-batch", "1"]}
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format -> engine


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user + system, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(model: Path, extra: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """`defectscope serve MODEL` on a free port of 127.0.0.1: (the server, its inspection URL); stopped at exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("defectscope")), "--quiet", "serve", str(model), "--port", str(port), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            server.kill()
            sys.exit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
        yield server, f"http://127.0.0.1:{port}/v1/models/{model.stem}/inspect"
    finally:
        server.terminate()
        server.wait(timeout=30)


def measured(server: subprocess.Popen, url: str, images: list[tuple[str, bytes]], clients: int, requests: int,
             limit: float) -> dict:
    """One load run against a server, with the server's CPU time over it."""
    cpu, start = cpu_seconds(server.pid), time.perf_counter()
    result = asyncio.run(load(url, images, clients, requests, limit))
    cpu, elapsed = cpu_seconds(server.pid) - cpu, time.perf_counter() - start
    return {"clients": clients, **result, "server_cpu_pct": cpu / elapsed * 100,
            "server_cpu_ms_per_image": cpu / max(1, result["requests"] - result["errors"]) * 1000}


def interleaved(served: dict[str, Path], images: list[tuple[str, bytes]], repeats: int, requests: int,
                limit: float) -> list[dict]:
    """The 16-client run of each engine's batching server, `repeats` rounds, every engine once a round."""
    with ExitStack() as stack:
        servers = {engine: stack.enter_context(serving(path, BATCHING)) for engine, path in served.items()}
        for server, url in servers.values():
            asyncio.run(load(url, images, 4, 16, limit))  # warmed up before the first round
        return [{"engine": engine, "repeat": repeat, **measured(server, url, images, 16, requests, limit)}
                for repeat in range(repeats) for engine, (server, url) in servers.items()]


def median_p99(rows: list[dict], engine: str) -> float:
    return float(np.median([r["p99_ms"] for r in rows if r["engine"] == engine]))


def rounds_text(rows: list[dict], engine: str) -> str:
    """An engine's p99 in each round, their median and its errors."""
    mine = [r for r in rows if r["engine"] == engine]
    each = ", ".join(f"{r['p99_ms']:.0f}" for r in mine)
    return f"{engine} p99 {each} ms (median {median_p99(rows, engine):.0f}; {sum(r['errors'] for r in mine)} errors)"


async def load(url: str, images: list[tuple[str, bytes]], clients: int, requests: int, limit: float) -> dict:
    """`requests` single-image inspections from `clients` concurrent clients; stops after `limit` seconds."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    deadline = time.monotonic() + limit

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for index in counter:
            if time.monotonic() > deadline:
                return
            name, data = images[index % len(images)]
            start = time.perf_counter()
            try:
                response = await http.post(url, files={"files": (name, data, "image/png")})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    done = np.array(latencies) * 1000
    return {"requests": len(done), "errors": errors, "images_per_s": (len(done) - errors) / elapsed,
            "p50_ms": float(np.percentile(done, 50)), "p95_ms": float(np.percentile(done, 95)),
            "p99_ms": float(np.percentile(done, 99))}


async def soak(url: str, images: list[tuple[str, bytes]], pid: int, seconds: float) -> list[float]:
    """16 clients for `seconds`, sampling the server's resident memory every 5 s."""
    samples = [rss_mb(pid)]
    task = asyncio.create_task(load(url, images, 16, 10**9, seconds))
    while not task.done():
        await asyncio.sleep(5)
        samples.append(rss_mb(pid))
    result = await task
    return samples, result


def library_rate(model: Path, paths: list[Path]) -> float:
    torch.set_num_threads(2)
    detector = load_model(model)
    detector.predict(paths[:4])
    start = time.perf_counter()
    detector.predict(paths)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--model", type=Path, help="A model file; default: fit PatchCore on --data.")
    parser.add_argument("--requests", type=int, default=160, help="Requests per run.")
    parser.add_argument("--limit", type=float, default=120, help="Seconds a run may take at most.")
    parser.add_argument("--soak", type=float, default=120, help="Seconds of the memory soak (0: none).")
    parser.add_argument("--engines", default="onnx,openvino", help="Export formats to serve beside the model file "
                        "(comma-separated; empty: the model file only).")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds of the interleaved 16-client runs (0: none).")
    parser.add_argument("--round-requests", type=int, default=480, help="Requests of each interleaved run: a p99 of "
                        "160 is the second-slowest request, of 480 the fifth.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    paths = [s.path for s in dataset.test]
    scratch = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        model = save_model(fit_detector(dataset, "patchcore", {})[0], Path(scratch.name) / "bench.dsmodel")
    reference = library_rate(model, paths)
    images = [(p.name, p.read_bytes()) for p in paths]
    runs = [("torch", label, model, extra) for label, extra in SETTINGS.items()]
    for file_format in filter(None, args.engines.split(",")):
        exported = export_model(model, Path(scratch.name) / f"{model.stem}-{file_format}.dsdeploy", file_format)[0]
        runs.insert(len(runs) - 1, (ENGINES[file_format], "dynamic batching (5 ms)", exported, BATCHING))
    rows, memory = [], {}
    for engine, label, served, extra in runs:
        with serving(served, extra) as (server, url):
            for clients in (1, 4, 16):
                rows.append({"engine": engine, "setting": label, **measured(server, url, images, clients, args.requests, args.limit),
                             "server_peak_mb": rss_mb(server.pid, "VmHWM")})
                rows[-1]["share_of_library"] = rows[-1]["images_per_s"] / reference
                print(rows[-1], flush=True)
            if engine == "torch" and label.startswith("dynamic") and args.soak:
                samples, result = asyncio.run(soak(url, images, server.pid, args.soak))
                memory = {"seconds": args.soak, "rss_mb": samples, "requests": result["requests"], "errors": result["errors"]}
    batching = {engine: served for engine, label, served, _ in runs if label == "dynamic batching (5 ms)"}
    rounds = interleaved(batching, images, args.repeats, args.round_requests, args.limit) if args.repeats else []
    header = ("| engine | setting | clients | requests | errors | images/s | share of library batched | p50 ms | p95 ms "
              "| p99 ms | server CPU % | server CPU ms/image | server peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {r['engine']} | {r['setting']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['images_per_s']:.1f} | "
        f"{r['share_of_library']:.0%} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
        f"{r['server_cpu_pct']:.0f} | {r['server_cpu_ms_per_image']:.0f} | {r['server_peak_mb']:.0f} |\n"
        for r in rows)
    loaded = [r for r in rows if r["clients"] == 16 and r["setting"] == "dynamic batching (5 ms)"]  # one per engine
    p99 = {r["engine"]: r["p99_ms"] for r in loaded}
    table += "".join(f"\np99 at 16 clients, {engine} against the model file: {p99['torch'] / value:.2f}x lower.\n"
                     for engine, value in p99.items() if engine != "torch")
    if rounds:
        table += (f"\nInterleaved, {args.repeats} rounds of 16 clients x {args.round_requests} requests on each engine's batching "
                  "server (all servers up, each engine once a round): "
                  + ", ".join(rounds_text(rounds, engine) for engine in batching) + ".\n")
        table += "".join(f"\nMedian p99 at 16 clients over the rounds, {engine} against the model file: "
                         f"{median_p99(rounds, 'torch') / median_p99(rounds, engine):.2f}x lower.\n"
                         for engine in batching if engine != "torch")
    cores = len(os.sched_getaffinity(0))
    table += "".join(f"\nAt 16 clients the {r['engine']} server spends {r['server_cpu_ms_per_image']:.0f} ms of CPU an image "
                     f"(decode, frame, model, HTTP): {cores} cores serve at most {cores * 1000 / r['server_cpu_ms_per_image']:.1f} "
                     "images/s.\n" for r in loaded)
    rate = {r["setting"]: r["images_per_s"] for r in rows if r["clients"] == 16 and r["engine"] == "torch"}
    without, with_audit = rate["dynamic batching (5 ms), no audit trail"], rate["dynamic batching (5 ms)"]
    table += (f"\nThe audit trail at 16 clients: {with_audit:.1f} images/s with it, {without:.1f} without: it changes the "
              f"time per image by {without / with_audit - 1:+.1%}.\n")
    table += f"\nLibrary batched (the model file's `predict` on all {len(paths)} test images, decode included): {reference:.1f} images/s.\n"
    if memory:
        rss = memory["rss_mb"]
        table += (f"\nSoak, 16 clients for {memory['seconds']:.0f} s ({memory['requests']} requests, {memory['errors']} errors): "
                  f"server RSS {rss[0]:.0f} MB at start, {rss[1]:.0f} MB after 5 s, {max(rss):.0f} MB peak, {rss[-1]:.0f} MB at the end.\n")
    write_results(args.out, "serve", rows + [{"soak": memory, "library_images_per_s": reference, "interleaved": rounds}], table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
