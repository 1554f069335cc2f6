"""The hot folder under a steady camera: drop-to-message latency, exactly-once across a kill -9, and nothing lost.

    python benchmarks/line.py --data ../shared/datasets/mvtec_ad/bottle

Fits PatchCore on the category (or takes --model), exports it for each of --engines, and for the
model file and each export starts a Mosquitto broker on 127.0.0.1 and `defectscope watch` with MQTT
dispatch, then drops --images
copies of the category's test images into the hot folder at --rate images per second (each written
under a temporary name, then renamed, as a camera does). Midway it kills the watcher with SIGKILL and
starts it again. At the end every image must be in exactly one verdict folder with one audit record
and at least one MQTT message; the table gives the counts, the repeats the restart caused, and the
latency from drop to message. Writes benchmarks/results/line.json and line.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from isolated import markdown_table, write_results

from defectscope import load_dataset
from defectscope.artifacts import save_model
from defectscope.deployment import export_model
from defectscope.line.audit import AuditLog
from defectscope.pipeline import fit_detector

TOPIC = "bench/verdicts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return broker, port
        except OSError:
            time.sleep(0.05)
    sys.exit("mosquitto did not start")


def run_line(model: Path, sources: list[Path], args: argparse.Namespace, scratch: Path) -> dict:
    """One hot-folder run of `model`: drop, kill -9 midway, restart, drain; the counts and latencies."""
    folders = {name: scratch / name for name in ("in", "good", "defective", "error")}
    folders["in"].mkdir(parents=True)
    broker, port = start_broker(scratch)
    received: dict[str, list[float]] = {}
    subscribed = threading.Event()
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    listener.on_subscribe = lambda *_args: subscribed.set()
    listener.on_message = lambda _c, _d, message: received.setdefault(json.loads(message.payload)["image_name"], []).append(
        time.monotonic())
    listener.connect("127.0.0.1", port)
    listener.subscribe(TOPIC, qos=1)
    listener.loop_start()
    subscribed.wait(10)
    command = [str(Path(sys.executable).with_name("defectscope")), "--quiet", "watch", str(model), str(folders["in"]),
               "--good-dir", str(folders["good"]), "--defective-dir", str(folders["defective"]),
               "--error-dir", str(folders["error"]), "--audit", str(scratch / "audit.sqlite"), "--settle", "0.2",
               "--mqtt", f"127.0.0.1:{port}", "--mqtt-topic", TOPIC]
    watcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(5)  # the watcher loads its model
    dropped: dict[str, float] = {}
    start, killed_at = time.monotonic(), None
    for i in range(args.images):
        source = sources[i % len(sources)]
        name = f"{i:05d}-{source.parent.name}-{source.name}"
        time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        shutil.copy(source, folders["in"] / f"{name}.tmp")
        os.replace(folders["in"] / f"{name}.tmp", folders["in"] / name)
        dropped[name] = time.monotonic()
        if i == args.images // 2:
            watcher.send_signal(signal.SIGKILL)
            watcher.wait()
            killed_at = i
            watcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + args.drain
    while len(received) < len(dropped) and time.monotonic() < deadline:
        time.sleep(0.2)
    watcher.send_signal(signal.SIGTERM)
    watcher.wait(timeout=60)
    listener.loop_stop()
    broker.terminate()
    placed: dict[str, list[str]] = {}
    for kind in ("in", "good", "defective", "error"):
        for path in folders[kind].iterdir():
            placed.setdefault(path.name, []).append(kind)
    log, names = AuditLog(scratch / "audit.sqlite"), []
    while page := log.query(limit=1000, offset=len(names)):
        names += [r["image_name"] for r in page]
    counts = {name: names.count(name) for name in dropped}
    latency = np.array([received[name][0] - dropped[name] for name in dropped if name in received]) * 1000
    return {
        "model": model.name, "images": len(dropped), "rate": args.rate, "killed_after": killed_at,
        "in_one_verdict_folder": sum(len(placed.get(n, [])) == 1 and placed[n][0] != "in" for n in dropped),
        "left_in_inbox": sum("in" in placed.get(n, []) for n in dropped),
        "audit_records": len(names), "images_with_one_record": sum(c == 1 for c in counts.values()),
        "images_with_a_message": sum(n in received for n in dropped),
        "repeated_messages": sum(len(v) - 1 for v in received.values()),
        "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
        "p99_ms": float(np.percentile(latency, 99)), "max_ms": float(latency.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--model", type=Path, help="A model file; default: fit PatchCore on --data.")
    parser.add_argument("--engines", default="openvino", help="Export formats run beside the model file (comma-separated).")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="Images dropped per second.")
    parser.add_argument("--drain", type=float, default=180, help="Seconds to wait for the last messages at most.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    folder = tempfile.TemporaryDirectory()  # removed at exit, also when a run fails
    scratch = Path(folder.name)
    dataset = load_dataset(args.data)
    model = args.model or save_model(fit_detector(dataset, "patchcore", {})[0], scratch / "bench.dsmodel")
    models = [model] + [export_model(model, scratch / f"bench-{engine}.dsdeploy", engine)[0]
                        for engine in filter(None, args.engines.split(","))]
    rows = []
    for number, served in enumerate(models):
        rows.append(run_line(served, [s.path for s in dataset.test], args, scratch / f"run{number}"))
        print(rows[-1], flush=True)
    table = markdown_table(rows, (
        ("model", "model", "{}"), ("images", "images dropped", "{}"), ("rate", "per s", "{:g}"),
        ("killed_after", "kill -9 after image", "{}"), ("in_one_verdict_folder", "in exactly one verdict folder", "{}"),
        ("left_in_inbox", "left in the inbox", "{}"), ("audit_records", "audit records", "{}"),
        ("images_with_one_record", "images with one record", "{}"),
        ("images_with_a_message", "images with an MQTT message", "{}"), ("repeated_messages", "repeated messages", "{}"),
        ("p50_ms", "drop to message p50 ms", "{:.0f}"), ("p95_ms", "p95 ms", "{:.0f}"), ("p99_ms", "p99 ms", "{:.0f}"),
        ("max_ms", "max ms", "{:.0f}")))
    table += ("\nPatchCore fitted on the category with its defaults (the model file, then its exports). Each run kills the "
              "watcher with SIGKILL after the middle image was dropped and starts it again at once; latency counts "
              "the first message of each image, from the rename into the hot folder.\n")
    write_results(args.out, "line", rows, table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
