"""Write an evaluation to a folder: a report a plant engineer can forward (HTML and Markdown), the per-image
predictions as CSV, metrics JSON and Markdown, curves, a score histogram, overlays of every mistake, a gallery."""

from __future__ import annotations

import csv
import hashlib
import io
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from defectscope.data.decode import read_image
from defectscope.evaluation import Evaluation
from defectscope._version import __version__
from defectscope.files import file_sha256, write_json, write_text
from defectscope.names import as_text, version_of
from defectscope.prediction import Prediction
from defectscope.predictor import Predictor, engine_of
from defectscope.report_document import Block, Figure, Heading, Table, Text, html_page, markdown
from defectscope.thresholds import GOOD_ONLY_METHODS
from defectscope.viz import curves_png, gallery_png, heatmap_names, histogram_png, overlay, readable_overlay, save_rgb

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
    for key, label in (("at_model_threshold", "model threshold"), ("at_f1_threshold", "F1-optimal threshold")):
        if key in metrics:
            d = metrics[key]
            method = d.get("threshold_method")
            if method is not None:
                label += " (set from good images only)" if method in GOOD_ONLY_METHODS else f" (set with labelled images: {method})"
            lines.append(
                f"\n{label}: {d['threshold']:.4g} -> accuracy {d['accuracy']:.3f}, precision {_fmt(d['precision'])}, "
                f"recall {_fmt(d['recall'])}, F1 {_fmt(d['f1'])}, {d['false_positives']} false positive(s), "
                f"{d['false_negatives']} false negative(s)"
            )
            if d.get("false_alarm_rate") is not None and d.get("stated_false_alarm_rate") is not None:
                low, high = d["stated_interval"]
                lines.append(f"false-alarm rate on the good test images {d['false_alarm_rate']:.1%}; stated when calibrated "
                             f"{d['stated_false_alarm_rate']:.1%} (95% interval {low:.1%} to {high:.1%})")
            if "stated_rate_check" in d:
                lines.append(f"{'' if d['stated_rate_check']['holds'] else 'warning: '}{d['stated_rate_check']['message']}")
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


GLOSSARY = (
    ("anomaly score", "how unlike the good training images a part looks; its scale is the model's own (PatchCore: a "
                      "distance between features, PaDiM: a squared Mahalanobis distance), so read it against the threshold"),
    ("normalized score", "the score divided by the threshold: 1.0 is the boundary, above it the part is judged defective"),
    ("threshold", "the score above which a part is judged defective, set from good images only for the stated "
                  "false-alarm rate (or as the calibrate command set it)"),
    ("recall", "the share of defective parts judged defective"),
    ("false-alarm rate", "the share of good parts judged defective; the stated rate is the one promised when the "
                         "model was calibrated, with its 95% interval"),
    ("calibration bias", "the cross-fitted training goods' mean score less the good test images', in the test "
                         "images' standard deviations: near 0 when the good test parts are like the training goods, "
                         "negative when they score higher (then more of them are flagged than stated)"),
    ("image AUROC", "the chance that a random defective part scores above a random good one (1.0: every defective "
                    "part above every good one, at some threshold)"),
    ("pixel AUROC", "the same, pixel by pixel, for the heatmap against the defect masks"),
    ("AUPRO", "how much of each defect region the heatmap covers, averaged over regions, up to a 30% false-positive "
              "pixel rate (normalized to 1.0)"),
    ("F1-max", "the best balance of precision and recall over all thresholds (uses the test labels: a ceiling, not "
               "the model's operating point)"),
    ("heatmap", "per pixel, how anomalous that place looks, in score units; colours from blue (0) to red (twice the "
                "threshold and above), more opaque where higher, the true defect outlined in white; a hatched border "
                "(on images with a crop) is outside what the model inspects"),
)
CASE_OVERLAYS = 48  # overlays drawn per list (missed, false alarms); every case is listed in the table and the CSV
REPORT_FILES = ("metrics.json", "metrics.md", "report.html", "report.md", "predictions.csv", "curves.png", "histogram.png",
                "gallery.png")  # with the overlays in cases/: what a report may write


