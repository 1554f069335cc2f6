"""Stratified k-fold cross-validation of a supervised classifier; every labelled image is scored while held out.

The labelled pool is the test split (good and defective images). Each fold trains on the other
folds (optionally cut to `shots` images per defect class) plus `good_train` good training images
(all by default), and predicts its own images. `CrossValidation.usage` records which images trained and
which were scored in each fold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from defectscope.backbones import Backbone, load_backbone
from defectscope.classify.losses import ImbalanceLoss, sample_weights
from defectscope.classify.model import Classifier, ClassifierConfig, TailClassifier, trunk_maps
from defectscope.data.frame import Preprocess
from defectscope.data.images import load_normalized
from defectscope.data.folds import class_names, label_of, pick_good, stratified_folds
from defectscope.data.layout import Dataset, Sample
from defectscope.efficientnet_lite import EfficientNetLite
from defectscope.errors import DefectscopeError
from defectscope.settings import derived_seed
from defectscope.training.augment import augment
from defectscope.training.engine import train

FoldProgress = Callable[[str], None]


@dataclass
class CrossValidation:
    """Held-out predictions of every labelled image, and the bookkeeping behind them."""

    classes: list[str]
    records: list[dict]  # path, fold, true, predicted, probabilities
    usage: list[dict]  # per fold: trained_on, scored
    histories: list[dict]
    fit_seconds: float
    infer_ms: float
    train_counts: list[list[int]] = field(default_factory=list)  # per fold, images per class used to train

    def to_dict(self) -> dict:
        return {"classes": self.classes, "records": self.records, "usage": self.usage, "histories": self.histories,
                "fit_seconds": self.fit_seconds, "infer_ms": self.infer_ms, "train_counts": self.train_counts}


def keep_shots(indices: np.ndarray, labels: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """Indices kept for training: all good ones, and at most `shots` of each defect class (seeded)."""
    if shots is None:
        return indices
    rng = np.random.default_rng(seed)
    kept = [indices[labels[indices] == 0]]
    for cls in np.unique(labels[indices]):
        if cls:
            members = indices[labels[indices] == cls]
            kept.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(kept))


class InputCache:
    """The last network inputs computed, reused by the next cross-validation on the same images and frame.

    One experiment run holds one, so consecutive attempts that differ only in training settings share it.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: tuple[torch.Tensor, float] | None = None

    def inputs(self, samples: list[Sample], preprocess: Preprocess, backbone: Backbone, trunk: int | None
               ) -> tuple[torch.Tensor, float]:
        """Normalized images (N x 3 x s x s), or the frozen trunk's maps at stride `trunk`, and the seconds per
        image that took (decoding included)."""
        key = json.dumps([[str(s.path) for s in samples], preprocess.to_dict(), backbone.name, backbone.weights_sha256, trunk])
        if key != self.key or self.value is None:
            start = time.perf_counter()
            images = load_normalized([s.path for s in samples], preprocess)
            images = trunk_maps(backbone, trunk, images) if trunk else images
            self.key, self.value = key, (images, (time.perf_counter() - start) / len(samples))
        return self.value


class FoldModel:
    """One fold's network, loss and training; on images, or on the frozen trunk's cached maps."""

    def __init__(self, config: ClassifierConfig, classes: int, counts: torch.Tensor, preprocess: Preprocess,
                 cached: bool) -> None:
        self.config, self.preprocess = config, preprocess
        backbone = load_backbone(config.backbone, (32,))  # building it draws from the seeded RNG, like the head after it
        if cached:
            self.network: torch.nn.Module = TailClassifier(backbone, config.freeze, classes, config.dropout)
        else:
            self.network = Classifier(backbone, classes, config.dropout, config.freeze)
        self.criterion = ImbalanceLoss(config.loss, counts, tau=config.tau, gamma=config.gamma, weighting=config.weighting,
                                       beta=config.beta, contrastive_weight=config.contrastive_weight,
                                       temperature=config.temperature)
        self.generator = torch.Generator().manual_seed(config.seed)

    def loss(self, network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.config.augments:
            x = augment(x, self.generator, self.config, self.preprocess.mean, self.preprocess.std)
        logits, projections = network(x)
        return self.criterion(logits, y, projections, network.prototypes() if self.config.loss == "bcl" else None)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        self.network.eval()
        with torch.no_grad():
            logits = torch.cat([self.network(chunk)[0] for chunk in x.split(self.config.batch_size)])
        return torch.softmax(self.criterion.decision_logits(logits), 1)


def cross_validate(dataset: Dataset, config: ClassifierConfig, progress: FoldProgress | None = None,
                   cache: InputCache | None = None) -> CrossValidation:
    """Train and score config.folds models; returns every labelled image's held-out prediction."""
    classes = class_names(dataset, config.task)
    pool = dataset.test
    if not any(s.label for s in pool):
        raise DefectscopeError(f"{dataset.root} has no labelled defective images; the classifier needs some")
    labels = np.array([label_of(s, classes) for s in pool])
    extra = pick_good(dataset.train, config.good_train, config.seed)
    pretrained = load_backbone(config.backbone, (32,))
    preprocess = Preprocess(config.image_size, config.crop, pretrained.mean, pretrained.std)
    cached = config.freeze > 0 and not config.augments and isinstance(pretrained.network, EfficientNetLite)
    images, per_image_load = (cache or InputCache()).inputs(pool + extra, preprocess, pretrained, config.freeze if cached else None)
    pool_x, extra_x = images[: len(pool)], images[len(pool) :]
    records, usage, histories, train_counts = [], [], [], []
    fit_seconds, infer_seconds = per_image_load * len(extra), per_image_load * len(pool)
    for fold, held in enumerate(stratified_folds(labels, config.folds, config.seed, classes)):
        if progress:
            progress(f"fold {fold + 1}/{config.folds}")
        rest, seed = np.setdiff1d(np.arange(len(pool)), held), derived_seed(config.seed, fold)
        trained = keep_shots(rest, labels, config.shots, seed)
        x = torch.cat([pool_x[trained], extra_x])
        y = torch.cat([torch.from_numpy(labels[trained]), torch.zeros(len(extra_x), dtype=torch.long)])
        counts = torch.bincount(y, minlength=len(classes))
        torch.manual_seed(seed)
        model = FoldModel(config, len(classes), counts, preprocess, cached)
        start = time.perf_counter()
        history = train(model.network, model.loss, x, y, config, batch_size=config.batch_size, seed=seed,
                        sample_weights=sample_weights(y, config.sampling))
        fit_seconds += time.perf_counter() - start
        start = time.perf_counter()
        probabilities = model.probabilities(pool_x[held])
        infer_seconds += time.perf_counter() - start
        truth = torch.from_numpy(labels[held])
        held_loss = float(-probabilities[torch.arange(len(held)), truth].clamp_min(1e-12).log().mean())  # cross-entropy
        histories.append({**history.to_dict(), "held_out_loss": held_loss})
        train_counts.append(counts.tolist())
        usage.append({"fold": fold, "trained_on": [str(pool[i].path) for i in trained] + [str(s.path) for s in extra],
                      "scored": [str(pool[i].path) for i in held]})
        for row, index in enumerate(held):
            p = probabilities[row]
            records.append({"path": str(pool[index].path), "fold": fold, "true": int(labels[index]),
                            "predicted": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]})
    records.sort(key=lambda r: r["path"])
    return CrossValidation(classes, records, usage, histories, fit_seconds, infer_seconds / len(pool) * 1000, train_counts)
