"""Write an evaluation to a folder: metrics JSON and Markdown, ROC curve, gallery of worst mistakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.data.decode import read_image
from defectscope.detectors.base import MapModel
from defectscope.evaluation import Evaluation
from defectscope.files import write_atomic, write_json
from defectscope.viz import gallery_png, overlay, roc_png

METRIC_COLUMNS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"), ("image_f1_max", "image F1-max"))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def metrics_markdown(metrics: dict) -> str:
    """The overall and per-defect metric table as Markdown."""
    header = "| subset | images | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_COLUMNS) + 2)]
    lines.append(f"| all | {metrics['images']} | " + " | ".join(_fmt(metrics.get(k)) for k, _ in METRIC_COLUMNS) + " |")
    for defect, row in metrics["per_defect"].items():
        lines.append(f"| {defect} | {row['images']} | " + " | ".join(_fmt(row.get(k)) for k, _ in METRIC_COLUMNS) + " |")
    for key, label in (("at_model_threshold", "model threshold (good images only)"), ("at_f1_threshold", "F1-optimal threshold")):
        if key in metrics:
            d = metrics[key]
            lines.append(
                f"\n{label}: {d['threshold']:.4g} -> accuracy {d['accuracy']:.3f}, precision {_fmt(d['precision'])}, "
                f"recall {_fmt(d['recall'])}, F1 {_fmt(d['f1'])}, {d['false_positives']} false positive(s), "
                f"{d['false_negatives']} false negative(s)"
            )
            if d.get("false_alarm_rate") is not None and d.get("stated_false_alarm_rate") is not None:
                low, high = d["stated_interval"]
                lines.append(f"false-alarm rate on the good test images {d['false_alarm_rate']:.1%}; stated when fitted "
                             f"{d['stated_false_alarm_rate']:.1%} (95% interval {low:.1%} to {high:.1%})")
    lines += [f"\nnote: {n}" for n in metrics["notes"]]
    return "\n".join(lines) + "\n"


def _worst(evaluation: Evaluation, threshold: float, count: int) -> list[int]:
    """Indices of the worst mistakes at a threshold: good images scored highest, defective lowest."""
    scores = np.array([r["score"] for r in evaluation.records])
    labels = np.array([r["label"] for r in evaluation.records])
    false_pos = [i for i in np.argsort(-scores) if labels[i] == 0 and scores[i] >= threshold]
    false_neg = [i for i in np.argsort(scores) if labels[i] == 1 and scores[i] < threshold]
    closest_good = [i for i in np.argsort(-scores) if labels[i] == 0]
    closest_bad = [i for i in np.argsort(scores) if labels[i] == 1]
    picked = (false_pos + false_neg)[:count]
    for i in [*closest_good[:2], *closest_bad[:2]]:  # always show the hardest cases too
        if len(picked) < count and i not in picked:
            picked.append(i)
    return picked


def write_report(evaluation: Evaluation, detector: MapModel, out: Path, gallery_size: int = 8) -> list[Path]:
    """Write metrics.json, metrics.md, roc.png and gallery.png; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics
    written = [out / "metrics.json", out / "metrics.md"]
    payload = {"metrics": metrics, "images": evaluation.records}
    write_json(written[0], payload, indent=2)
    write_atomic(written[1], metrics_markdown(metrics).encode())
    labels = np.array([r["label"] for r in evaluation.records])
    scores = np.array([r["score"] for r in evaluation.records])
    if "image_auroc" in metrics:
        roc_png(labels, scores, metrics["image_auroc"], out / "roc.png", f"{detector.name} image ROC")
        written.append(out / "roc.png")
    threshold = (metrics.get("at_model_threshold") or metrics.get("at_f1_threshold") or {}).get("threshold")
    if evaluation.maps is not None and threshold is not None:
        preprocess = detector.preprocess
        low, high = float(np.percentile(evaluation.maps, 1)), max(threshold * 1.5, float(evaluation.maps.max()) * 0.8)
        tiles = []
        for i in _worst(evaluation, threshold, gallery_size):
            record = evaluation.records[i]
            image = preprocess.resize_crop(read_image(record["path"]))
            mask = None if evaluation.masks is None else evaluation.masks[i]
            verdict = "defective" if record["score"] >= threshold else "good"
            caption = f"{Path(record['path']).parent.name}/{Path(record['path']).name}\nscore {record['score']:.3g} -> {verdict}"
            tiles.append((overlay(image, evaluation.maps[i], low, high, mask), caption))
        gallery_png(tiles, out / "gallery.png", f"hardest cases at threshold {threshold:.3g} (white: true defect)")
        written.append(out / "gallery.png")
    return written
