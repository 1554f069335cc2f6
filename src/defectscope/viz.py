"""Heatmap overlays, ROC curves and galleries of the worst mistakes, as PNG files."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from defectscope.data.decode import read_image
from defectscope.data.frame import Preprocess
from defectscope.errors import DefectscopeError
from defectscope.files import NAME_MAX, tagged_name, write_atomic
from defectscope.names import as_text
from defectscope.prediction import Detection, Prediction


def heat_colours(heatmap: np.ndarray, low: float, high: float) -> np.ndarray:
    """A heatmap as a JET-coloured RGB image, scaled from low (blue) to high (red)."""
    scaled = np.clip((heatmap - low) / max(high - low, 1e-12), 0, 1)
    return cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image encoded as PNG."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DefectscopeError("could not encode a PNG image")
    return encoded.tobytes()


def overlay(image: np.ndarray, heatmap: np.ndarray, low: float, high: float, mask: np.ndarray | None = None,
            inspected: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Blend a JET-coloured heatmap (scaled from low to high) over an RGB image, more opaque where the map is higher
    (the part stays visible where it is low); outline the mask in white; dim and hatch what lies outside the
    `inspected` box (top, left, bottom, right: the model's crop), which the model never saw."""
    if heatmap.shape != image.shape[:2]:
        heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    strength = np.clip((heatmap - low) / max(high - low, 1e-12), 0, 1)[..., None]
    alpha = 0.15 + 0.6 * strength
    blended = (image * (1 - alpha) + heat_colours(heatmap, low, high) * alpha).astype(np.uint8)
    if inspected is not None:
        blended = hatch_outside(blended, inspected)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), max(1, image.shape[0] // 300))
    return blended


def hatch_outside(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The image with everything outside `box` (top, left, bottom, right) dimmed to grey and hatched."""
    top, left, bottom, right = box
    outside = np.ones(image.shape[:2], bool)
    outside[max(top, 0) : bottom, max(left, 0) : right] = False
    if not outside.any():
        return image
    rows, columns = np.indices(image.shape[:2])
    stripes = (rows + columns) // max(2, image.shape[0] // 120) % 4 == 0
    hatched = image.copy()
    hatched[outside] = (image[outside] * 0.3 + 100).astype(np.uint8)
    hatched[outside & stripes] = 215
    return hatched


def _text(image: np.ndarray, text: str, origin: tuple[int, int], unit: int, colour: tuple[int, int, int]) -> None:
    """Draw a line of text (a file name's bytes that are not UTF-8 spelled \\xNN: OpenCV crashes the process on them)."""
    cv2.putText(image, as_text(text), origin, cv2.FONT_HERSHEY_SIMPLEX, 0.42 * unit, colour, unit, cv2.LINE_AA)


def with_scale(image: np.ndarray, caption: str, caption_colour: tuple[int, int, int], high: float,
               threshold: float | None, note: str | None = None) -> np.ndarray:
    """An overlay framed for reading: a caption band above (the verdict and normalized score), a colour bar at the
    right from 0 to `high` with the threshold marked, and an optional note (what the hatching means) below."""
    height, width = image.shape[:2]
    unit = max(1, round(height / 400))
    band, bar, labels = 22 * unit, max(10, width // 30), 54 * unit
    canvas = np.full((height + band * (2 if note else 1), width + bar + labels + 8 * unit, 3), 255, np.uint8)
    canvas[band : band + height, :width] = image
    ramp = np.linspace(high, 0.0, height, dtype=np.float32)[:, None].repeat(bar, 1)
    left = width + 4 * unit
    canvas[band : band + height, left : left + bar] = heat_colours(ramp, 0.0, high)
    black = (30, 30, 30)
    _text(canvas, caption, (4 * unit, 16 * unit), unit, caption_colour)
    ticks = [(high, f"{high:.3g}"), (0.0, "0")]
    if threshold:
        ticks = [(high, f"{high / threshold:.3g}x"), (threshold, "1.0x thr"), (0.0, "0")]
    for value, label in ticks:
        row = band + round((1 - value / high) * (height - 1))
        cv2.line(canvas, (left - 2 * unit, row), (left + bar + 2 * unit, row), black, unit)
        _text(canvas, label, (left + bar + 4 * unit, min(max(row + 5 * unit, band + 10 * unit), band + height)), unit, black)
    if note:
        _text(canvas, note, (4 * unit, band + height + 16 * unit), unit, black)
    return canvas


VERDICT_COLOURS = {"defective": (200, 30, 30), "good": (20, 130, 40), "error": (120, 120, 120), "unknown": (120, 120, 120)}


def readable_overlay(image: np.ndarray, heatmap: np.ndarray, score: float, threshold: float | None,
                     inspected: tuple[int, int, int, int] | None, mask: np.ndarray | None = None,
                     name: str | None = None, detections: Sequence[Detection] = ()) -> np.ndarray:
    """The overlay a person reads: map scaled 0 .. 2x the threshold (or to its largest value without one), the part
    visible, the uninspected margin hatched, detected instances outlined, the verdict, normalized score and colour
    bar beside it."""
    high = 2 * threshold if threshold else max(float(heatmap.max()), 1e-12)
    blended = draw_detections(overlay(image, heatmap, 0.0, high, mask, inspected), detections)
    if threshold:
        verdict = Prediction(np.array([score]), None, threshold).verdicts[0]  # the one rule: never 'good' on NaN
        caption = f"{verdict}  normalized {score / threshold:.2f}"
    else:
        verdict, caption = "unknown", f"score {score:.4g} (no threshold)"
    if name:
        caption = f"{name}: {caption}"
    top, left, bottom, right = inspected or (0, 0, *image.shape[:2])
    margin = top > 0 or left > 0 or bottom < image.shape[0] or right < image.shape[1]
    return with_scale(blended, caption, VERDICT_COLOURS[verdict], high, threshold,
                      "hatched: outside the inspected frame" if margin else None)


def save_rgb(path: Path, image: np.ndarray) -> None:
    """Write an RGB image as PNG, atomically."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    write_atomic(path, png.tobytes())


def heatmap_names(paths: Sequence[Path]) -> list[str]:
    """Unique, stable PNG names: each path relative to the inputs' common folder, parts joined by '_'.

    Images in one folder keep that folder's name (good_000.png); names that still collide get a
    short hash of their full path.
    """
    resolved = [Path(os.path.abspath(p)) for p in paths]
    if not resolved:
        return []
    parents = {p.parent for p in resolved}
    root = Path(os.path.commonpath(list(parents)))
    if len(parents) == 1:
        root = root.parent
    names = ["_".join(p.relative_to(root).with_suffix("").parts) for p in resolved]
    owners: dict[str, set[Path]] = {}
    for name, path in zip(names, resolved):
        owners.setdefault(name, set()).add(path)
    return [tagged_name(f"{name}.png", hashlib.sha1(as_text(str(path)).encode()).hexdigest()[:8], NAME_MAX)
            if len(owners[name]) > 1 or len(os.fsencode(f"{name}.png")) > NAME_MAX else f"{name}.png"
            for name, path in zip(names, resolved)]  # a name too long is shortened, and its digest keeps it unique


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """Outline each detected instance's mask and box in white, labelled with its type and confidence."""
    thickness = max(1, image.shape[0] // 300)
    for detection in detections:
        contours, _ = cv2.findContours(detection.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (255, 255, 255), thickness)
        x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), thickness)
        cv2.putText(image, f"{detection.type} {detection.confidence:.2f}", (x0, max(y0 - 4 * thickness, 10 * thickness)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


def write_heatmaps(paths: Sequence[Path], prediction: Prediction, preprocess: Preprocess, folder: Path) -> list[Path | None]:
    """A readable overlay PNG per image with a map (`readable_overlay`: 0 .. 2x threshold, verdict, colour bar, the
    uninspected margin hatched), with the image's detected instances drawn when given; None where there is no map."""
    written: list[Path | None] = []
    maps = prediction.maps or [None] * len(paths)
    for number, (path, name, heat) in enumerate(zip(paths, heatmap_names(paths), maps)):
        if heat is None:
            written.append(None)
            continue
        image = read_image(path)
        found = prediction.detections[number] if prediction.detections is not None else ()
        save_rgb(folder / name, readable_overlay(image, heat, float(prediction.scores[number]), prediction.threshold,
                                                 preprocess.inspected_box(*image.shape[:2]), detections=found))
        written.append(folder / name)
    return written


def curves_png(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """Image-level ROC and precision-recall curves side by side, the model's operating point marked on both."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    called = scores >= threshold
    recall = float(called[labels == 1].mean())
    false_alarms = float(called[labels == 0].mean())
    precision = float(labels[called].mean()) if called.any() else 1.0
    fpr, tpr, _ = roc_curve(labels, scores)
    precisions, recalls, _ = precision_recall_curve(labels, scores)
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110)
    roc.plot(fpr, tpr, lw=2, label=f"ROC (area {roc_auc_score(labels, scores):.3f})")
    roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    roc.plot([false_alarms], [recall], "o", c="crimson", ms=8, label=f"threshold {threshold:.4g}")
    roc.set(xlabel="false-alarm rate (good parts flagged)", ylabel="recall (defective parts caught)",
            title="ROC", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    pr.plot(recalls, precisions, lw=2, label=f"PR (average precision {average_precision_score(labels, scores):.3f})")
    pr.plot([recall], [precision], "o", c="crimson", ms=8, label=f"threshold {threshold:.4g}")
    pr.set(xlabel="recall (defective parts caught)", ylabel="precision (flagged parts truly defective)",
           title="precision-recall", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    for ax in (roc, pr):
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def histogram_png(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """Histograms of the good and the defective test images' scores, with the threshold line."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    bins = np.histogram_bin_edges(np.append(scores, threshold), bins=30)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, color="tab:green", label=f"good ({int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, color="tab:red", label=f"defective ({int((labels == 1).sum())})")
    ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="anomaly score", ylabel="test images", title=title)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # image counts: no half images on the axis
    ax.legend(fontsize=8)
    _save(fig, path)


def gallery_png(tiles: list[tuple[np.ndarray, str]], path: Path, title: str, columns: int = 4) -> None:
    """A grid of captioned images."""
    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    """Render a figure to PNG and write it atomically (file names in its texts as `as_text` spells them: the fonts
    take no bytes that are not UTF-8)."""
    for text in fig.findobj(matplotlib.text.Text):
        text.set_text(as_text(text.get_text()))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def loss_png(histories: list[dict], path: Path, title: str) -> None:
    """Train (solid) and validation (dashed) loss per epoch; one colour per run (e.g. per fold)."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for index, history in enumerate(histories):
        colour = f"C{index % 10}"
        label = f"run {index + 1}" if len(histories) > 1 else "train"
        ax.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], c=colour, label=label)
        if history.get("val_loss"):
            ax.plot(range(1, len(history["val_loss"]) + 1), history["val_loss"], c=colour, ls="--",
                    label="validation" if len(histories) == 1 else None)
    ax.set(xlabel="epoch", ylabel="loss", title=title, yscale="log")
    ax.legend(fontsize=8)
    _save(fig, path)


def confusion_png(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    counts = np.array(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.1 * len(classes) + 1.5), dpi=110)
    ax.imshow(counts / counts.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)
