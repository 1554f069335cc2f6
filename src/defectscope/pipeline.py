"""The one path every caller takes: fit -> save, load -> predict -> write outputs, evaluate -> report, demo.

The CLI, the benchmarks and future services call these functions and only parse, call and render.
Outputs are checked before any work: a model file replaces only a model file, an output folder is
new, empty or one defectscope made (`files.claim_folder`), unless the caller passes `force`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.artifacts import (
    check_model_output,
    load_model,
    save_model,
    set_threshold,
)
from defectscope.backbones import load_backbone
from defectscope.data.decode import ImageSource, content_digests, expand_inputs, learned_among
from defectscope.data.folds import pick_good
from defectscope.data.layout import Dataset, Sample, load_dataset, require_masks
from defectscope.data.synthetic import make_demo_dataset
from defectscope.detectors.base import (
    Detector,
    FitReport,
    MapModel,
    PhaseStart,
    Progress,
    create_detector,
    detector_config,
)
from defectscope.detectors.frame_search import CANDIDATES, FRAME_FIELDS, choose_frame
from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import DataWarning, DefectscopeError, InputError
from defectscope.evaluation import Evaluation, evaluate
from defectscope.files import check_apart, claim_folder, file_sha256, folder_kind
from defectscope.jobs import RayCluster, connect_ray, map_on_ray
from defectscope.names import DEFECT_LIKE, few
from defectscope.prediction import prediction_rows
from defectscope.process import release_free_heap
from defectscope.predictor import Predictor
from defectscope.reports import provenance, remove_overlays, write_report
from defectscope.settings import Settings
from defectscope.thresholds import (
    Calibration,
    calibrate,
    f1_calibration,
    labelled_calibration,
    recall_threshold,
    with_map_level,
)
from defectscope.progress import ProgressBar, no_progress
from defectscope.training.engine import EpochProgress
from defectscope.versions import check_unchanged, keeping_replaced
from defectscope.viz import write_heatmaps

@contextmanager
def phases(bar: ProgressBar) -> Iterator[PhaseStart]:
    """Successive progress bars for the phases of one job: starting a phase ends the bar of the one before."""
    with ExitStack() as stack:
        def start(name: str, total: int | None = None) -> Progress:
            stack.close()
            return stack.enter_context(bar(name, total))

        yield start


@dataclass
class Fitted:
    """A fitted model with the dataset it learned from, its fit report and the model file written."""

    dataset: Dataset
    detector: MapModel
    report: FitReport
    path: Path | None


def mask_training_set(dataset: Dataset, config: Any) -> list[Sample]:
    """What a mask model learns from: every labelled test image (defects with their masks) and `good_train` good
    training images (a seeded choice)."""
    if not any(s.label and s.mask is not None for s in dataset.test):
        raise InputError(f"{dataset.root} has no defective test images with masks; a mask model learns from them")
    require_masks(dataset.test, "a mask model")
    return [*dataset.test, *pick_good(dataset.train, config.good_train, config.seed)]


def fit_detector(dataset: Dataset, model: str, settings: Mapping[str, Any] | Settings, weights: Path | None = None,
                 download: bool = False, bar: ProgressBar = no_progress,
                 epoch_progress: EpochProgress | None = None, ray_address: str | RayCluster | None = None,
                 images: Sequence[ImageSource] | None = None) -> tuple[MapModel, FitReport]:
    """Build a model from its config (or a mapping of config fields) and fit it: a good-only detector on the good
    training images, a mask model (segmenter, instance detector) on the labelled images and their masks
    (`mask_training_set`). PatchCore chooses its frame unless the config was given a frame field.

    With `ray_address`, PatchCore's shard coresets run as Ray tasks (the same bank as here, bit for bit).
    `images` are the training images in `dataset.train`'s order when they come as bytes (read on another machine).
    """
    config = detector_config(model, settings)
    detector = create_detector(model, config)
    if weights is not None or download:
        detector.backbone = load_backbone(detector.config.backbone, detector.strides, weights, download)
    if ray_address is not None and not isinstance(detector, PatchCore):
        raise DefectscopeError(f"--ray spreads PatchCore's coreset shards; {model} fits in this process")
    if ray_address is not None:
        connect_ray(ray_address)  # before any work: a cluster that is not there is said at once
    detector.epoch_progress = epoch_progress
    if not isinstance(detector, Detector):
        samples = mask_training_set(dataset, detector.config)
        start = time.perf_counter()
        with bar(f"training {model} on {len(samples)} labelled images", len(samples)):
            history = detector.fit_masks(samples, dataset.defect_types)
        detector.train_digests = content_digests([s.path for s in samples])
        return detector, FitReport(len(samples), 0, time.perf_counter() - start, {"history": history})
    train = list(images) if images is not None else [s.path for s in dataset.train]
    frame_choice, began = None, time.perf_counter()
    if isinstance(detector, PatchCore) and detector.config.frame_search:
        if config.given & set(FRAME_FIELDS):
            frame_choice = {"chosen": None, "reason": "pinned by the settings"}
        else:
            detector, frame_choice = _frame_chosen(detector, train, bar)
            detector.epoch_progress = epoch_progress
            release_free_heap()  # the search's candidates and probe, freed: the fit starts from a trimmed heap
    if ray_address is not None:
        detector.map_shards = map_on_ray(ray_address, torch.get_num_threads())
    with phases(bar) as start:
        detector.phases = start
        report = detector.fit(train, progress=start(f"fitting {model}: embedding {len(train)} images", len(train)))
    detector.phases = None
    detector.train_digests = content_digests(train)
    if images is None:  # given images were read elsewhere (a Ray node: `fit_many.with_images` checks them there)
        warn_defects_learned([(str(path), row.tobytes().hex()) for path, row in zip(train, detector.train_digests)],
                             dataset)
    if frame_choice is not None:
        detector.train_summary["frame_choice"] = frame_choice
        report.details["frame_choice"] = frame_choice
    return detector, replace(report, seconds=time.perf_counter() - began)  # the frame search included


def warn_defects_learned(learned: Sequence[tuple[str, str]], dataset: Dataset) -> None:
    """Warn (`DataWarning`) when an image learned as good ((name, sha256) pairs) is a copy of one of the dataset's
    defective images: the model learned that defect as good (the dataset's summary says so before a fit; a fit too)."""
    defective = {file_sha256(s.path): s.path for s in dataset.samples if s.label == 1}
    copies = [f"{name} = {defective[digest]}" for name, digest in learned if digest in defective]
    if copies:
        warnings.warn(f"{len(copies)} of the good images learned are copies of defective images ({few(copies)}): the "
                      "model learned their defects as good, and parts like them may pass; take them out of the "
                      "training images and fit again", DataWarning)


def _frame_chosen(detector: PatchCore, train: Sequence[ImageSource], bar: ProgressBar) -> tuple[PatchCore, dict]:
    """A new PatchCore in the frame (and turns) chosen from `train` by the frame search, with its probe when the model
    uses it (the global view's choice), and the search's evidence. The search's images and features end here unless
    the model holds them."""
    config, backbone = detector.config, detector.require_backbone()
    steps = len(CANDIDATES) + (config.rotations == "auto")  # then the turns, at the chosen frame
    with bar(f"choosing the frame among {len(CANDIDATES)} candidates", steps) as advance:
        choice = choose_frame(train, config, backbone, advance)
    chosen = create_detector(detector.name, replace(config, **choice.settings))  # the registered kind it was
    chosen.backbone = backbone
    if choice.probe is not None and chosen.uses_global_view:
        chosen.use_probe(choice.probe, choice.defective, choice.preprocess)
    if choice.fit is not None:
        chosen.use_embedded(choice.fit, *choice.fit_frame)
    return chosen, choice.evidence


def fit_model(data: Path | Dataset, model: str, settings: Mapping[str, Any] | Settings, out: Path, *,
              weights: Path | None = None, download: bool = False, force: bool = False, bar: ProgressBar = no_progress,
              fingerprint: str | None = None, ray_address: str | RayCluster | None = None,
              images: Sequence[ImageSource] | None = None) -> Fitted:
    """Check the output, load the dataset (or take it loaded), fit, and save the model file (nothing is written if
    fitting fails).

    `fingerprint` (of the data and settings, see `scale.plan`) is recorded in the training summary; `images`: see
    `fit_detector`.
    """
    check_model_output(out, force)
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    detector, report = fit_detector(dataset, model, settings, weights, download, bar, ray_address=ray_address,
                                    images=images)
    if fingerprint is not None:
        detector.train_summary["fingerprint"] = fingerprint
    with keeping_replaced(out, "fit"):
        save_model(detector, out, force)
    return Fitted(dataset, detector, report, out)


def predict_images(detector: Predictor, inputs: Sequence[Path], heatmaps: Path | None = None, force: bool = False,
                   bar: ProgressBar = no_progress, skipped: list[Path] | None = None) -> list[dict[str, Any]]:
    """Score images and folders of images; unreadable ones get verdict 'error'; heatmap overlays on request; the
    folders' files not named as images go into `skipped`, when given."""
    if heatmaps is not None:
        if not detector.localizes:
            raise DefectscopeError(f"{detector.name} scores whole images and makes no maps; drop --heatmaps")
        for source in inputs:
            check_apart(heatmaps, source, "heatmaps folder", "input")
        claim_folder(heatmaps, force, "heatmaps")
    paths = expand_inputs(inputs, skipped)
    with bar("scoring", len(paths)) as advance:
        prediction = detector.predict(paths, progress=advance, keep_going=True)
    rows = prediction_rows(paths, prediction)
    if heatmaps is not None:
        written = write_heatmaps(paths, prediction, detector.preprocess, heatmaps)
        for row, target in zip(rows, written):
            if target is not None:
                row["heatmap"] = str(target)
    return rows


def evaluate_model(detector: Predictor, dataset: Dataset, out: Path | None = None, force: bool = False,
                   bar: ProgressBar = no_progress, context: tuple[str, ...] = (), model_file: Path | None = None,
                   model_sha256: str | None = None) -> tuple[Evaluation, list[Path]]:
    """Every metric on the dataset's test split; with `out`, the report (`reports.write_report`; `context`: lines
    said under its title), which records what it was made of (`reports.provenance`: `model_file` and the sha256 it
    was loaded as, the test set)."""
    if out is not None:
        check_apart(out, dataset.root, "report folder", "dataset")
        claim_folder(out, force, "evaluation report")
    with bar("evaluating", len(dataset.test)) as advance:
        evaluation = evaluate(detector, dataset, progress=advance)
    if out is None:
        return evaluation, []
    made_of = provenance(detector, dataset.root, [sample.path for sample in dataset.test], model_file, model_sha256)
    return evaluation, write_report(evaluation, detector, out, dataset.root.name, context, made_of=made_of)


def recalibrate(model_path: Path, out: Path, *, false_alarm_rate: float | None = None,
                good: Sequence[Path] = (), defective: Sequence[Path] = (), target_recall: float | None = None,
                f1: bool = False, margin: float = 0.0, weights: Path | None = None, force: bool = False,
                bar: ProgressBar = no_progress) -> Calibration:
    """Write a copy of a model with a new threshold: a stated false-alarm rate (from the model's own cross-fitted
    good scores), or, from labelled images, a target recall or the best F1 (moved down by `margin`, see
    `labelled_calibration`) - with the uncertainty they leave."""
    labelled = bool(good or defective)
    if (false_alarm_rate is not None) == labelled or (labelled and (target_recall is None) == (not f1)):
        raise DefectscopeError("give either --false-alarm-rate, or --good and --defective images with one of "
                               "--target-recall or --f1")
    if labelled and not (good and defective):
        raise DefectscopeError("a threshold from labelled images needs both --good and --defective images")
    if margin and not labelled:
        raise DefectscopeError("--margin applies to a threshold chosen with labelled images (--good, --defective)")
    if out != model_path:
        check_model_output(out, force)
    read_as = file_sha256(Path(model_path))  # a write in place is refused if the file changes meanwhile
    detector = load_model(model_path, weights)
    if false_alarm_rate is not None:
        if detector.calibration_scores is None:
            raise DefectscopeError(f"{model_path} holds no cross-fitted good scores (fitted by an older version); "
                                   "fit it again, or calibrate with labelled images")
        calibration = with_map_level(calibrate(detector.calibration_scores.numpy(), "false_alarm_rate", false_alarm_rate),
                                     None if detector.map_scores is None else detector.map_scores.numpy())
    else:
        good_paths, bad_paths = expand_inputs(good), expand_inputs(defective)
        bad_digests = {file_sha256(path) for path in bad_paths}
        both = [str(path) for path in good_paths if file_sha256(path) in bad_digests]
        if both:
            raise DefectscopeError(f"{len(both)} image(s) are given both as good and as defective ({few(both)}); each labelled image must be one or the other")
        learned = [str(path) for path in learned_among(detector.train_digests, [*good_paths, *bad_paths])]
        if learned:
            raise DefectscopeError(f"{len(learned)} labelled image(s) are images this model learned from "
                                   f"({few(learned)}); their scores say nothing of new parts: give images it never saw")
        with bar("scoring labelled images", len(good_paths) + len(bad_paths)) as advance:
            scores = detector.predict([*good_paths, *bad_paths], map_size="input", progress=advance).scores
        good_scores, bad_scores = scores[: len(good_paths)], scores[len(good_paths) :]
        if f1:
            labels = np.r_[np.zeros(len(good_scores)), np.ones(len(bad_scores))]
            calibration = f1_calibration(labels, np.r_[good_scores, bad_scores], detector.calibration, margin)
        else:
            threshold = recall_threshold(bad_scores, target_recall)
            calibration = labelled_calibration(good_scores, bad_scores, threshold, "recall", target_recall,
                                               detector.calibration, margin)
    with keeping_replaced(out, "calibrate", model_path, read_as):
        set_threshold(model_path, calibration, out, force=True)
    return calibration


def _labelled_defects(defective: Sequence[Path], check: Path | None) -> list[Path]:
    """Images known to be defective: those given, and the defective test images of the dataset `check`."""
    known = expand_inputs(defective) if defective else []
    if check is not None:
        known += [Path(s.path) for s in load_dataset(check).test if s.label == 1]
    return known


def _defect_like(detector: MapModel, taught: list[Path], defects: list[Path], accept_defect_like: bool,
                 bar: ProgressBar) -> int:
    """Raise if an image to teach is labelled defective, or scores defect-like (unless accepted); returns how many
    of them score defect-like."""
    defect_digests = {file_sha256(path) for path in defects}
    labelled = [str(path) for path in taught if file_sha256(path) in defect_digests]
    if labelled:
        raise DefectscopeError(f"{len(labelled)} of the images to teach are labelled defective ({few(labelled)}); a defect is never taught as good; nothing was written")
    with bar("scoring the images to teach", len(taught)) as advance:
        prediction = detector.predict(taught, map_size="input", progress=advance)
    if not np.isfinite(prediction.scores).all():
        raise DefectscopeError("some images to teach could not be scored (not a finite number); nothing was written")
    if prediction.threshold is None:
        return 0
    far = [f"{path.name} ({value:.2f}x)" for path, value in zip(taught, prediction.normalized) if value >= DEFECT_LIKE]
    if far and not accept_defect_like:
        raise DefectscopeError(
            f"{len(far)} of the images to teach score far above the threshold (>= {DEFECT_LIKE:g}x it: {few(far, 5)}); "
            "they look defective, and teaching them would let defects like them pass. "
            "Check them; if they really are good, pass --accept-defect-like; nothing was written")
    return len(far)


def _caught(detector: MapModel, images: list[Path], bar: ProgressBar, what: str) -> np.ndarray:
    """Which images the detector calls defective at its threshold (an unscored image counts as caught)."""
    if not images or detector.calibration is None:
        return np.zeros(len(images), bool)
    with bar(what, len(images)) as advance:
        prediction = detector.predict(images, map_size="input", progress=advance, keep_going=True)
    return ~(prediction.normalized < 1.0)


def update_model(model_path: Path, good: Sequence[Path], out: Path, *, defective: Sequence[Path] = (),
                 check: Path | None = None, accept_defect_like: bool = False, accept_misses: bool = False,
                 weights: Path | None = None, force: bool = False, bar: ProgressBar = no_progress,
                 action: str = "update", read_as: str | None = None) -> dict[str, Any]:
    """Teach a model more good images without a refit and write it to `out`; the new file names its parent and the images
    (and is recorded in `out`'s versions as `action`, see `versions.keeping_replaced`).

    Nothing is written when an image to teach is labelled defective (`defective`, or the defective test images of
    the dataset `check`), when one scores defect-like (unless `accept_defect_like`), or when a labelled defect the
    old model caught would pass the new one (unless `accept_misses`), or when the model file changed since it was
    read (`read_as`: the sha256 the caller knows it by, as the service serves it; default: the file's now).
    """
    if out != model_path:
        check_model_output(out, force)
    paths = expand_inputs(good)
    if not paths:
        raise DefectscopeError("give at least one good image to teach")
    defects = _labelled_defects(defective, check)
    read_as = read_as or file_sha256(Path(model_path))  # the parent; a write is refused if the file changes meanwhile
    check_unchanged(model_path, read_as, action)
    detector = load_model(model_path, weights)
    detector.check_teachable()
    learned = [str(path) for path in learned_among(detector.train_digests, paths)]
    if learned:  # its own bank scores them near zero: their "held-out" scores would pull the threshold down
        raise DefectscopeError(f"{len(learned)} of the images to teach are images this model learned from already "
                               f"({few(learned)}); they teach nothing new and their scores would flatter its "
                               "calibration; nothing was written")
    defect_like = _defect_like(detector, paths, defects, accept_defect_like, bar)
    caught_before = _caught(detector, defects, bar, "scoring labelled defects")
    with bar("learning good images", len(paths)) as advance:
        details = detector.teach(paths, progress=advance)
    if detector.train_digests is not None:
        detector.train_digests = np.concatenate([detector.train_digests, content_digests(paths)])
    missed = caught_before & ~_caught(detector, defects, bar, "checking labelled defects")
    if missed.any() and not accept_misses:
        names = [defects[i].name for i in np.flatnonzero(missed)[:5]]
        raise DefectscopeError(f"after teaching, {int(missed.sum())} labelled defect(s) the model caught would pass as good "
                               f"({', '.join(names)}{', ...' if missed.sum() > 5 else ''}); nothing was written. Teach "
                               "other images, or pass --accept-misses to write it anyway")
    details["parent_sha256"] = read_as
    details["taught_images"] = [str(p) for p in paths]
    details["checked_defects"], details["caught_before"] = len(defects), int(caught_before.sum())
    details["missed_after"] = int(missed.sum())
    warnings = [detector.calibration.warning] if detector.calibration and detector.calibration.warning else []
    if defect_like:
        warnings.append(f"{defect_like} taught image(s) scored >= {DEFECT_LIKE:g}x the threshold and were learned as good "
                        "at your request: defects that look like them may now pass")
    if missed.any():
        warnings.append(f"{int(missed.sum())} labelled defect(s) the old model caught now pass as good, at your request")
    if not defects:
        warnings.append("no labelled defects were checked (give --check DATA): nothing shows the update keeps every "
                        "caught defect caught")
    details["warning"] = "; ".join(warnings) or None
    detector.train_summary.setdefault("taught", []).append(details)
    with keeping_replaced(out, action, model_path, read_as):
        save_model(detector, out, force=True)
    return details


@dataclass
class DemoResult:
    data: Path
    fitted: Fitted
    evaluation: Evaluation
    written: list[Path]
    report: Path


def run_demo(out: Path, data: Path | None = None, model: str = "patchcore", force: bool = False,
             bar: ProgressBar = no_progress, say: Callable[[str], None] = lambda _text: None) -> DemoResult:
    """The main job end to end: (demo data,) fit, evaluate, heatmaps of one image per class, a short report."""
    if data is not None:
        check_apart(out, data, "demo output", "dataset")
    claim_folder(out, force, "demo output")
    if data is None:
        data = make_demo_dataset(out / "data", size=256)
        say(f"generated demo dataset in {data}")
    fitted = fit_model(data, model, {}, out / f"{model}.dsmodel", bar=bar)
    say(f"fitted {model} on {fitted.report.train_images} images in {fitted.report.seconds:.1f} s -> {fitted.path}")
    context = (f"data: {data}", f"model: {fitted.path} ({model}, fitted in {fitted.report.seconds:.1f} s on "
                                f"{fitted.report.train_images} good images)")
    evaluation, written = evaluate_model(fitted.detector, fitted.dataset, out / "report", bar=bar, context=context,
                                         model_file=fitted.path)
    first_of_each = {s.defect: s.path for s in reversed(fitted.dataset.test)}  # one image per class, good included
    heatmaps = out / "heatmaps"
    if heatmaps.is_dir() and folder_kind(heatmaps) == "heatmaps":  # an earlier demo's overlays are not this model's
        remove_overlays(heatmaps)
    if fitted.detector.localizes:
        predict_images(fitted.detector, [first_of_each[d] for d in sorted(first_of_each)], heatmaps=heatmaps, bar=bar)
    return DemoResult(data, fitted, evaluation, written, out / "report" / "report.html")

