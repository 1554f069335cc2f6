"""Map models (predict scores and maps; registry by name) and the good-only `Detector` that fits on good images.

`MapModel` holds everything a fitted model does at prediction time. Its kinds differ in how they
learn: `Detector` (this module) from good images alone, `Segmenter` (segmenter.py) from masks.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from defectscope.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, load_backbone
from defectscope.data.batches import iterate_batches
from defectscope.data.decode import ImageSource, image_size
from defectscope.data.frame import Preprocess, frame_aspect, other_shapes
from defectscope.data.images import normalize
from defectscope.errors import DataWarning, DefectscopeError, SettingsError
from defectscope.maps import finishing_matrix
from defectscope.names import few
from defectscope.prediction import Prediction, Scored, predict_frames
from defectscope.process import release_free_heap
from defectscope.settings import FrameConfig, Settings, require_choice, require_range
from defectscope.thresholds import (
    DEFAULT_FALSE_ALARM_RATE,
    GOOD_ONLY_METHODS,
    Calibration,
    calibrate,
    with_map_level,
)
from defectscope.progress import PhaseStart, Progress
from defectscope.training.engine import EpochProgress, History

CALIBRATION_LIMIT = 500  # cross-fitted good scores kept at most


@dataclass
class DetectorConfig(FrameConfig):
    """Frame and threshold settings shared by every map model; subclasses add their own fields."""

    keep_aspect: bool = True  # the frame takes the training images' aspect ratio instead of squashing them square
    calibration_folds: int = 20  # cross-fitting: each good image is scored by a model fitted without its fold
    threshold_method: str = "false_alarm_rate"
    threshold_param: float = DEFAULT_FALSE_ALARM_RATE  # the rate; or k of mean + k*std ('sigma'); or a percentile

    def check(self) -> None:
        super().check()
        require_range("calibration_folds", self.calibration_folds, 2)
        require_choice("threshold_method", self.threshold_method, GOOD_ONLY_METHODS)
        if self.threshold_method == "false_alarm_rate":
            require_range("threshold_param", self.threshold_param, 0, 1, low_open=True, high_open=True)
        elif self.threshold_method == "percentile":
            require_range("threshold_param", self.threshold_param, 0, 100, low_open=True)
        else:
            require_range("threshold_param", self.threshold_param, 0)


@dataclass
class FitReport:
    """What fitting did: image counts, calibration, seconds."""

    train_images: int
    calibration_images: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class MapModel(ABC):
    """A fitted model that scores images and (if it `localizes`) maps them; subclasses learn in their own way."""

    name: ClassVar[str]
    kind: ClassVar[str]  # how the model learns: "good_only" or "masks"; experiments dispatch on it
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    localizes: ClassVar[bool] = True
    uses_backbone: ClassVar[bool] = True
    strides: tuple[int, ...] = (8, 16)
    epoch_progress: EpochProgress | None = None  # trained models report each epoch here
    phases: PhaseStart | None = None  # fit reports its phases (learning, coreset, calibration) here
    history: History | None = None  # trained models: the loss history of the last fit
    calibration_scores: torch.Tensor | None = None  # good images' scores from models that never saw them
    map_scores: torch.Tensor | None = None  # with a map region level of its own: those scores of the view the map shows
    train_digests: np.ndarray | None = None  # sha256 of each image it learned from (N x 32 uint8): known again later

    def __init__(self, config: DetectorConfig | None = None, backbone: Backbone | None = None) -> None:
        self.config = config or self.config_class()
        self.config.check()
        self.backbone = backbone
        self.calibration: Calibration | None = None
        self.train_summary: dict[str, Any] = {}
        self.aspect = 1.0  # frame height / width, learned from the training images when config.keep_aspect

    # -- hooks -----------------------------------------------------------------------------
    @abstractmethod
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalized images N x 3 x s x s -> per-image features used by fit and score."""

    @abstractmethod
    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Image scores N (None: the maximum of the finished map) and raw maps N x h x w (None if image-level)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned, as named tensors for the model file."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `tensors` returned."""

    def graph_scores(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`score_features` as traced into the exported graph (`deployment.export_model`); a model whose
        scoring has no fixed graph searches outside it (`searched_memory`) or refuses here."""
        return self.score_features(features)

    @property
    def label_types(self) -> list[str] | None:
        """The defect types its predictions carry (models that tell types apart), else None."""
        return None

    def searched_memory(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A memory bank (and its cluster offsets) that an export searches outside its graph, between
        `searched_outputs` and `score_searched` (PatchCore); None: the whole scoring is one graph."""
        return None

    def mean_loss(self, images: Sequence[ImageSource]) -> float | None:
        """The training objective on other images, for models trained by a loss; None for the others."""
        return None

    # -- shared machinery --------------------------------------------------------------------
    def phase(self, name: str, total: int | None = None) -> Progress:
        """Start a named phase of the fit (a new progress bar where one is shown); returns its advance callback."""
        return self.phases(name, total) if self.phases is not None else (lambda _steps: None)

    @property
    def preprocess(self) -> Preprocess:
        backbone = self.require_backbone() if self.uses_backbone else None
        mean, std = (backbone.mean, backbone.std) if backbone else (IMAGENET_MEAN, IMAGENET_STD)
        return Preprocess(self.config.image_size, self.config.crop, mean, std, self.aspect)

    @property
    def backbone_name(self) -> str:
        return self.config.backbone

    def learn_aspect(self, images: Sequence[ImageSource]) -> None:
        """Take the frame's aspect from the training images' sizes (headers only), if config.keep_aspect; training
        images of another shape than the rest are said (a `DataWarning`): one frame squashes them."""
        sizes = [image_size(image) for image in images]
        self.aspect = frame_aspect(sizes) if self.config.keep_aspect else 1.0
        odd = other_shapes(sizes)
        if odd:
            shapes = few([f"{width}x{height} ({count})" for (height, width), count in odd.most_common()])
            warnings.warn(f"{sum(odd.values())} of the {len(sizes)} training images have another shape than the rest "
                          f"({shapes}; width x height): every image is resized to one frame, which squashes theirs; "
                          "learn from images of one product and camera setup", DataWarning)

    def require_backbone(self) -> Backbone:
        if self.backbone is None:
            self.backbone = load_backbone(self.config.backbone, self.strides)
        return self.backbone

    def _embedded_batches(self, images: Sequence[ImageSource], progress: Progress | None,
                          embed: Callable[[torch.Tensor], Any] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (features, original sizes N x 2) batch by batch, in inference mode (`embed`: default `self.embed`)."""
        preprocess, embed = self.preprocess, embed or self.embed
        with torch.inference_mode():
            for batch, sizes in iterate_batches(images, preprocess, self.config.batch_size):
                yield embed(normalize(torch.from_numpy(batch), preprocess)), torch.from_numpy(sizes)
                if progress:
                    progress(len(batch))

    def _score_and_map(self, features: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """Image scores and model-frame maps (smoothed) for a batch of features."""
        return self._finish(*self.score_features(features))

    def _finish(self, scores: torch.Tensor | None, grid: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray | None]:
        """What score_features returned -> image scores and model-frame maps (`finish_scores`)."""
        scores, frame = finish_scores(scores, grid, self.preprocess.input_shape)
        return scores, None if frame is None else frame.numpy()

    def predict(self, images: Sequence[ImageSource], map_size: str | tuple[int, int] = "original",
                progress: Progress | None = None, keep_going: bool = False) -> Prediction:
        """Score images; maps at each image's original size, the model frame ('input') or (H, W).

        An unreadable image stops the call, or with `keep_going` gets score NaN, map None and its reason.
        """
        threshold = self.calibration.threshold if self.calibration else None
        with torch.inference_mode():
            return predict_frames(images, self.preprocess, self.config.batch_size, self.score_frames, threshold,
                                  self.localizes, map_size, keep_going, progress)

    @torch.inference_mode()
    def score_frames(self, batch: np.ndarray) -> Scored:
        """uint8 frames N x 3 x h x w -> image scores and model-frame maps (None for image-level models)."""
        scores, frame = self._score_and_map(self.embed(normalize(torch.from_numpy(batch), self.preprocess)))
        return Scored(scores.numpy(), frame)


class MaskModel(MapModel):
    """A map model that learns from masks: its learned state is one trained network, which `build` makes
    (frozen pretrained parts come from the backbone file, not the model file)."""

    network: nn.Module | None = None

    @abstractmethod
    def build(self) -> nn.Module:
        """A fresh network for this config (pretrained parts loaded and frozen as configured)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return learned_state(self.network) if self.network is not None else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network = self.build()
        load_learned_state(self.network, tensors, self.name)


class Detector(MapModel):
    """Learns from good images only: `fit` embeds them, learns, and calibrates the threshold on a held-out part."""

    kind = "good_only"
    min_images = 2  # good images a fit needs: models that refit per calibration fold need two besides the fold's own

    @abstractmethod
    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        """Learn from the features of good images; returns details for the fit report."""

    def _features(self, images: Sequence[ImageSource], progress: Progress | None,
                  embed: Callable[[torch.Tensor], Any] | None = None, known: Embedded | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed all images; returns (features, original sizes N x 2), filled batch by batch into one tensor. The
        images `known` holds (embedded before, the same numbers) are filled in from it, not embedded again."""
        features, sizes = None, torch.empty(len(images), 2, dtype=torch.long)
        todo = torch.arange(len(images))
        if known is not None:
            features, todo = _room(known.features, len(images)), todo[rows_outside(len(images), known.positions)]
            features[known.positions], sizes[known.positions] = known.features, known.sizes
            if progress:
                progress(len(known.positions))
        filled = 0
        for batch, batch_sizes in self._embedded_batches([images[i] for i in todo.tolist()], progress, embed):
            if features is None:
                features = _room(batch, len(images))
            rows = todo[filled : filled + len(batch)]
            features[rows], sizes[rows] = batch, batch_sizes
            filled += len(batch)
        return features, sizes

    def learning_features(self, images: Sequence[ImageSource], progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The features `fit` learns from: `_features`, unless a model learns more than it scores."""
        return self._features(images, progress)

    def fit(self, images: Sequence[ImageSource], progress: Progress | None = None) -> FitReport:
        """Fit on all good images, then set the threshold from cross-fitted scores (each from a model that never saw it)."""
        if len(images) < self.min_images:
            raise DefectscopeError(f"{self.name} needs at least {self.min_images} good images to fit and calibrate, got "
                                   f"{len(images)}")
        start = time.perf_counter()
        torch.manual_seed(self.config.seed)
        self.learn_aspect(images)
        features, sizes = self.learning_features(images, progress)
        release_free_heap()  # the passes' activations (and features embedded before, now copied in), freed
        count = len(images)
        embedded = time.perf_counter()
        self.phase(f"learning from {count} images")
        with torch.no_grad():
            details = self.fit_features(features)
        require_finite(self.tensors(), f"{self.name} learned")
        learned = time.perf_counter()
        with torch.inference_mode():
            scored, scores = self.crossfit_scores(features)
        details["seconds"] = {"embed": embedded - start, "learn": learned - embedded, "calibrate": time.perf_counter() - learned}
        require_finite({"calibration scores": scores}, f"{self.name} calibration gave")
        self.calibration_scores = scores
        self.calibration = calibrate(scores.numpy(), self.config.threshold_method, self.config.threshold_param)
        heights, widths = sizes[:, 0], sizes[:, 1]
        self.train_summary = {
            "images": count,
            "calibration_images": len(scored),
            "calibration_folds": len(self.calibration_folds(count)),
            "height_range": [int(heights.min()), int(heights.max())],
            "width_range": [int(widths.min()), int(widths.max())],
            "fit": details,
        }
        return FitReport(count, len(scored), time.perf_counter() - start, details)

    def check_teachable(self) -> None:
        """Raise unless `teach` can run on this fitted model (asked before any image is scored)."""
        raise DefectscopeError(f"{self.name} cannot learn new good images without a refit: fit it again with those "
                               "images added to the training folder")

    def teach(self, images: Sequence[ImageSource], progress: Progress | None = None) -> dict[str, Any]:
        """Learn more good images without a refit, and recalibrate; models that cannot, say so."""
        self.check_teachable()
        raise NotImplementedError(f"{self.name} accepts teaching but does not implement it")

    def taught_calibration(self, taught_scores: torch.Tensor, taught_map_scores: torch.Tensor | None = None
                           ) -> Calibration:
        """The threshold restated with taught images' held-out scores added to the cross-fitted good scores (and the
        map's region level with their map view's scores added to its own, when the model keeps those).

        It never rises: teaching must not let through a defect that was caught. Old good scores stay
        valid upper bounds (the model only gained memory); if held-out taught images still score above
        the kept threshold, the calibration warns that more images like them are needed. A threshold chosen
        with labelled images (a target recall, F1, by hand) is kept as it is, and says so: no good-only rule
        replaces a choice made with labels.
        """
        if self.calibration_scores is None:
            raise DefectscopeError(f"this {self.name} model holds no cross-fitted good scores (fitted by an older "
                                   "version); fit it again")
        self.calibration_scores = torch.cat([self.calibration_scores, taught_scores.float()])
        if self.map_scores is not None and taught_map_scores is not None:
            self.map_scores = torch.cat([self.map_scores, taught_map_scores.float()])
        if self.calibration is not None and self.calibration.method not in GOOD_ONLY_METHODS:
            kept = (f"the threshold was chosen with labelled images ({self.calibration.method}) and is kept; its rates "
                    "are those of the model before teaching: calibrate again with labelled images to restate them")
            return replace(self.calibration, warning="; ".join(filter(None, (self.calibration.warning, kept))))
        known = self.calibration and self.calibration.method in GOOD_ONLY_METHODS
        method, param = ((self.calibration.method, self.calibration.param) if known
                         else (self.config.threshold_method, self.config.threshold_param))
        restated = calibrate(self.calibration_scores.numpy(), method, param)
        if self.calibration is None:
            return restated
        if restated.threshold <= self.calibration.threshold:
            kept = self.calibration.map_threshold  # the map's level never rises either
            level = with_map_level(restated, None if self.map_scores is None else self.map_scores.numpy()).map_threshold
            return replace(restated, map_threshold=kept if level is None or kept is None else min(level, kept))
        above = int((taught_scores > self.calibration.threshold).sum())
        warning = (f"{above} of {len(taught_scores)} taught images still score above the threshold when held out; "
                   "teach more images like them") if above else None
        return replace(self.calibration, warning=warning)

    def calibration_folds(self, count: int) -> list[torch.Tensor]:
        """The seeded folds of `count` training images for cross-fitting (leave-one-out below calibration_folds)."""
        order = torch.from_numpy(np.random.default_rng(self.config.seed).permutation(count))
        folds = min(self.config.calibration_folds, count)
        return [order[k::folds].sort().values for k in range(folds)]

    def crossfit_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images scored, their scores): every fold's images scored by a model fitted on the other folds.

        At most CALIBRATION_LIMIT images are scored in all (a seeded share of each fold): enough for any
        stated rate down to about 1/CALIBRATION_LIMIT, and scoring stays linear in the number of images.
        """
        folds, scored = self.crossfit_rows(len(features))
        return torch.cat(scored), self.fold_scores(features, folds, scored)

    def fold_scores(self, features: torch.Tensor, folds: list[torch.Tensor], scored: list[torch.Tensor]) -> torch.Tensor:
        """The cross-fitted scores, fold after fold (`holdout_scores`), as the calibration phase."""
        advance, scores = self.phase(f"calibrating on {len(folds)} cross-fitted folds", len(folds)), []
        for held, chosen in zip(folds, scored):
            scores.append(self.holdout_scores(features, held, chosen))
            advance(1)
        return torch.cat(scores).float()

    def crossfit_rows(self, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the calibration folds, the images scored of each: a seeded share, CALIBRATION_LIMIT in all)."""
        folds = self.calibration_folds(count)
        per_fold = math.ceil(CALIBRATION_LIMIT / len(folds))
        generator = torch.Generator().manual_seed(self.config.seed)
        return folds, [held[torch.randperm(len(held), generator=generator)[:per_fold]].sort().values for held in folds]

    def holdout_scores(self, features: torch.Tensor, holdout: torch.Tensor, scored: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Scores of images `scored` (default: the held-out ones) from a model that did not learn `holdout`.

        By default a temporary model is fitted on the other images; the fitted state is then restored.
        """
        fitted = self.tensors()
        self.fit_features(features[rows_outside(len(features), holdout)])
        scores = self._score_and_map(features[holdout if scored is None else scored])[0]
        self.load_tensors(fitted)
        return scores


@dataclass
class Embedded:
    """Features of some of the images a model is about to fit, embedded before in its frame (the frame search's fit
    images): their positions among those images, the features, and their original sizes N x 2."""

    positions: torch.Tensor
    features: Any
    sizes: torch.Tensor


def _room(like: Any, count: int) -> Any:
    """Room for `count` images' features of the kind `like` holds: a tensor, or a model's own kind (`empty(count)`)."""
    if isinstance(like, torch.Tensor):
        return torch.empty((count, *like.shape[1:]), dtype=like.dtype)
    return like.empty(count)


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise if any floating-point tensor holds NaN or infinity (e.g. training diverged)."""
    bad = [name for name, t in tensors.items() if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DefectscopeError(f"{what} values that are not finite numbers ({', '.join(bad[:3])}): training diverged; "
                               "lower the learning rate or check the images; nothing was written")


def rows_outside(count: int, held: torch.Tensor) -> torch.Tensor:
    """Boolean mask over `count` rows: True for every row not in `held`."""
    mask = torch.ones(count, dtype=torch.bool)
    mask[held] = False
    return mask


def finish_maps(grid: torch.Tensor, input_shape: tuple[int, int]) -> torch.Tensor:
    """Feature-grid maps N x h x w -> model-frame maps: bilinear upsampling, then Gaussian smoothing (sigma 4),
    as one matrix per axis (rows @ grid @ cols.T): a few small GEMMs, in exported graphs too."""
    rows = torch.from_numpy(finishing_matrix(input_shape[0], int(grid.shape[1])))  # int(): a constant when traced
    cols = torch.from_numpy(finishing_matrix(input_shape[1], int(grid.shape[2])))
    return rows @ grid.float() @ cols.T


def finish_scores(scores: torch.Tensor | None, grid: torch.Tensor | None, input_shape: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image scores (the finished map's maximum where `scores` is None) and finished maps (None for image-level models)."""
    frame = None if grid is None else finish_maps(grid, input_shape)
    return (frame.amax(dim=(1, 2)) if scores is None else scores.float()), frame


def learned_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """A trained network's state without its frozen parameters (pretrained weights come from the backbone file)."""
    frozen = {k for k, p in network.named_parameters() if not p.requires_grad}
    return {k: v for k, v in network.state_dict().items() if k not in frozen}


def load_learned_state(network: nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Put `learned_state` back into a freshly built network, whose frozen parts already hold their weights."""
    frozen = {k for k, p in network.named_parameters() if not p.requires_grad}
    missing, unexpected = network.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise DefectscopeError(f"model tensors do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    network.eval()


DETECTORS: dict[str, type[MapModel]] = {}  # every map model imported so far, by name
# The module (in this package) defining each map model: imported when the model is first asked for, so that loading a
# PatchCore file never imports what only other models need (scikit-learn, torchvision's detection models).
MODULES = {"patchcore": "patchcore", "padim": "padim", "knn": "embedding", "pca": "embedding", "ocsvm": "embedding",
           "autoencoder": "reconstruction", "augmented_autoencoder": "reconstruction",
           "pretrained_autoencoder": "reconstruction", "vae": "reconstruction", "segmenter": "segmenter",
           "detector": "instances"}


def register(cls: type[MapModel]) -> type[MapModel]:
    """Class decorator adding a map model to the registry under its `name`."""
    DETECTORS[cls.name] = cls
    return cls


def detector_class(name: str) -> type[MapModel]:
    """The map model of this registry name (its module imported on first use)."""
    if name not in MODULES:
        raise DefectscopeError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODULES))}")
    importlib.import_module(f"{__package__}.{MODULES[name]}")
    return DETECTORS[name]


def all_detectors() -> dict[str, type[MapModel]]:
    """Every map model by name (all their modules imported)."""
    return {name: detector_class(name) for name in sorted(MODULES)}


def good_only_models() -> list[str]:
    """Names of the models `fit` can learn from good images alone."""
    return sorted(name for name, cls in all_detectors().items() if issubclass(cls, Detector))


def detector_config(name: str, settings: Mapping[str, Any] | Settings) -> Settings:
    """The checked config of model `name`: built from a mapping of its fields, or a config of its class checked again."""
    config_class = detector_class(name).config_class
    if not isinstance(settings, Settings):
        return config_class.from_dict(dict(settings))
    if type(settings) is not config_class:
        raise SettingsError(f"{name} takes a {config_class.__name__}, got a {type(settings).__name__}")
    settings.check()
    return settings


def create_detector(name: str, config: Settings | None = None, **settings: Any) -> MapModel:
    """A new map model by registry name, from its config or from config fields given as keywords (checked)."""
    if config is not None and settings:
        raise SettingsError("give a config or config fields as keywords, not both")
    return detector_class(name)(detector_config(name, settings if config is None else config))
