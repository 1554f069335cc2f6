"""Deployment benchmark: PyTorch vs the exported model on onnxruntime and OpenVINO, on a real category.

    python benchmarks/deploy.py --data ../shared/datasets/mvtec_ad/bottle --generate gray-large uniform-texture

Fits PatchCore and PaDiM (default settings), exports each to ONNX and OpenVINO IR, and builds
one fresh virtual environment per runtime with only what the runtime needs (defectscope without
its dependencies, the engine, NumPy, Pillow, safetensors, threadpoolctl: no torch, no OpenCV, no pip). Every (model, engine)
then runs in its own process (the runtimes inside their torch-free environments) on the test
images, decode included, 2 threads: ms/image at batch 1 and batched (median of 3 passes), peak memory, and the scores,
maps and verdicts, which the parent compares with PyTorch's (parity). Install size is the size of
each environment on disk (PyTorch: the packages defectscope's default install pulls in).
--generate adds seeded categories of other kinds of image (benchmarks/generated.py), PatchCore only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from isolated import markdown_table, peak_mb, write_results  # noqa: I001  (benchmarks/isolated.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino"]}
COMMON_PACKAGES = ["numpy", "pillow", "safetensors", "threadpoolctl"]
FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}
GENERATED_TRAIN, GENERATED_TEST = 60, 40
REPEATS = 3
COLUMNS = (("data", "data", "{}"), ("model", "model", "{}"), ("engine", "engine", "{}"), ("ms_batch1", "ms/img batch 1", "{:.1f}"),
           ("ms_batched", "ms/img batch 32", "{:.1f}"), ("speedup_batch1", "batch-1 speed-up vs PyTorch", "{:.2f}x"),
           ("ms_decode", "decode ms/img", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}"), ("model_mb", "model files MB", "{:.1f}"), ("install_mb", "install MB", "{:.0f}"),
           ("max_score_rel", "max score rel. diff", "{:.1e}"), ("max_map_diff", "max map diff / range", "{:.1e}"),
           ("verdicts_same", "same verdicts", "{}"))


def measure(model_path: Path, engine: str, data: Path, out: Path) -> dict:
    """Time one engine on the test images (run inside its own process); scores, maps and verdicts go to `out`."""
    paths = sorted(str(p) for p in (data / "test").rglob("*.png"))
    if engine == "pytorch":
        import defectscope.artifacts  # noqa: I001  (before torch: the package sets torch's thread policy)
        import torch

        torch.set_num_threads(2)
        model = defectscope.artifacts.load_model(model_path)
        set_batch = lambda size: setattr(model.config, "batch_size", size)  # noqa: E731
    else:
        from defectscope.runtime import DeployedModel

        model = DeployedModel(model_path, threads=2)
        set_batch = lambda size: setattr(model, "batch_size", size)  # noqa: E731
    set_batch(32)
    model.predict(paths[:4], map_size="input")  # warm-up
    batched, batch1, single = [], [], paths[:20]
    for _ in range(REPEATS):  # the median of a few passes: this machine's neighbours come and go
        set_batch(32)
        start = time.perf_counter()
        prediction = model.predict(paths, map_size="input")
        batched.append((time.perf_counter() - start) / len(paths) * 1000)
        set_batch(1)
        start = time.perf_counter()
        model.predict(single, map_size="input")
        batch1.append((time.perf_counter() - start) / len(single) * 1000)
    batched, batch1 = float(np.median(batched)), float(np.median(batch1))
    np.savez(out, scores=prediction.scores, maps=np.stack(prediction.maps), verdicts=np.array(prediction.verdicts))
    from defectscope.data.decode import read_image

    start = time.perf_counter()
    for path in single:
        read_image(path)
    decode = (time.perf_counter() - start) / len(single) * 1000
    return {"ms_batched": batched, "ms_batch1": batch1, "ms_decode": decode, "images": len(paths),
            "peak_mb": peak_mb(), "torch_loaded": "torch" in sys.modules}


def prepare(data: Path, model: str, folder: Path, engines: list[str]) -> dict:
    """Fit the model and export it for each engine (run in its own process, so the parent stays idle and small)."""
    from defectscope.deployment import export_model
    from defectscope.pipeline import fit_model

    model_path = folder / f"{data.name}-{model}.dsmodel"
    fit_model(data, model, {}, model_path)
    exports = {engine: [str(p) for p in export_model(model_path, folder / f"{data.name}-{model}-{engine}.dsdeploy",
                                                      FORMATS[engine])] for engine in engines}
    return {"model": str(model_path), "exports": exports}


def runtime_environment(engine: str, folder: Path) -> tuple[Path, float]:
    """A new venv (without pip: this pip installs into it) with defectscope (no dependencies) and only the
    runtime's packages; its python and size in MB."""
    venv = folder / f"venv-{engine}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    subprocess.run([*pip, *RUNTIME_PACKAGES[engine], *COMMON_PACKAGES], check=True)
    return python, _size_mb(venv)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def torch_install_mb() -> float:
    """Size of the packages a default `pip install defectscope` brings (from their installed file lists)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    seen, todo, total = set(), ["defectscope"], 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = distribution(name)
        total += sum((dist.locate_file(f).stat().st_size for f in dist.files or [] if dist.locate_file(f).is_file()), 0)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return total / 2**20


def run(python: Path | str, *arguments: str) -> dict:
    """This script in a new process (a runtime's own environment, or this one); its last line is JSON."""
    result = subprocess.run([str(python), __file__, *arguments], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": ""})
    if result.returncode:
        sys.exit(f"{' '.join(arguments)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parity(reference: Path, other: Path) -> dict:
    a, b = np.load(reference), np.load(other)
    spans = a["maps"].max(axis=(1, 2)) - a["maps"].min(axis=(1, 2))
    return {"max_score_rel": float(np.max(np.abs(b["scores"] - a["scores"]) / np.abs(a["scores"]))),
            "max_map_diff": float(np.max(np.abs(b["maps"] - a["maps"]).max(axis=(1, 2)) / spans)),
            "verdicts_same": f"{int((a['verdicts'] == b['verdicts']).sum())}/{len(a['verdicts'])}"}


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--generate", nargs="*", default=[], metavar="KIND", help="kinds of benchmarks/generated.py")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--single", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=3, metavar=("DATA", "MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(Path(args.single[0]), args.single[1], args.data, args.npz)))
        return
    if args.prepare:
        print(json.dumps(prepare(Path(args.prepare[0]), args.prepare[1], Path(args.prepare[2]), args.engines)))
        return
    from generated import KINDS, write_category  # here: the runtimes' environments (the branches above) have no OpenCV

    if set(args.generate) - set(KINDS):
        parser.error(f"--generate takes kinds among {', '.join(KINDS)}")
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"{args.data} is not a category folder (no train/good)")
    scratch = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    try:
        environments = {engine: runtime_environment(engine, scratch) for engine in args.engines}
        rows = []
        plan = [(args.data, model) for model in args.models]
        plan += [(write_category(kind, scratch / "data", GENERATED_TRAIN, GENERATED_TEST), "patchcore")
                 for kind in args.generate]
        for data, model in plan:
            prepared = run(sys.executable, "--prepare", str(data), model, str(scratch), "--engines", *args.engines)
            model_path = Path(prepared["model"])
            reference = scratch / f"{data.name}-{model}-pytorch.npz"
            row = {"data": data.name, "model": model, "engine": "pytorch",
                   **run(sys.executable, "--single", str(model_path), "pytorch", "--data", str(data), "--npz", str(reference)),
                   "model_mb": model_path.stat().st_size / 2**20, "install_mb": torch_install_mb()}
            rows.append(row)
            for engine in args.engines:
                exported = [Path(p) for p in prepared["exports"][engine]]
                python, install_mb = environments[engine]
                npz = scratch / f"{data.name}-{model}-{engine}.npz"
                measured = run(python, "--single", str(exported[0]), engine, "--data", str(data), "--npz", str(npz))
                rows.append({"data": data.name, "model": model, "engine": engine, **measured, **parity(reference, npz),
                             "speedup_batch1": row["ms_batch1"] / measured["ms_batch1"],
                             "model_mb": sum(p.stat().st_size for p in exported) / 2**20, "install_mb": install_mb})
            print(markdown(rows[-1 - len(args.engines):]), flush=True)
        write_results(args.out, f"deploy-{args.data.name}", rows, markdown(rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
