"""Property-based tests: any config either loads into checked attempts or fails with one DefectscopeError;
any valid set of masks exports and reads back exactly."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError
from defectscope.experiments.config import SAFE_NAME, load_experiment
from defectscope.experiments.kinds import attempt_config
from defectscope.export.check import check_export
from defectscope.export.labels import FORMATS, ExportOptions, export_ground_truth

NAMES = st.one_of(st.sampled_from(["a", "b", "base-1", "x.y", "../up", "/abs", "", "a/b", ".hidden", "ü"]),
                  st.text(max_size=8))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 500), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=6), st.lists(st.integers(), max_size=3))
FIELDS = st.sampled_from(["image_size", "crop", "coreset_ratio", "neighbours", "epochs", "lr", "seed", "batch_size",
                          "threshold_method", "threshold_param", "calibration_folds", "regularization", "folds",
                          "loss", "optimizer", "colour"])
ATTEMPT = st.fixed_dictionaries(
    {"name": NAMES},
    optional={"model": st.sampled_from(["knn", "pca", "patchcore", "padim", "autoencoder", "classifier", "segmenter", "nope"]),
              "base": NAMES, "settings": st.dictionaries(FIELDS, VALUES, max_size=3)},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ATTEMPT, min_size=1, max_size=5), NAMES)
def test_config_loader_accepts_only_checked_attempts(attempts: list[dict], name: str) -> None:
    entries = []
    for attempt in attempts:
        entry = {k: v for k, v in attempt.items() if k != "settings"}
        entry.update(attempt.get("settings", {}))
        entries.append(entry)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump({"name": name, "attempts": entries}, allow_unicode=True))
        try:
            experiment = load_experiment(path)
        except DefectscopeError as exc:
            assert str(exc)
            return
    assert SAFE_NAME.match(experiment.name)
    for attempt in experiment.attempts:
        assert SAFE_NAME.match(attempt.name)
        attempt_config(attempt.model, attempt.settings)  # what loaded is a valid config, by construction


BOX = st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(BOX, min_size=1, max_size=3), min_size=2, max_size=5), st.sampled_from(FORMATS),
       st.booleans(), st.integers(0, 3), st.sampled_from([0.0, 0.3, 0.5]))
def test_any_masks_export_and_read_back(masks: list[list[tuple]], fmt: str, rle: bool, seed: int, val: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        for kind in ("good", "dent", "masks/dent"):
            (root / kind).mkdir(parents=True)
        rng = np.random.default_rng(seed)
        for i in range(3):
            cv2.imwrite(str(root / "good" / f"{i}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        for i, boxes in enumerate(masks):
            mask = np.zeros((48, 64), np.uint8)
            for x, y, w, h in boxes:
                mask[y : y + h, x : x + w] = 255
            cv2.imwrite(str(root / "dent" / f"{i}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
            cv2.imwrite(str(root / "masks" / "dent" / f"{i}.png"), mask)
        out = Path(folder) / "out"
        export_ground_truth(load_dataset(root), out, ExportOptions(fmt, rle=rle, seed=seed, val_fraction=val))
        report = check_export(out)
        assert report["ok"], report["failures"]
        assert report["instances"] >= len(masks)