def prediction_table(records: list[dict], threshold: float) -> list[dict]:
    """Per test image: path, true class, score, normalized score, verdict at the threshold and whether it is right
    (a score that is not a finite number is an 'error', never right)."""
    scored = Prediction(np.array([r["score"] for r in records], np.float64), None, threshold)
    return [{"path": r["path"], "true_class": r["defect"], "score": r["score"], "normalized_score": float(norm),
             "verdict": verdict, "correct": verdict == ("defective" if r["label"] == 1 else "good")}
            for r, norm, verdict in zip(records, scored.normalized, scored.verdicts)]


def confusion(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Counts by true condition (good, defective) and verdict (good, defective, error)."""
    counts = {truth: {"good": 0, "defective": 0, "error": 0} for truth in ("good", "defective")}
    for row in rows:
        counts["good" if row["true_class"] == "good" else "defective"][row["verdict"]] += 1
    return counts


def write_predictions_csv(path: Path, rows: list[dict], heatmaps: dict[str, str]) -> None:
    """predictions.csv: one row per test image, with the overlay file written for it (if any)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*rows[0], "heatmap"] if rows else ["path"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "score": f"{row['score']:.6g}", "normalized_score": f"{row['normalized_score']:.4f}",
                         "correct": "yes" if row["correct"] else "no", "heatmap": heatmaps.get(row["path"], "")})
    write_text(path, buffer.getvalue())


def _case_overlays(evaluation: Evaluation, detector: Predictor, indices: list[int], folder: Path,
                   threshold: float) -> dict[str, Path]:
    """Readable overlays (model frame, true defect outlined, verdict and colour bar) of the given test images, by path."""
    paths = [Path(evaluation.records[i]["path"]) for i in indices]
    written = {}
    for i, name in zip(indices, heatmap_names(paths)):
        record = evaluation.records[i]
        image = detector.preprocess.resize_crop(read_image(record["path"]))
        mask = None if evaluation.masks is None else evaluation.masks[i]
        label = f"{Path(record['path']).parent.name}/{Path(record['path']).name}"
        save_rgb(folder / name, readable_overlay(image, evaluation.maps[i], record["score"], threshold, None, mask, label))
        written[record["path"]] = folder / name
    return written


def _case_blocks(title: str, rows: list[dict], overlays: dict[str, Path]) -> list[Block]:
    """A list of missed defects or false alarms: a table naming every one, then their overlays."""
    if not rows:
        return [Heading(title, 3), Text("none")]
    table = Table(["image", "true class", "score", "normalized", "verdict"],
                  [[row["path"], row["true_class"], f"{row['score']:.4g}", f"{row['normalized_score']:.3f}", row["verdict"]]
                   for row in rows])
    figures = [Figure(overlays[row["path"]], f"{Path(row['path']).parent.name}/{Path(row['path']).name}: "
                      f"{row['true_class']}, normalized score {row['normalized_score']:.3f} -> {row['verdict']}", tile=True)
               for row in rows if row["path"] in overlays]
    shown = "" if len(figures) == len(rows) else f" (overlays of the first {len(figures)})" if figures else ""
    return [Heading(f"{title}: {len(rows)}{shown}", 3), table, *figures]


PROVENANCE_LABELS = {"model_file": "model file", "model_version": "model version", "model_sha256": "model sha256",
                     "model": "model", "operating_point": "operating point", "test_set": "test set",
                     "test_set_sha256": "test set sha256 (each image's path and content)", "evaluated_at": "evaluated (UTC)",
                     "software": "software"}


