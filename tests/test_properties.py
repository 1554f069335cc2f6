"""Property-based tests: any config either loads into checked attempts or fails with one DefectscopeError;
any valid set of masks exports and reads back exactly."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError
from defectscope.experiments.config import load_experiment
from defectscope.experiments.kinds import attempt_config
from defectscope.export.check import check_export
from defectscope.export.labels import FORMATS, ExportOptions, export_ground_truth
from defectscope.names import SAFE_NAME

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


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                              st.text(max_size=8)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=30)
def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = st.integers(1, 120).map(_nested)  # deeper than any manifest; 100,000 levels are in test_bad_input


def _mutated(manifest: dict, path: list[str], value: object) -> dict:
    """A copy of a manifest with the value at `path` (keys that exist, as deep as they go) replaced."""
    import copy
    edited = copy.deepcopy(manifest)
    node = edited
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            break
        node = node[key]
    node[path[-1]] = value
    return edited


MANIFEST_PATHS = st.sampled_from([["detector"], ["config"], ["config", "image_size"], ["config", "batch_size"],
                                  ["preprocess"], ["preprocess", "mean"], ["preprocess", "image_size"],
                                  ["preprocess", "aspect"], ["calibration"], ["calibration", "threshold"],
                                  ["calibration", "false_alarm_interval"], ["calibration", "good_count"],
                                  ["backbone"], ["train_summary"], ["format_version"], ["format"], ["graph"],
                                  ["graph", "files"], ["graph", "search"], ["graph", "engine"], ["head"],
                                  ["model"], ["model", "calibration"], ["model", "preprocess"]])


@st.composite
def edits(draw):
    return draw(MANIFEST_PATHS), draw(st.one_of(JSON, DEEP))


def _file_with(manifest: dict, tensors: bytes) -> bytes:
    import json
    import struct

    from defectscope.manifests import header_metadata
    header = json.loads(tensors[8 : 8 + struct.unpack("<Q", tensors[:8])[0]])
    header["__metadata__"] = header_metadata(manifest)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + tensors[8 + struct.unpack("<Q", tensors[:8])[0] :]


_KNN: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _remove_knn_folder():
    """The shared model's folder goes when this module's tests are done."""
    yield
    if "folder" in _KNN:
        shutil.rmtree(_KNN["folder"], ignore_errors=True)


def _knn_file() -> tuple[dict, bytes]:
    """A small fitted k-NN model file (made once) and its manifest."""
    if not _KNN:
        from defectscope.artifacts import model_info, save_model
        from defectscope.data.synthetic import make_demo_dataset
        from defectscope.detectors import create_detector
        folder = Path(tempfile.mkdtemp())
        data = make_demo_dataset(folder / "part", size=64, train=8, test_good=2, per_defect=1, seed=2)
        detector = create_detector("knn", image_size=64, crop=None)
        detector.fit([s.path for s in load_dataset(data).train])
        path = save_model(detector, folder / "knn.dsmodel")
        _KNN.update(manifest=model_info(path), data=path.read_bytes(), folder=folder)
    return _KNN["manifest"], _KNN["data"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits())
def test_any_model_manifest_loads_or_fails_with_one_error(edit) -> None:
    from defectscope.artifacts import load_model, model_info
    manifest, data = _knn_file()
    path = _KNN["folder"] / "edited.dsmodel"
    path.write_bytes(_file_with(_mutated(manifest, *edit), data))
    for read in (model_info, load_model):
        try:
            read(path)
        except DefectscopeError:
            pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits())
def test_any_deployment_manifest_loads_or_fails_with_one_error(edit) -> None:
    import pytest
    pytest.importorskip("onnxruntime")
    from defectscope.deployment import export_model
    from defectscope.manifests import peek_manifest
    from defectscope.runtime import DeployedModel
    _knn_file()
    out = _KNN["folder"] / "knn.dsdeploy"
    if not out.is_file():
        export_model(_KNN["folder"] / "knn.dsmodel", out)
        _KNN["deploy"] = out.read_bytes()
    edited = _KNN["folder"] / "edited.dsdeploy"
    for graph in out.parent.glob("knn.onnx"):
        (edited.parent / "edited.onnx").write_bytes(graph.read_bytes())
    manifest = peek_manifest(out)
    manifest["graph"]["files"][0]["file"] = "edited.onnx"
    edited.write_bytes(_file_with(_mutated(manifest, *edit), _KNN["deploy"]))
    try:
        DeployedModel(edited)
    except DefectscopeError:
        pass


PLAN_VALUES = st.one_of(JSON, DEEP, st.sampled_from(["knn", "patchcore", "../x", "/abs", "a.dsmodel", "sub/../a.dsmodel"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["defaults", "products", "other"]),
                       st.one_of(PLAN_VALUES, st.lists(st.dictionaries(st.sampled_from(
                           ["name", "data", "model", "settings", "out", "x"]), PLAN_VALUES, max_size=5), max_size=4)),
                       max_size=3),
       st.sampled_from([".yaml", ".toml", "deep"]))
def test_any_plan_parses_or_fails_with_one_error(content, suffix) -> None:
    from defectscope.scale.plan import load_plan
    text = {".yaml": yaml.safe_dump, ".toml": _toml}.get(suffix, lambda _: "products: " + "[" * 20_000 + "]" * 20_000)
    with tempfile.TemporaryDirectory() as folder:
        plan = Path(folder) / f"plan{suffix if suffix != 'deep' else '.yaml'}"
        plan.write_text(text(content))
        try:
            products = load_plan(plan)
        except DefectscopeError:
            return
    assert products and all(p.out.is_absolute() and p.data.is_absolute() for p in products)


def _toml(content: dict) -> str:
    """A TOML rendering good enough for fuzzing: JSON values are valid TOML inline values often enough; the rest
    is a parse error, which must also be one DefectscopeError."""
    import json
    return "\n".join(f"{json.dumps(str(key))} = {json.dumps(value)}" for key, value in content.items())
