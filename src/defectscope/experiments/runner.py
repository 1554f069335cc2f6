"""Run an experiment's attempts in turn; each writes result.json (+ model file or held-out predictions) in its folder.

An attempt whose result.json was produced from the same model, settings and data is skipped
unless `redo` is set; one whose settings changed is run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from defectscope import __version__
from defectscope.artifacts import save_model, write_atomic
from defectscope.classify.crossval import cross_validate
from defectscope.classify.model import ClassifierConfig
from defectscope.classify.report import classification_markdown, classification_metrics
from defectscope.data.layout import Dataset, load_dataset
from defectscope.data.summary import summarize
from defectscope.detectors import create_detector
from defectscope.data.images import masks_in_frame
from defectscope.detectors.reconstruction import ReconstructionDetector
from defectscope.detectors.segmenter import Segmenter, SegmenterConfig, held_out_maps
from defectscope.metrics import aupro, image_auroc, pixel_auroc
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate
from defectscope.experiments.config import Attempt, Experiment
from defectscope.viz import confusion_png, loss_png

RESULT = "result.json"
EXPERIMENT = "experiment.json"
Say = Callable[[str], None]


def fingerprint(attempt: Attempt, data: Path) -> str:
    """Hash of what determines an attempt's result: model, settings, data folder."""
    key = json.dumps({"model": attempt.model, "settings": attempt.settings, "data": str(data.resolve())}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _run_detector(attempt: Attempt, dataset: Dataset, folder: Path, say: Say) -> dict:
    detector = create_detector(attempt.model, **attempt.settings)
    if isinstance(detector, ReconstructionDetector):
        detector.epoch_progress = lambda epoch, total, loss, val: say(
            f"epoch {epoch}/{total} train loss {loss:.4f}" + (f" validation {val:.4f}" if val is not None else ""))
    report = detector.fit([s.path for s in dataset.train])
    save_model(detector, folder / "model.dsmodel")
    metrics = evaluate(detector, dataset).metrics
    result = {"fit_s": report.seconds, "infer_ms": metrics["predict_ms_per_image"], "metrics": metrics,
              "config": detector.config.to_dict()}
    if isinstance(detector, ReconstructionDetector):
        history = detector.history.to_dict()
        loss_png([history], folder / "losses.png", f"{attempt.name}: reconstruction loss")
        result.update(history=history, train_loss=history["train_loss"][-1], test_loss=detector.mean_loss([s.path for s in dataset.test]))
    decisions = metrics.get("at_model_threshold") or {}
    result["summary"] = {"accuracy": decisions.get("accuracy"), **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}}
    return result


def _run_classifier(attempt: Attempt, dataset: Dataset, folder: Path, say: Say) -> dict:
    config = ClassifierConfig.from_dict(attempt.settings)
    validation = cross_validate(dataset, config, progress=say)
    write_json(folder / "predictions.json", validation.to_dict())
    metrics = classification_metrics(validation.records, validation.classes)
    loss_png(validation.histories, folder / "losses.png", f"{attempt.name}: training loss per fold")
    confusion_png(metrics["confusion"], validation.classes, folder / "confusion.png", f"{attempt.name} (held-out)")
    report = classification_markdown(f"{attempt.name}: held-out predictions, {config.folds}-fold", metrics,
                                     validation.classes, summarize(dataset))
    write_atomic(folder / "report.md", report.encode())
    histories = validation.histories
    summary = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "image_auroc", "tail_recall")}
    return {
        "fit_s": validation.fit_seconds, "infer_ms": validation.infer_ms, "metrics": metrics, "summary": summary,
        "spread": metrics["folds"], "classes": validation.classes, "config": config.to_dict(),
        "train_loss": sum(h["train_loss"][-1] for h in histories) / len(histories),
        "test_loss": sum(h["held_out_loss"] for h in histories) / len(histories),
    }


def _run_segmenter(attempt: Attempt, dataset: Dataset, folder: Path, say: Say) -> dict:
    segmenter = Segmenter(SegmenterConfig.from_dict(attempt.settings))
    start = time.perf_counter()
    maps, folds, infer_ms = held_out_maps(dataset, segmenter.config, progress=lambda n: say(f"scored {n} held-out images"))
    fit_s = time.perf_counter() - start - infer_ms * len(maps) / 1000
    masks = masks_in_frame([s.mask for s in dataset.test], segmenter.preprocess)
    labels = np.array([s.label for s in dataset.test])
    summary = {"image_auroc": image_auroc(labels, maps.max(axis=(1, 2))), "pixel_auroc": pixel_auroc(masks, maps),
               "aupro": aupro(masks, maps)}
    return {"fit_s": fit_s, "infer_ms": infer_ms, "metrics": {**summary, "folds": folds}, "summary": summary,
            "config": segmenter.config.to_dict()}


def run_experiment(experiment: Experiment, data: Path, out: Path, *, redo: bool = False, only: list[str] | None = None,
                   say: Say = print, status: Say | None = None) -> list[dict]:
    """Run (or skip) each attempt; returns every attempt's result, finished earlier or now.

    `say` gets lasting messages; `status` (default: `say`) gets per-epoch and per-fold progress.
    """
    status = status or say
    names = [a.name for a in experiment.attempts]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise DefectscopeError(f"no attempt named {', '.join(unknown)}; attempts: {', '.join(names)}")
    dataset = load_dataset(data)
    write_json(out / EXPERIMENT, {"name": experiment.name, "data": str(data), "metric": experiment.metric,
                                  "baseline": experiment.baseline, "attempts": names, "dataset": summarize(dataset)})
    results = []
    for attempt in experiment.attempts:
        folder = out / attempt.name
        stamp = fingerprint(attempt, data)
        previous = json.loads((folder / RESULT).read_text()) if (folder / RESULT).is_file() else None
        if only and attempt.name not in only or previous and previous["fingerprint"] == stamp and not redo:
            if previous:
                say(f"{attempt.name}: finished earlier, skipped (--redo runs it again)")
                results.append(previous)
            continue
        if previous and previous["fingerprint"] != stamp:
            say(f"{attempt.name}: settings changed since the last run; running again")
        say(f"{attempt.name}: {attempt.model} {attempt.settings}")
        folder.mkdir(parents=True, exist_ok=True)
        run = _run_classifier if attempt.is_classifier else _run_segmenter if attempt.model == "segmenter" else _run_detector
        result = run(attempt, dataset, folder, lambda text, name=attempt.name: status(f"{name}: {text}"))
        say(f"{attempt.name}: done in {result['fit_s']:.0f} s of training; " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["summary"].items() if v is not None))
        result.update(attempt=attempt.name, model=attempt.model, settings=attempt.settings, description=attempt.description,
                      fingerprint=stamp, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      library_version=__version__)
        write_json(folder / RESULT, result)
        results.append(result)
    return results
