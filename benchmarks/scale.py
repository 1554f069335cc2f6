"""How PatchCore's fit grows with the number of training images, on bottle repeated with flips and rotations.

    python benchmarks/scale.py --data ../shared/datasets/mvtec_ad/bottle --factors 1 2 4 8
    python benchmarks/scale.py --generate uniform-texture --factors 1 2 4 8

The good training images are repeated with the 8 symmetries of the square (identity, flips, 90°
rotations; written once as PNG files to a temporary folder) to 1x, 2x, 4x and 8x their count. Each
size is fitted with default settings in its own process (so peak memory is its own; the frame is chosen
per size by the search, whose time is part of the fit's) and evaluated on the real test set. The final
fit's seconds are split into embedding (decoding and backbone, overlapped in a
thread pool; decoding alone is timed separately per image), coreset (the shards' choice and the
reduce over their union), index (k-means of the memory bank) and calibration (cross-fitted scores). Writes benchmarks/results/scale.{json,md}.
With --generate uniform-texture the training images are 209 x factor generated near-uniform
images with fine noise (benchmarks/generated.py: every patch about equally far from every other,
where pruning cannot help) and there is no test set: fit cost and memory only (scale-<kind>.*).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from defectscope import load_dataset
from defectscope.data.decode import read_image
from defectscope.data.layout import Dataset, Sample
from defectscope.pipeline import evaluate_model, fit_detector

from generated import KINDS, write_category  # noqa: E402  (benchmarks/generated.py, beside this script)
from isolated import frame_label, peak_mb, run_isolated, write_results  # noqa: E402  (benchmarks/isolated.py, beside this script)

BASE_IMAGES = 209  # generated training images per factor: as many as bottle's

SYMMETRIES = (
    lambda im: im, lambda im: im[:, ::-1], lambda im: im[::-1], lambda im: np.rot90(im, 1),
    lambda im: np.rot90(im, 2), lambda im: np.rot90(im, 3), lambda im: np.rot90(im[:, ::-1], 1),
    lambda im: np.rot90(im[:, ::-1], 3),
)
COLUMNS = (
    ("factor", "x", "{}"), ("train_images", "train images", "{}"), ("frame", "frame chosen", "{}"),
    ("fit_s", "fit s (search included)", "{:.1f}"),
    ("embed_s", "embed s", "{:.1f}"), ("decode_s", "of which decode s", "{:.1f}"), ("coreset_s", "coreset s", "{:.1f}"),
    ("index_s", "index s", "{:.1f}"), ("calibrate_s", "calibration s", "{:.1f}"), ("memory_bank", "memory rows", "{}"),
    ("peak_mb", "peak MB", "{:.0f}"), ("image_auroc", "image AUROC", "{:.3f}"), ("pixel_auroc", "pixel AUROC", "{:.3f}"),
    ("aupro", "AUPRO", "{:.3f}"), ("ms_batched", "ms/img batched", "{:.0f}"),
)


def write_variants(data: Path, folder: Path, factor: int) -> list[Path]:
    """The training images under the first `factor` symmetries, as PNG files in `folder` (identity: the originals)."""
    originals = [s.path for s in load_dataset(data).train]
    paths = list(originals)
    for number in range(1, factor):
        for source in originals:
            target = folder / f"s{number}_{source.name}"
            if not target.exists():
                image = np.ascontiguousarray(SYMMETRIES[number](cv2.imread(str(source), cv2.IMREAD_UNCHANGED)))
                cv2.imwrite(str(target), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            paths.append(target)
    return paths


def measure(data: Path, train: list[Path]) -> dict:
    """Fit PatchCore on `train`, evaluate on the test split if it holds defects, and time each part (in its own process)."""
    torch.set_num_threads(2)
    real = load_dataset(data)
    dataset = Dataset(real.root, real.layout, [*real.test, *[Sample(path, "train", 0, "good") for path in train]])
    start = time.perf_counter()
    detector, report = fit_detector(dataset, "patchcore", {})
    fit_s = time.perf_counter() - start
    defects = any(s.label for s in real.test)
    metrics = evaluate_model(detector, dataset)[0].metrics if defects else {}
    sample = train[:: max(1, len(train) // 40)]
    start = time.perf_counter()
    for path in sample:
        read_image(path)
    decode_s = (time.perf_counter() - start) / len(sample) * len(train)
    seconds = report.details["seconds"]
    return {
        "train_images": len(train), "fit_s": fit_s,
        "frame": frame_label(detector.config),
        "embed_s": seconds["embed"], "decode_s": decode_s,
        "coreset_s": report.details["shard_coreset_s"] + report.details["reduce_s"], "index_s": report.details["index_s"],
        "calibrate_s": seconds["calibrate"],
        "memory_bank": report.details["memory_bank"], "peak_mb": peak_mb(),
        **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
        "ms_batched": metrics.get("predict_ms_per_image"),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("n/a" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], choices=range(1, 9))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--generate", choices=KINDS, help="Train on this generated kind of image instead of --data.")
    parser.add_argument("--single", nargs=2, metavar=("FOLDER", "FACTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        folder, factor = Path(args.single[0]), int(args.single[1])
        train = (sorted((args.data / "train" / "good").glob("*.png"))[: BASE_IMAGES * factor] if args.generate
                 else write_variants(args.data, folder, factor))
        print(json.dumps({"factor": factor, **measure(args.data, train)}))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = args.data
        if args.generate:
            data = write_category(args.generate, Path(folder), BASE_IMAGES * max(args.factors), 2)
        else:
            write_variants(data, Path(folder), max(args.factors))
        for factor in args.factors:
            arguments = ["--data", str(data), "--single", folder, str(factor), *(["--generate", args.generate] if args.generate else [])]
            rows.append(run_isolated(__file__, arguments, f"factor {factor}"))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    write_results(args.out, f"scale-{args.generate}" if args.generate else "scale", rows, table)


if __name__ == "__main__":
    main()
