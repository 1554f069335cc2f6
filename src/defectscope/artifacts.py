"""Model files: one safetensors file whose header carries a JSON manifest; atomic writes, no pickle.

The manifest holds the format version, detector name and config, pre-processing, backbone name and
weight hash, threshold, score normalization, a training-set summary and the library version.
A file is checked whole before anything is built from it; every defect is one clear error.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors_bytes
from safetensors.torch import save as save_tensors_bytes

from defectscope._version import __version__
from defectscope.backbones import load_backbone
from defectscope.data.decode import TRAIN_DIGESTS
from defectscope.data.frame import Preprocess
from defectscope.detectors.base import MapModel, detector_class, require_finite
from defectscope.errors import DefectscopeError, check_fitted
from defectscope.files import check_output_file, write_atomic
from defectscope.manifests import file_bytes, is_manifest_file
from defectscope.names import MODEL_SUFFIX
from defectscope.model_header import FORMAT, FORMAT_VERSION, checked_file, model_info  # noqa: F401  (model_info: public here too)
from defectscope.calibration import Calibration

CALIBRATION_SCORES = "calibration.scores"  # the cross-fitted good scores, kept to restate the threshold later
MAP_SCORES = "calibration.map_scores"  # those of the view the map shows, when it has a region level of its own
LEGACY_CONFIG_FIELDS = ("calibration_fraction",)  # written by earlier versions; no longer used


def manifest_of(detector: MapModel) -> dict[str, Any]:
    """The JSON manifest describing a fitted detector."""
    backbone = detector.require_backbone() if detector.uses_backbone else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "detector": detector.name,
        "config": detector.config.to_dict(),
        "preprocess": detector.preprocess.to_dict(),
        "backbone": backbone and {"name": backbone.name, "strides": list(backbone.strides),
                                  "weights_sha256": backbone.weights_sha256},
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "normalization": {"kind": "score / threshold", "decision_point": 1.0},
        "train_summary": detector.train_summary,
    }


def _file_bytes(tensors: dict[str, torch.Tensor], manifest: dict) -> bytes:
    return file_bytes(lambda metadata: save_tensors_bytes(tensors, metadata=metadata), manifest)


def _check_calibration(calibration: Calibration | None, what: str) -> None:
    if calibration is not None and not (math.isfinite(calibration.threshold) and calibration.threshold > 0):
        raise DefectscopeError(f"{what} has threshold {calibration.threshold}, not a positive finite number")


def save_model(detector: MapModel, path: str | Path, force: bool = False) -> Path:
    """Save a fitted detector as a single self-describing model file.

    Refuses a model with non-finite tensors or threshold, and replaces an existing file only if it
    is a model file (anything else needs `force`).
    """
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in detector.tensors().items() if v is not None}
    check_fitted(tensors, detector.name)
    for name, scores in ((CALIBRATION_SCORES, detector.calibration_scores), (MAP_SCORES, detector.map_scores)):
        if scores is not None:
            tensors[name] = scores.float().contiguous()
    if detector.train_digests is not None:
        tensors[TRAIN_DIGESTS] = torch.from_numpy(np.ascontiguousarray(detector.train_digests, np.uint8))
    require_finite(tensors, f"{detector.name} has learned")
    _check_calibration(detector.calibration, f"{detector.name}'s calibration")
    check_model_output(path, force)
    write_atomic(path, _file_bytes(tensors, manifest_of(detector)))
    return path


def check_model_output(path: Path, force: bool = False) -> None:
    """Raise unless `path` can take a model file: named *.dsmodel (what the service, versions and folders of models
    know a model by; so `force` never replaces an image or any other kind of file), new, or an existing model file,
    or anything so named with `force`."""
    path = Path(path)
    if path.suffix != MODEL_SUFFIX and not path.is_dir():  # a folder: check_output_file says so
        raise DefectscopeError(f"a model file's name ends in {MODEL_SUFFIX}, got {path}; choose a name such as "
                               f"{path.with_suffix(MODEL_SUFFIX).name}")
    check_output_file(path, force, is_ours=_is_model_file)


def _is_model_file(path: Path) -> bool:
    return is_manifest_file(path, FORMAT)


def _section(manifest: dict, key: str, kind: type, path: Path, optional: bool = False) -> Any:
    value = manifest.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        raise DefectscopeError(f"model file {path} is damaged: its manifest's '{key}' is missing or not a {kind.__name__}")
    return value


def load_model(path: str | Path, weights: str | Path | None = None) -> MapModel:
    """Load a model file (never unpickles); checks the backbone weights match the ones it was fitted with."""
    path = Path(path)
    data, manifest = checked_file(path)
    tensors = load_tensors_bytes(data)
    calibration_scores, map_scores = tensors.pop(CALIBRATION_SCORES, None), tensors.pop(MAP_SCORES, None)
    digests = tensors.pop(TRAIN_DIGESTS, None)
    if digests is not None and (digests.dtype != torch.uint8 or digests.ndim != 2 or digests.shape[1] != 32):
        raise DefectscopeError(f"model file {path} is damaged: its training images' digests are not N x 32 bytes")
    cls = detector_class(_section(manifest, "detector", str, path))
    try:
        dropped = {*LEGACY_CONFIG_FIELDS, *cls.config_class.inapplicable}  # fields that never changed what it does
        settings = {k: v for k, v in _section(manifest, "config", dict, path).items() if k not in dropped}
        config = cls.config_class.from_dict(settings)
    except DefectscopeError as exc:
        raise DefectscopeError(f"model file {path} has a bad config: {exc}") from exc
    spec = _section(manifest, "backbone", dict, path, optional=True)
    try:
        calibration = _section(manifest, "calibration", dict, path, optional=True)
        calibration = Calibration.from_dict(calibration) if calibration is not None else None
    except DefectscopeError as exc:
        raise DefectscopeError(f"model file {path} is damaged: its manifest's calibration is incomplete ({exc})") from exc
    frame = _section(manifest, "preprocess", dict, path)
    try:
        aspect = Preprocess.from_dict(frame).aspect
    except DefectscopeError as exc:
        raise DefectscopeError(f"model file {path} is damaged: its manifest's frame is wrong ({exc})") from exc
    try:
        backbone = spec and load_backbone(spec["name"], tuple(spec["strides"]), weights)
        expected = spec and spec["weights_sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DefectscopeError(f"model file {path} is damaged: its manifest's frame, backbone or calibration is incomplete ({exc})") from exc
    _check_calibration(calibration, f"model file {path}")
    if backbone and backbone.weights_sha256 != expected:
        raise DefectscopeError(
            f"model {path} was fitted with {spec['name']} weights sha256 {str(expected)[:12]}..., "
            f"but the weights found here have {backbone.weights_sha256[:12]}...; supply the original weight file"
        )
    detector = cls(config, backbone)
    detector.aspect = aspect
    try:
        detector.load_tensors(tensors)
        detector.predict([np.zeros((*detector.preprocess.input_shape, 3), np.uint8)], map_size="input")  # a model that loads can predict
    except KeyError as exc:
        raise DefectscopeError(f"model file {path} lacks tensor {exc}; it is damaged or from another tool") from exc
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise DefectscopeError(f"model file {path} has tensors that do not fit {cls.name}; it is damaged "
                               f"({' '.join(str(exc).split())[:200]})") from exc
    detector.calibration = calibration
    detector.calibration_scores, detector.map_scores = calibration_scores, map_scores
    detector.train_digests = None if digests is None else digests.numpy()
    summary = manifest.get("train_summary", {})
    detector.train_summary = summary if isinstance(summary, dict) else {}
    return detector


def set_threshold(path: str | Path, calibration: Calibration, out: str | Path | None = None, force: bool = False) -> Path:
    """Write a model file with a new threshold (to `out`, default in place, atomically), keeping everything else
    (the map's region level too, unless the new calibration states one)."""
    path = Path(path)
    target = Path(out) if out is not None else path
    data, manifest = checked_file(path)
    _check_calibration(calibration, "the new calibration")
    if target != path:
        check_model_output(target, force)
    kept = manifest.get("calibration") or {}
    if calibration.map_threshold is None and kept.get("map_threshold") is not None:  # the map's own level stays
        calibration = replace(calibration, map_threshold=Calibration.from_dict(kept).map_threshold)
    manifest["calibration"] = calibration.to_dict()
    write_atomic(target, _file_bytes(load_tensors_bytes(data), manifest))
    return target