def provenance(detector: Predictor, root: Path, test: Sequence[Path], model_file: Path | None = None,
               model_sha256: str | None = None) -> dict[str, str]:
    """What an evaluation was made of, for the record: the model file (version and sha256: `model_sha256`, the file's
    when it was loaded, else its now), the model and its operating point, the test set (`test` images under `root`)
    with a fingerprint of its contents, when, and the software."""
    engine = engine_of(detector)
    frame = detector.preprocess
    calibration = detector.calibration
    listing = sorted((path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path), file_sha256(path))
                     for path in test)
    digest = "" if model_file is None else model_sha256 or file_sha256(Path(model_file))
    return {"model_file": "" if model_file is None else str(model_file),
            "model_version": version_of(digest), "model_sha256": digest,
            "model": f"{detector.name} on {detector.backbone_name}, images resized to {frame.image_size} and cropped "
                     f"to {frame.crop or frame.image_size}",
            "operating_point": calibration.describe() if calibration else "no threshold",
            "test_set": f"{root} ({len(test)} images)",
            "test_set_sha256": hashlib.sha256(as_text("".join(f"{name}\t{image}\n" for name, image in listing)).encode()).hexdigest(),
            "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "software": f"defectscope {__version__}, {engine} {_installed(engine)}, Python {platform.python_version()}"}


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # run from a source tree, or a build under another distribution name
        return "(version unknown)"


def plant_report(evaluation: Evaluation, detector: Predictor, out: Path, name: str, threshold: float,
                 context: tuple[str, ...] = (), made_of: dict[str, str] | None = None
                 ) -> tuple[list[Block], list[dict], dict[str, Path]]:
    """The report's blocks (`context`: lines said under the title, such as the data and model used; `made_of`: the
    evaluation's `provenance`), the per-image rows and the overlays written (into out/cases)."""
    metrics, records = evaluation.metrics, evaluation.records
    rows = prediction_table(records, threshold)
    counts = confusion(rows)
    labels = np.array([r["label"] for r in records])
    scores = np.array([r["score"] for r in records], np.float64)
    decisions = metrics.get("at_model_threshold") or metrics.get("at_f1_threshold") or {}
    which = ("the model's threshold" if "at_model_threshold" in metrics
             else "the F1-optimal threshold (the model has none; chosen on these test labels)")
    missed = sorted((r for r in rows if r["true_class"] != "good" and r["verdict"] != "defective"), key=lambda r: r["score"])
    alarms = sorted((r for r in rows if r["true_class"] == "good" and r["verdict"] != "good"), key=lambda r: -r["score"])
    overlays: dict[str, Path] = {}
    if evaluation.maps is not None:
        index = {r["path"]: i for i, r in enumerate(records)}
        chosen = [index[r["path"]] for r in missed[:CASE_OVERLAYS] + alarms[:CASE_OVERLAYS]]
        overlays = _case_overlays(evaluation, detector, chosen, out / "cases", threshold)
    good, defective = counts["good"], counts["defective"]
    stated = decisions.get("stated_false_alarm_rate")
    stated_text = ("" if stated is None else f" (stated when calibrated: {stated:.1%}, 95% interval "
                   f"{decisions['stated_interval'][0]:.1%} to {decisions['stated_interval'][1]:.1%})")
    summary = (f"{len(rows)} test images: {sum(good.values())} good, {sum(defective.values())} defective. At {which}, "
               f"{threshold:.4g}, {defective['defective']} of {sum(defective.values())} defective parts are "
               f"caught and {good['defective']} of {sum(good.values())} good parts are flagged{stated_text}.")
    if good["error"] + defective["error"]:
        summary += f" {good['error'] + defective['error']} image(s) could not be scored (verdict 'error')."
    check = decisions.get("stated_rate_check") if "at_model_threshold" in metrics else None
    if check is not None:
        summary += f" {'Warning: ' if not check['holds'] else 'The stated rate holds here: '}{check['message']}."
    per_type = []
    for defect in sorted({r["true_class"] for r in rows} - {"good"}):
        of_type = [r for r in rows if r["true_class"] == defect]
        caught = sum(r["verdict"] == "defective" for r in of_type)
        per_type.append([defect, str(len(of_type)), str(caught), str(len(of_type) - caught), f"{caught / len(of_type):.3f}",
                         _fmt(metrics["per_defect"].get(defect, {}).get("image_auroc"))])
    blocks: list[Block] = [
        Heading(f"Evaluation of {detector.name} on {name}", 1), *(Text(line) for line in context), Text(summary),
        Heading("Verdicts at the threshold"),
        Table(["", "judged good", "judged defective", "error"],
              [[f"truly {truth} ({sum(c.values())})", str(c["good"]), str(c["defective"]), str(c["error"])]
               for truth, c in counts.items()]),
        Heading("Recall per defect type at the threshold", 3),
        Table(["defect type", "images", "caught", "missed", "recall", "image AUROC"], per_type),
        Heading("Missed defects and false alarms"),
        *_case_blocks("Missed defects", missed, overlays), *_case_blocks("False alarms", alarms, overlays),
        Heading("Ranking quality (all thresholds)"),
        Table(["subset", "images", *(label for _, label in METRIC_COLUMNS)],
              [["all", str(metrics["images"]), *(_fmt(metrics.get(k)) for k, _ in METRIC_COLUMNS)]]
              + [[defect, str(row["images"]), *(_fmt(row.get(k)) for k, _ in METRIC_COLUMNS)]
                 for defect, row in metrics["per_defect"].items()]),
    ]
    if labels.min() != labels.max():
        curves_png(labels, scores, threshold, out / "curves.png", f"{name}: {detector.name}, image level")
        blocks.append(Figure(out / "curves.png", "ROC and precision-recall curves; the dot is the model's threshold"))
    histogram_png(labels, scores, threshold, out / "histogram.png", f"{name}: scores of the test images")
    blocks.append(Figure(out / "histogram.png", "scores of good and defective test images; dashed: the threshold"))
    if evaluation.maps is not None:
        blocks.append(Text(f"Overlays are in the model's frame; colours run from blue at 0 to red at twice the threshold "
                           f"({2 * threshold:.4g}) and above, more opaque where higher; the bar beside each marks the "
                           "threshold (1.0x)."))
    if made_of:
        blocks += [Heading("Provenance"), Table(["item", "value"], [[PROVENANCE_LABELS[key], value]
                                                                 for key, value in made_of.items() if value])]
    blocks += [Heading("What the numbers mean"), Table(["term", "meaning"], [[term, text] for term, text in GLOSSARY])]
    if metrics["notes"]:
        blocks += [Heading("Notes", 3), *(Text(note) for note in metrics["notes"])]
    return blocks, rows, overlays


def remove_overlays(folder: Path) -> None:
    """Remove an earlier run's PNG overlays from `folder` (one of ours), and the folder once nothing else is in it."""
    if folder.is_dir() and not folder.is_symlink():
        for overlay_file in folder.glob("*.png"):
            overlay_file.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def _clear_earlier_report(out: Path) -> None:
    """Remove the files a report writes (REPORT_FILES, the PNG overlays in cases/) from `out`, nothing else."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    remove_overlays(out / "cases")


def write_report(evaluation: Evaluation, detector: Predictor, out: Path, name: str = "the test set",
                 context: tuple[str, ...] = (), gallery_size: int = 8, made_of: dict[str, str] | None = None) -> list[Path]:
    """Write report.html (self-contained), report.md, predictions.csv, metrics.json, metrics.md, the curves, the
    score histogram, the overlays of the missed defects and false alarms (cases/) and gallery.png; returns the
    written files (and the cases folder). `made_of`: the evaluation's `provenance`, in the report and metrics.json.
    An earlier report's files in `out` go first: none is left beside this one from another model or test set."""
    out.mkdir(parents=True, exist_ok=True)
    _clear_earlier_report(out)
    metrics = evaluation.metrics
    written = [out / "metrics.json", out / "metrics.md"]
    payload = {"metrics": metrics, "images": evaluation.records, **({"provenance": made_of} if made_of else {})}
    write_json(written[0], payload, indent=2)
    write_text(written[1], metrics_markdown(metrics))
    threshold = (metrics.get("at_model_threshold") or metrics.get("at_f1_threshold") or {}).get("threshold")
    if threshold is None:
        return written
    blocks, rows, overlays = plant_report(evaluation, detector, out, name, threshold, context, made_of)
    write_predictions_csv(out / "predictions.csv", rows, {path: file.relative_to(out).as_posix() for path, file in overlays.items()})
    write_text(out / "report.md", markdown(blocks, out))
    write_text(out / "report.html", html_page(blocks, f"{detector.name} on {name}"))
    written += [out / "report.html", out / "report.md", out / "predictions.csv", *([out / "cases"] if overlays else [])]
    written += [block.path for block in blocks if isinstance(block, Figure) and block.path.parent == out]
    if evaluation.maps is not None:
        preprocess = detector.preprocess
        tiles = []
        for i in _worst(evaluation, threshold, gallery_size):
            record = evaluation.records[i]
            image = preprocess.resize_crop(read_image(record["path"]))
            mask = None if evaluation.masks is None else evaluation.masks[i]
            verdict = "defective" if record["score"] >= threshold else "good"
            caption = f"{Path(record['path']).parent.name}/{Path(record['path']).name}\nscore {record['score']:.3g} -> {verdict}"
            tiles.append((overlay(image, evaluation.maps[i], 0.0, 2 * threshold, mask), caption))
        gallery_png(tiles, out / "gallery.png", f"hardest cases at threshold {threshold:.3g} (white: true defect)")
        written.append(out / "gallery.png")
    return written
