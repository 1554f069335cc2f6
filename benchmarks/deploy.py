"""Deployment benchmark: PyTorch vs the exported model on onnxruntime and OpenVINO, on a real category.

    python benchmarks/deploy.py --data ../shared/datasets/mvtec_ad/bottle --generate gray-large uniform-texture

Fits PatchCore and PaDiM (default settings), exports each to ONNX and OpenVINO IR, and builds
one fresh virtual environment per runtime with only what the runtime needs (defectscope without
its dependencies, the engine, NumPy, OpenCV, Pillow, safetensors: no torch). Every (model, engine)
then runs in its own process (the runtimes inside their torch-free environments) on the test
images, decode included, 2 threads: ms/image at batch 1 and batched, peak memory, and the scores,
maps and verdicts, which the parent compares with PyTorch's (parity). Install size is the size of
each environment on disk (PyTorch: the packages defectscope's default install pulls in).
--generate adds seeded categories of other kinds of image, PatchCore only: `gray-large` (1024x1024
grayscale PNGs with sensor noise) and `uniform-texture` (600x800 RGB near-uniform rubber with fine
noise: every patch about equally far from every other, the nearest-neighbour search's worst case).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino"]}
COMMON_PACKAGES = ["numpy", "opencv-python-headless", "pillow", "safetensors", "threadpoolctl"]
FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}
GENERATED_TRAIN, GENERATED_TEST = 60, 40
COLUMNS = (("data", "data", "{}"), ("model", "model", "{}"), ("engine", "engine", "{}"), ("ms_batch1", "ms/img batch 1", "{:.1f}"),
           ("ms_batched", "ms/img batch 32", "{:.1f}"), ("speedup_batch1", "batch-1 speed-up vs PyTorch", "{:.2f}x"),
           ("ms_decode", "decode ms/img", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}"), ("model_mb", "model files MB", "{:.1f}"), ("install_mb", "install MB", "{:.0f}"),
           ("max_score_rel", "max score rel. diff", "{:.1e}"), ("max_map_diff", "max map diff / range", "{:.1e}"),
           ("verdicts_same", "same verdicts", "{}"))


def generate(kind: str, root: Path) -> Path:
    """A seeded category of GENERATED_TRAIN good training and GENERATED_TEST good test images of one kind."""
    import cv2

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024]
    dome = 90 + 40 * np.exp(-((yy - 512) ** 2 + (xx - 512) ** 2) / (2 * 260**2))
    for split, count in (("train", GENERATED_TRAIN), ("test", GENERATED_TEST)):
        folder = root / kind / split / "good"
        folder.mkdir(parents=True)
        for i in range(count):
            if kind == "gray-large":
                image = dome + rng.normal(0, 6, dome.shape)
                cv2.circle(image, (512 + int(rng.integers(-8, 8)), 512), 300, 150, 6)
            else:
                grain = cv2.GaussianBlur(rng.normal(0, 1, (600, 800, 3)), (0, 0), 1.2)
                image = 60 + 6 * grain + rng.normal(0, 2, (600, 800, 3))
            cv2.imwrite(str(folder / f"{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    return root / kind


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
    start = time.perf_counter()
    prediction = model.predict(paths, map_size="input")
    batched = (time.perf_counter() - start) / len(paths) * 1000
    set_batch(1)
    single = paths[:20]
    start = time.perf_counter()
    model.predict(single, map_size="input")
    batch1 = (time.perf_counter() - start) / len(single) * 1000
    np.savez(out, scores=prediction.scores, maps=np.stack(prediction.maps), verdicts=np.array(prediction.verdicts))
    from defectscope.data.decode import read_image

    start = time.perf_counter()
    for path in single:
        read_image(path)
    decode = (time.perf_counter() - start) / len(single) * 1000
    return {"ms_batched": batched, "ms_batch1": batch1, "ms_decode": decode, "images": len(paths),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_loaded": "torch" in sys.modules}


def runtime_environment(engine: str, folder: Path) -> tuple[Path, float]:
    """A new venv with defectscope (no dependencies) and only the runtime's packages; its python and size in MB."""
    venv = folder / f"venv-{engine}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
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


def run(python: Path | str, model_path: Path, engine: str, data: Path, out: Path) -> dict:
    result = subprocess.run([str(python), __file__, "--single", str(model_path), engine, "--data", str(data), "--npz", str(out)],
                            capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode:
        sys.exit(f"{model_path.name} on {engine} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parity(reference: Path, other: Path) -> dict:
    a, b = np.load(reference), np.load(other)
    spans = a["maps"].max(axis=(1, 2)) - a["maps"].min(axis=(1, 2))
    return {"max_score_rel": float(np.max(np.abs(b["scores"] - a["scores"]) / np.abs(a["scores"]))),
            "max_map_diff": float(np.max(np.abs(b["maps"] - a["maps"]).max(axis=(1, 2)) / spans)),
            "verdicts_same": f"{int((a['verdicts'] == b['verdicts']).sum())}/{len(a['verdicts'])}"}


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("n/a" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--generate", nargs="*", default=[], choices=["gray-large", "uniform-texture"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--single", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(Path(args.single[0]), args.single[1], args.data, args.npz)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from isolated import write_results

    from defectscope.data.layout import load_dataset
    from defectscope.deployment import export_model
    from defectscope.pipeline import fit_model

    load_dataset(args.data)  # bad data stops here, before any environment is built
    scratch = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    try:
        environments = {engine: runtime_environment(engine, scratch) for engine in args.engines}
        rows = []
        plan = [(args.data, model) for model in args.models]
        plan += [(generate(kind, scratch / "data"), "patchcore") for kind in args.generate]
        for data, model in plan:
            model_path = scratch / f"{data.name}-{model}.dsmodel"
            fit_model(data, model, {}, model_path)
            reference = scratch / f"{data.name}-{model}-pytorch.npz"
            row = {"data": data.name, "model": model, "engine": "pytorch",
                   **run(sys.executable, model_path, "pytorch", data, reference),
                   "model_mb": model_path.stat().st_size / 2**20, "install_mb": torch_install_mb()}
            rows.append(row)
            for engine in args.engines:
                exported = export_model(model_path, scratch / f"{data.name}-{model}-{engine}.dsdeploy", FORMATS[engine])
                python, install_mb = environments[engine]
                npz = scratch / f"{data.name}-{model}-{engine}.npz"
                measured = run(python, exported[0], engine, data, npz)
                rows.append({"data": data.name, "model": model, "engine": engine, **measured, **parity(reference, npz),
                             "speedup_batch1": row["ms_batch1"] / measured["ms_batch1"],
                             "model_mb": sum(p.stat().st_size for p in exported) / 2**20, "install_mb": install_mb})
            print(markdown(rows[-1 - len(args.engines):]), flush=True)
        write_results(args.out, f"deploy-{args.data.name}", rows, markdown(rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
