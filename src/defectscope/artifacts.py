"""Model files: one safetensors file whose header carries a JSON manifest; atomic writes, no pickle.

The manifest holds the format version, detector name and config, pre-processing, backbone name and
weight hash, threshold, score normalization, a training-set summary and the library version.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors_bytes
from safetensors.torch import save as save_tensors_bytes

from defectscope import __version__
from defectscope.backbones import load_backbone
from defectscope.detectors.base import Detector, detector_class
from defectscope.errors import DefectscopeError
from defectscope.thresholds import Calibration

FORMAT = "defectscope-model"
FORMAT_VERSION = 1
MANIFEST_KEY = "defectscope"
MAX_HEADER = 100 * 1024 * 1024


def manifest_of(detector: Detector) -> dict[str, Any]:
    """The JSON manifest describing a fitted detector."""
    backbone = detector.require_backbone() if detector.uses_backbone else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "detector": detector.name,
        "config": detector.config.to_dict(),
        "preprocess": detector.preprocess.to_dict(),
        "backbone": backbone and {"name": backbone.name, "strides": list(backbone.strides),
                                  "weights_sha256": backbone.weights_sha256},
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "normalization": {"kind": "score / threshold", "decision_point": 1.0},
        "train_summary": detector.train_summary,
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_model(detector: Detector, path: str | Path) -> Path:
    """Save a fitted detector as a single self-describing model file."""
    tensors = {k: v.contiguous() for k, v in detector.tensors().items() if v is not None}
    if not tensors:
        raise DefectscopeError("the detector is not fitted; fit it before saving")
    manifest = json.dumps(manifest_of(detector), sort_keys=True)
    path = Path(path)
    write_atomic(path, save_tensors_bytes(tensors, metadata={MANIFEST_KEY: manifest}))
    return path


def read_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """Parse and check the manifest in a model file's safetensors header."""
    if len(data) < 8:
        raise DefectscopeError(f"{path} is not a defectscope model file (too short: {len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_HEADER, len(data) - 8):
        raise DefectscopeError(f"{path} is not a defectscope model file, or it is truncated (bad header length)")
    try:
        header = json.loads(data[8 : 8 + header_size])
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise DefectscopeError(f"{path} is not a defectscope model file (no manifest in its header)") from exc
    if manifest.get("format") != FORMAT:
        raise DefectscopeError(f"{path} is not a defectscope model file (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DefectscopeError(
            f"{path} has model format version {version}, newer than this defectscope ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade defectscope"
        )
    return manifest


def load_model(path: str | Path, weights: str | Path | None = None) -> Detector:
    """Load a model file (never unpickles); checks the backbone weights match the ones it was fitted with."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DefectscopeError(f"model file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise DefectscopeError(f"model path {path} is a folder; give the model file") from exc
    manifest = read_manifest(data, path)
    try:
        tensors = load_tensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DefectscopeError(f"model file {path} is corrupt or truncated: {exc}") from exc
    cls = detector_class(manifest["detector"])
    config = cls.config_class.from_dict(manifest["config"])
    spec = manifest["backbone"]
    backbone = spec and load_backbone(spec["name"], tuple(spec["strides"]), weights)
    if backbone and backbone.weights_sha256 != spec["weights_sha256"]:
        raise DefectscopeError(
            f"model {path} was fitted with {spec['name']} weights sha256 {spec['weights_sha256'][:12]}..., "
            f"but the weights found here have {backbone.weights_sha256[:12]}...; supply the original weight file"
        )
    detector = cls(config, backbone)
    try:
        detector.load_tensors(tensors)
    except KeyError as exc:
        raise DefectscopeError(f"model file {path} lacks tensor {exc}; it is damaged or from another tool") from exc
    detector.calibration = Calibration.from_dict(manifest["calibration"]) if manifest["calibration"] else None
    detector.train_summary = manifest.get("train_summary", {})
    return detector


def set_threshold(path: str | Path, calibration: Calibration) -> None:
    """Rewrite a model file's threshold in place (atomically), keeping everything else."""
    path = Path(path)
    data = path.read_bytes()
    manifest = read_manifest(data, path)
    manifest["calibration"] = calibration.to_dict()
    tensors = load_tensors_bytes(data)
    write_atomic(path, save_tensors_bytes(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}))


def model_info(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file, without loading its tensors or backbone."""
    path = Path(path)
    if not path.is_file():
        raise DefectscopeError(f"model file {path} does not exist")
    return read_manifest(path.read_bytes(), path)

