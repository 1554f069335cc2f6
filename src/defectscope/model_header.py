"""A model file's manifest, checked as loading checks the file (complete, manifest and tensor digests, finite tensors),
without PyTorch: what `defectscope info` and the up-to-date checks read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays_bytes

from defectscope.errors import ModelFileError
from defectscope.files import read_regular
from defectscope.manifests import read_header_manifest

FORMAT = "defectscope-model"
FORMAT_VERSION = 2
DIGEST_SINCE = 2  # model files carry their manifest's digest from format version 2 on


def read_model_file(path: Path) -> bytes:
    return read_regular(path, "model file")


def read_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """Parse and check the manifest in a model file's safetensors header, and that the file is complete."""
    return read_header_manifest(data, path, FORMAT, FORMAT_VERSION, "defectscope model file", DIGEST_SINCE)


def checked_file(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """A model file's bytes and manifest, after checking the whole file as loading needs it: complete, the manifest's
    and the tensors' digests, every tensor readable and finite."""
    path = Path(path)
    data = read_model_file(path)
    manifest = read_manifest(data, path)
    try:
        arrays = load_arrays_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"model file {path} is corrupt or truncated: {exc}") from exc
    bad = [name for name, array in arrays.items() if array.dtype.kind == "f" and not np.isfinite(array).all()]
    if bad:
        raise ModelFileError(f"model file {path} holds values that are not finite numbers ({', '.join(bad[:3])}): "
                             "training diverged; lower the learning rate or check the images; nothing was written")
    return data, manifest


def model_info(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file, checked as loading checks it, without building the model (nor PyTorch)."""
    return checked_file(path)[1]
