"""Labels for supervised models and the seeded splits they are judged by (stratified folds, good-image picks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from defectscope.data.layout import GOOD, Dataset, Sample
from defectscope.errors import DefectscopeError


def class_names(dataset: Dataset, task: str) -> list[str]:
    """Class names of a task: good vs defective ('binary'), or good and each defect type ('type')."""
    return [GOOD, "defective"] if task == "binary" else [GOOD, *dataset.defect_types]


def label_of(sample: Sample, classes: list[str]) -> int:
    if sample.label == 0:
        return 0
    return 1 if len(classes) == 2 and classes[1] == "defective" else classes.index(sample.defect)


def stratified_folds(labels: np.ndarray, folds: int, seed: int, classes: Sequence[str]) -> list[np.ndarray]:
    """Held-out indices of each fold (seeded, stratified by label); `classes` names the labels in errors."""
    counts = np.bincount(labels, minlength=len(classes))
    few = [f"{name} ({count})" for name, count in zip(classes, counts) if count < folds]
    if few:
        raise DefectscopeError(f"{folds}-fold cross-validation needs {folds} labelled images of every class; "
                               f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer: lower 'folds', or label more")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels)]


def pick_good(train: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """A seeded choice of `count` good training images (all of them for -1), in their original order."""
    chosen = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in sorted(chosen if count < 0 else chosen[:count])]
