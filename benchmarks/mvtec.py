"""Benchmark detectors on MVTec-layout categories: accuracy, the operating point, fit time, inference time, memory.

    python benchmarks/mvtec.py --root ../shared/datasets/mvtec_ad --categories bottle ../mvtec_3d_ad_rgb/tire
    python benchmarks/mvtec.py --generate rotated-parts --models patchcore padim
    python benchmarks/mvtec.py --logical --models patchcore "patchcore global_view=off"

A category is a folder name under --root (or a path relative to it); --generate adds generated
categories by name (`benchmarks/generated.py`: rotated-parts, the seeded demo category of textured
round parts at random rotations, 200 good training images; fine-defects; logical-parts), written to a
temporary folder (--seeds draws them at other seeds too: `logical-parts-seed2`). Each (category, model) runs in a fresh subprocess so its
peak resident memory is its own. Inference is timed on the test images with decoding included, at
batch 1 and batched (the model's own batch size: 16 images for PatchCore, 32 for the others); maps
are produced in the model frame. At the model's own threshold (from good images only): the
false-alarm rate on the good test images, the recall on the defective ones, and the calibration bias
(mean cross-fitted good score minus mean good test score, in units of the good test scores' standard
deviation). The frame, global-view and place-view columns say what each fit chose (PatchCore's search, its
"auto" global view, and whether it had the good images for a place view) or was given. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectscope import load_dataset
from defectscope.data.decode import read_image
from defectscope.pipeline import evaluate_model, fit_detector
from defectscope.thresholds import calibrate

from generated import CATEGORIES, write_generated  # noqa: E402  (benchmarks/generated.py)
from isolated import frame_label, keep_other_rows, peak_mb, run_isolated, runs_note, write_results  # noqa: E402  (benchmarks/isolated.py, beside this script)

COLUMNS = (
    ("category", "category", "{}"), ("model", "model", "{}"), ("frame", "frame", "{}"), ("global_view", "global view", "{}"), ("place_view", "place view", "{}"),
    ("image_auroc", "image AUROC", "{:.3f}"),
    ("pixel_auroc", "pixel AUROC", "{:.3f}"), ("aupro", "AUPRO", "{:.3f}"), ("image_f1_max", "image F1-max", "{:.3f}"),
    ("stated_far", "stated FAR", "{:.1%}"), ("test_far", "FAR on good test", "{:.1%}"), ("recall", "recall", "{:.3f}"),
    ("test_far_5", "FAR on good test at 5%", "{:.1%}"), ("recall_5", "recall at 5%", "{:.3f}"),
    ("bias", "calibration bias (sd)", "{:+.2f}"), ("bias_se", "± (1 se)", "{:.2f}"), ("fit_s", "fit s", "{:.1f}"), ("ms_batch1", "ms/img batch 1", "{:.0f}"), ("ms_batched", "ms/img batched", "{:.0f}"),
    ("ms_decode", "decode ms/img", "{:.0f}"), ("peak_mb", "peak MB", "{:.0f}"),
)


def measure(folder: Path, model: str, settings: dict) -> dict:
    """Fit, evaluate and time one model on one category folder (run inside its own process)."""
    torch.set_num_threads(2)
    dataset = load_dataset(folder)
    start = time.perf_counter()
    detector, _ = fit_detector(dataset, model, settings)
    fit_seconds = time.perf_counter() - start
    evaluation = evaluate_model(detector, dataset)[0]
    metrics = evaluation.metrics
    labels = np.array([r["label"] for r in evaluation.records])
    good = np.array([r["score"] for r in evaluation.records])[labels == 0]
    calibration_scores = detector.calibration_scores.numpy()
    decisions = metrics.get("at_model_threshold", {})
    scores = np.array([r["score"] for r in evaluation.records])
    five = calibrate(calibration_scores, "false_alarm_rate", 0.05).threshold  # the same model, restated at 5%
    paths = [s.path for s in dataset.test]
    start = time.perf_counter()
    detector.predict(paths, map_size="input")
    batched = (time.perf_counter() - start) / len(paths) * 1000
    detector.config.batch_size = 1
    single = paths[:20]
    start = time.perf_counter()
    detector.predict(single, map_size="input")
    batch1 = (time.perf_counter() - start) / len(single) * 1000
    start = time.perf_counter()
    for path in single:
        read_image(path)
    decode = (time.perf_counter() - start) / len(single) * 1000
    config = detector.config
    frame = frame_label(config)
    return {
        "category": folder.name, "model": model, "settings": settings, "frame": frame,
        "frame_choice": detector.train_summary.get("frame_choice"), "global_view": getattr(config, "global_view", None),
        "global_view_choice": detector.train_summary.get("global_view_choice"),
        "place_view": getattr(config, "place_view", None),
        **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")},
        "threshold": decisions.get("threshold"), "stated_far": decisions.get("stated_false_alarm_rate"),
        "stated_interval": decisions.get("stated_interval"), "test_far": decisions.get("false_alarm_rate"),
        "recall": decisions.get("recall"), "calibration_images": len(calibration_scores),
        "test_far_5": float((good >= five).mean()), "recall_5": float((scores[labels == 1] >= five).mean()),
        "bias": decisions.get("stated_rate_check", {}).get("bias_sd"),
        "bias_se": decisions.get("stated_rate_check", {}).get("bias_se"),
        "fit_s": fit_seconds, "ms_batch1": batch1, "ms_batched": batched, "ms_decode": decode,
        "peak_mb": peak_mb(),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["n/a" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(text: str) -> object:
    """A setting given on the command line: JSON when it parses (numbers, true, null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets/mvtec_ad"))
    parser.add_argument("--categories", nargs="*", default=["bottle"])
    parser.add_argument("--generate", nargs="*", default=[], choices=CATEGORIES,
                        help="Also benchmark these generated categories (benchmarks/generated.py).")
    parser.add_argument("--logical", action="store_true", help="The same as --generate logical-parts.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="draw each generated category at these seeds (0: as every table measures it)")
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim", "knn", "pca", "ocsvm"],
                        help='model names, each optionally with its own settings: "patchcore global_view=on"')
    parser.add_argument("--settings", type=json.loads, default={}, help='JSON config overrides, e.g. \'{"coreset_ratio": 0.01}\'')
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep-others", action="store_true",
                        help="re-measure only these categories and models; keep the other rows of the results file")
    parser.add_argument("--single", nargs=2, metavar=("FOLDER", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        name, *pairs = args.single[1].split()
        settings = {**args.settings, **{key: _value(value) for key, value in (p.split("=", 1) for p in pairs)}}
        print(json.dumps({**measure(Path(args.single[0]), name, settings), "model": args.single[1]}))
        return
    folders = [args.root / category for category in args.categories]
    scratch = tempfile.TemporaryDirectory()
    generate = [*args.generate, *(["logical-parts"] if args.logical and "logical-parts" not in args.generate else [])]
    folders += [write_generated(name, Path(scratch.name), seed) for name in generate for seed in args.seeds]
    rows = []
    for folder in folders:
        for model in args.models:
            arguments = ["--settings", json.dumps(args.settings), "--single", str(folder), model]
            rows.append(run_isolated(__file__, arguments, f"{folder.name}/{model}"))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    stem = f"mvtec-{'-'.join(folder.name for folder in folders)}"
    if args.keep_others:
        rows = keep_other_rows(args.out, stem, rows, ("category", "model"),
                               {"category": [folder.name for folder in folders], "model": args.models})
    write_results(args.out, stem, rows, runs_note(rows) + markdown(rows))


if __name__ == "__main__":
    main()
