"""Do the tools our label formats are for accept them? ultralytics trains and validates on our YOLO exports.

    pip install --no-deps ultralytics==8.4.190 ultralytics-thop && pip install requests psutil polars
    python benchmarks/ultralytics_check.py --data ../shared/datasets/mvtec_ad/bottle

For `yolo` and `yolo-seg`: defectscope exports the category's test images from their masks, then
ultralytics builds YOLOv8n / YOLOv8n-seg from its bundled yaml (no weights, nothing downloaded,
plots and online features off), trains 1 epoch on the export and runs its validator. Passes when
its label scan (the `labels/*.cache` it writes) finds no missing or corrupt label file and no
warning, and the images and instances its train and val datasets hold equal our export's counts. Writes benchmarks/results/ultralytics-check.md; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no update checks, no telemetry

from defectscope import __version__, load_dataset  # noqa: E402
from defectscope.export.labels import ExportOptions, export_ground_truth  # noqa: E402

MODELS = {"yolo": "yolov8n.yaml", "yolo-seg": "yolov8n-seg.yaml"}


class Warnings(logging.Handler):
    """Collects the WARNING (and worse) records ultralytics logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def dataset_counts(dataset) -> dict:
    """Images and instances an ultralytics dataset read from our label files."""
    return {"images": len(dataset.labels), "instances": int(sum(len(label["cls"]) for label in dataset.labels))}


def check(data: Path, fmt: str, folder: Path, imgsz: int) -> dict:
    """Export `fmt`, train 1 epoch and validate; ultralytics' counts next to ours."""
    from ultralytics import YOLO
    from ultralytics.data.utils import load_dataset_cache_file
    from ultralytics.utils import LOGGER, SETTINGS

    SETTINGS.update({"sync": False})
    exported = export_ground_truth(load_dataset(data), folder / fmt, ExportOptions(fmt))
    warnings = Warnings()
    LOGGER.addHandler(warnings)
    seen: dict[str, dict] = {}
    model = YOLO(MODELS[fmt])
    model.add_callback("on_pretrain_routine_end", lambda trainer: seen.update(train=dataset_counts(trainer.train_loader.dataset)))
    model.add_callback("on_val_end", lambda validator: seen.update(val=dataset_counts(validator.dataloader.dataset)))
    start = time.perf_counter()
    try:
        model.train(data=str(folder / fmt / "data.yaml"), epochs=1, imgsz=imgsz, batch=8, device="cpu", workers=0,
                    plots=False, amp=False, pretrained=False, project=str(folder / "runs"), name=fmt, exist_ok=True,
                    verbose=False)
        metrics = model.val(data=str(folder / fmt / "data.yaml"), split="val", imgsz=imgsz, batch=8, device="cpu",
                            workers=0, plots=False, verbose=False)
    finally:
        LOGGER.removeHandler(warnings)
    scans = {subset: load_dataset_cache_file(folder / fmt / "labels" / f"{subset}.cache") for subset in ("train", "val")}
    label_warnings = [line for scan in scans.values() for line in scan["msgs"]]
    label_warnings += [line for line in warnings.lines if "label" in line.lower() or "corrupt" in line.lower()]
    for subset, scan in scans.items():
        found, missing, empty, corrupt, total = scan["results"]
        seen[subset].update(scan={"found": found, "missing": missing, "empty": empty, "corrupt": corrupt, "total": total})
    return {"format": fmt, "model": MODELS[fmt], "ours": exported, "ultralytics": seen, "label_warnings": label_warnings,
            "warnings": warnings.lines, "seconds": time.perf_counter() - start,
            "box_map50": float(metrics.box.map50), "agrees": not label_warnings and all(
                _counts(seen[subset]) == exported[subset] and not seen[subset]["scan"]["corrupt"]
                and not seen[subset]["scan"]["missing"] for subset in ("train", "val"))}


def _counts(seen: dict) -> dict:
    return {"images": seen["images"], "instances": seen["instances"]}


def markdown(command: str, rows: list[dict]) -> str:
    import ultralytics

    lines = [f"`{command}`", "", f"defectscope {__version__}, ultralytics {ultralytics.__version__}, 1 epoch from the "
             "bundled yaml (no pretrained weights), CPU", "",
             "| export | ultralytics model | subset | images (ours / ultralytics) | instances (ours / ultralytics) | "
             "label files found / missing / empty / corrupt | label warnings | counts equal |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for subset in ("train", "val"):
            ours, theirs = row["ours"][subset], row["ultralytics"].get(subset, {})
            scan = theirs["scan"]
            lines.append(f"| {row['format']} | {row['model']} | {subset} | {ours['images']} / {theirs['images']} | "
                         f"{ours['instances']} / {theirs['instances']} | {scan['found']} / {scan['missing']} / {scan['empty']} / "
                         f"{scan['corrupt']} | {len(row['label_warnings'])} | {'yes' if ours == _counts(theirs) else 'NO'} |")
    lines += ["", "Empty label files are the good images (no instances). Validation box mAP50 after one epoch from "
              "scratch (not a quality figure; it shows the labels were read and scored): "
              + ", ".join(f"{r['format']} {r['box_map50']:.4f}" for r in rows), ""]
    other = sorted({line for r in rows for line in r["warnings"]} - {line for r in rows for line in r["label_warnings"]})
    lines += ["Other warnings ultralytics logged: " + ("; ".join(other) if other else "none"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/bottle"))
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    command = f"python benchmarks/ultralytics_check.py --data {args.data}"
    with tempfile.TemporaryDirectory(prefix="ultralytics-check-") as folder:
        rows = [check(args.data, fmt, Path(folder), args.imgsz) for fmt in MODELS]
    text = markdown(command, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ultralytics-check.md").write_text(text)
    print(text)
    sys.exit(0 if all(row["agrees"] for row in rows) else 1)


if __name__ == "__main__":
    main()
