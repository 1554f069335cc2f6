"""Shared by the benchmark scripts: one measurement per fresh process, results written as JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from defectscope import __version__
from defectscope.process import worker_environment


def run_isolated(script: str, arguments: list[str], label: str) -> dict:
    """Run `script` with `arguments` in a new Python process (its peak memory is its own); its last line is JSON."""
    env = {**os.environ, **worker_environment()["env_vars"]}  # the thread and allocator policies the CLI sets
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        sys.exit(f"{label} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def frame_label(config: object) -> str:
    """A fitted model's frame as the tables print it: resize/crop, PatchCore's patch stride, "+ turns" with rotations."""
    crop = f"/{config.crop}" if config.crop else ""
    stride = f" s{config.patch_stride}" if hasattr(config, "patch_stride") else ""
    return f"{config.image_size}{crop}{stride}" + (" + turns" if getattr(config, "rotations", "off") == "on" else "")


def peak_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which after fork and exec is its own (ru_maxrss would
    still hold the parent's resident size at the fork when that was larger)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def markdown_table(rows: list[dict], columns: tuple[tuple[str, str, str], ...]) -> str:
    """A Markdown table of `rows` with (key, label, format) columns; 'n/a' where a value is missing."""
    lines = ["| " + " | ".join(label for _, label, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("n/a" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, stem: str, rows: list[dict], table: str) -> None:
    """benchmarks/results/<stem>.json (rows, command, machine, version) and <stem>.md (the table); prints the table."""
    import torch  # only here: the torch-free runtime's benchmark processes import this module too

    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])  # pastes back as run
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "version": __version__, "rows": rows}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(f"`{command}`\n\n{machine}, defectscope {__version__}\n\n{table}")
    print(table)


def keep_other_rows(out: Path, stem: str, rows: list[dict], key: tuple[str, ...], order: dict[str, list]) -> list[dict]:
    """`rows` merged into the rows of an earlier OUT/<stem>.json: earlier rows with the same `key` fields are
    replaced, the others kept and marked with the run that measured them; sorted by `order` (field -> values)."""
    run = shlex.join(sys.argv[1:]) or "(defaults)"
    new = [{**row, "run": run} for row in rows]
    measured = {tuple(row[k] for k in key) for row in new}
    kept = [{"run": "(an earlier run)", **row} for row in json.loads((out / f"{stem}.json").read_text())["rows"]
            if tuple(row[k] for k in key) not in measured]
    ranks = {field: {value: i for i, value in enumerate(values)} for field, values in order.items()}
    return sorted(kept + new, key=lambda row: tuple(rank.get(row[field], len(rank)) for field, rank in ranks.items()))


def runs_note(rows: list[dict]) -> str:
    """Which runs measured which rows, when they come from more than one."""
    runs = sorted({row.get("run", "") for row in rows})
    return "" if len(runs) < 2 else "Rows come from these runs of this script (`run` in the JSON): " + "; ".join(
        f"`{run}`" for run in runs) + ".\n\n"
