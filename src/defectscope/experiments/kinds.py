"""Model kinds of the experiment runner: for each, its config class and how one attempt runs and reports.

A new kind of model is added here, in `KINDS`, and nowhere else: the config loader validates every
attempt through `attempt_config`, and the runner calls `attempt_kind(model).run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts import save_model
from defectscope.classify.crossval import InputCache, cross_validate
from defectscope.classify.model import ClassifierConfig
from defectscope.classify.report import classification_markdown, classification_metrics
from defectscope.data.images import masks_in_frame
from defectscope.data.layout import Dataset
from defectscope.data.summary import summarize
from defectscope.detectors.base import MODULES, detector_class
from defectscope.detectors.base import MapModel
from defectscope.detectors.instances import InstanceConfig, held_out_instances
from defectscope.detectors.segmenter import Segmenter, SegmenterConfig, held_out_maps
from defectscope.errors import DefectscopeError
from defectscope.files import write_json, write_text
from defectscope.instance_metrics import detected_instance, instance_metrics, per_fold
from defectscope.metrics import image_auroc, pixel_metrics
from defectscope.pipeline import evaluate_model, fit_detector
from defectscope.settings import Settings
from defectscope.viz import confusion_png, loss_png

CLASSIFIER = "classifier"
Say = Callable[[str], None]


@dataclass
class AttemptRun:
    """What one attempt runs with: its name, model, checked config, data, folder and message sinks."""

    name: str
    model: str
    config: Settings
    dataset: Dataset
    folder: Path
    say: Say
    inputs: InputCache


def run_detector(run: AttemptRun) -> dict[str, Any]:
    """Good-only detector: fit, save the model file, evaluate on the test split."""
    epochs = lambda epoch, total, loss, val: run.say(  # noqa: E731
        f"epoch {epoch}/{total} train loss {loss:.4f}" + (f" validation {val:.4f}" if val is not None else ""))
    detector, report = fit_detector(run.dataset, run.model, run.config, epoch_progress=epochs)
    save_model(detector, run.folder / "model.dsmodel", force=True)
    metrics = evaluate_model(detector, run.dataset)[0].metrics
    result = {"fit_s": report.seconds, "infer_ms": metrics["predict_ms_per_image"], "metrics": metrics,
              "config": detector.config.to_dict()}
    if detector.history is not None:
        history = detector.history.to_dict()
        loss_png([history], run.folder / "losses.png", f"{run.name}: reconstruction loss")
        result.update(history=history, train_loss=history["train_loss"][-1],
                      test_loss=detector.mean_loss([s.path for s in run.dataset.test]))
    decisions = metrics.get("at_model_threshold") or {}
    result["summary"] = {"accuracy": decisions.get("accuracy"), **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}}
    return result


def run_classifier(run: AttemptRun) -> dict[str, Any]:
    """Supervised classifier: k-fold held-out predictions, per-class report and confusion matrix."""
    config = run.config
    validation = cross_validate(run.dataset, config, progress=run.say, cache=run.inputs)
    write_json(run.folder / "predictions.json", validation.to_dict())
    metrics = classification_metrics(validation.records, validation.classes)
    loss_png(validation.histories, run.folder / "losses.png", f"{run.name}: training loss per fold")
    confusion_png(metrics["confusion"], validation.classes, run.folder / "confusion.png", f"{run.name} (held-out)")
    report = classification_markdown(f"{run.name}: held-out predictions, {config.folds}-fold", metrics,
                                     validation.classes, summarize(run.dataset))
    write_text(run.folder / "report.md", report)
    histories = validation.histories
    summary = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "image_auroc", "tail_recall")}
    return {
        "fit_s": validation.fit_seconds, "infer_ms": validation.infer_ms, "metrics": metrics, "summary": summary,
        "spread": metrics["folds"], "classes": validation.classes, "config": config.to_dict(),
        "train_loss": sum(h["train_loss"][-1] for h in histories) / len(histories),
        "test_loss": sum(h["held_out_loss"] for h in histories) / len(histories),
    }


def run_instances(run: AttemptRun) -> dict[str, Any]:
    """Instance detector: k-fold held-out instances, COCO AP per defect type, image AUROC; then a model file
    trained on every labelled image (for predict and pseudo-labels)."""
    config: InstanceConfig = run.config
    held = held_out_instances(run.dataset, config, progress=lambda n: run.say(f"predicted {n} held-out images"))
    types = list(run.dataset.defect_types)
    predicted = [[detected_instance(d, types) for d in image] for image in held.instances]
    metrics = instance_metrics(held.samples, predicted, types)
    labels = np.array([s.label for s in held.samples])
    per_fold_metrics = per_fold(held.samples, predicted, held.scores, held.folds, types)
    spread = {key: {"mean": float(np.mean([f[key] for f in per_fold_metrics])),
                    "std": float(np.std([f[key] for f in per_fold_metrics], ddof=1))} for key in per_fold_metrics[0]}
    summary = {"image_auroc": image_auroc(labels, held.scores), **metrics["overall"]}
    write_json(run.folder / "predictions.json", {
        "types": types, "folds": held.folds, "scores": held.scores.tolist(),
        "images": [{"path": str(s.path), "detections": [{k: v for k, v in d.to_dict().items() if k != "mask"} for d in image]}
                   for s, image in zip(held.samples, held.instances)]})
    final = _final_model(run)
    return {"fit_s": held.fit_seconds / config.folds, "infer_ms": held.infer_ms, "summary": summary,
            "metrics": {**summary, "per_type": metrics, "folds": per_fold_metrics}, "spread": spread,
            "config": final.config.to_dict()}


def _final_model(run: AttemptRun) -> MapModel:
    """A mask model's model file, trained on every labelled image through the pipeline (for predict, serve and
    pseudo-labels); the attempt is judged by its k-fold held-out predictions, never by this model."""
    run.say("training the model file on every labelled image")
    epochs = lambda epoch, total, loss, _: run.say(f"epoch {epoch}/{total} train loss {loss:.4f}")  # noqa: E731
    final = fit_detector(run.dataset, run.model, run.config, epoch_progress=epochs)[0]
    save_model(final, run.folder / "model.dsmodel", force=True)
    return final


def run_segmenter(run: AttemptRun) -> dict[str, Any]:
    """Mask-supervised segmenter: k-fold held-out maps, image and pixel metrics."""
    config: SegmenterConfig = run.config
    start = time.perf_counter()
    maps, folds, infer_ms = held_out_maps(run.dataset, config, progress=lambda n: run.say(f"scored {n} held-out images"))
    fit_s = time.perf_counter() - start - infer_ms * len(maps) / 1000
    masks = masks_in_frame([s.mask for s in run.dataset.test], Segmenter(config).preprocess)
    labels = np.array([s.label for s in run.dataset.test])
    summary = {"image_auroc": image_auroc(labels, maps.max(axis=(1, 2))), **pixel_metrics(masks, maps)}
    _final_model(run)
    return {"fit_s": fit_s, "infer_ms": infer_ms, "metrics": {**summary, "folds": folds}, "summary": summary,
            "config": config.to_dict()}


@dataclass(frozen=True)
class AttemptKind:
    """A model kind: the config class of a model name, and how an attempt of it runs."""

    config_class: Callable[[str], type[Settings]]
    run: Callable[[AttemptRun], dict[str, Any]]


def _map_model_config(model: str) -> type[Settings]:
    return detector_class(model).config_class


KINDS: dict[str, AttemptKind] = {
    "good_only": AttemptKind(_map_model_config, run_detector),
    "masks": AttemptKind(_map_model_config, run_segmenter),
    "instances": AttemptKind(_map_model_config, run_instances),
    CLASSIFIER: AttemptKind(lambda _model: ClassifierConfig, run_classifier),
}


def attempt_kind(model: str) -> AttemptKind:
    """The kind of a model name: the classifier, or a registered map model's `kind`."""
    if model == CLASSIFIER:
        return KINDS[CLASSIFIER]
    if model not in MODULES:
        raise DefectscopeError(f"unknown model '{model}'; choose one of: {', '.join(sorted([*MODULES, CLASSIFIER]))}")
    return KINDS[detector_class(model).kind]


def attempt_config(model: str, settings: dict[str, Any]) -> Settings:
    """The checked config of an attempt (raises naming the field)."""
    return attempt_kind(model).config_class(model).from_dict(settings)
