"""Fit plans: one product per entry (data folder, model, settings, output file), checked before anything runs.

    defaults: {model: patchcore, settings: {coreset_ratio: 0.1}}
    products:
      - {name: bottle, data: ../datasets/mvtec_ad/bottle}                # out: models/bottle.dsmodel
      - {name: tire, data: ../datasets/tire, settings: {image_size: 320}, out: tire.dsmodel}

Paths are relative to the plan file. A product's fingerprint covers its training images (path,
size, modification time), model, settings and the library version; a model file that records the
same fingerprint is up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope._version import __version__
from defectscope.data.layout import load_dataset
from defectscope.detectors.base import detector_class, good_only_models
from defectscope.errors import DefectscopeError
from defectscope.experiments.config import check_name, read_mapping
from defectscope.manifests import peek_manifest

PRODUCT_FIELDS = {"name", "data", "model", "settings", "out"}
DEFAULT_FIELDS = {"model", "settings"}


@dataclass(frozen=True)
class Product:
    """One fit of a plan."""

    name: str
    data: Path
    model: str
    settings: dict[str, Any]
    out: Path


def _mapping(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise DefectscopeError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _unknown(entry: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(entry) - allowed)
    if extra:
        raise DefectscopeError(f"{what} has unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def load_plan(path: str | Path) -> list[Product]:
    """The products of a plan file, every field and setting checked; names and output files unique."""
    path = Path(path)
    raw = read_mapping(path, "a 'products' list")
    _unknown(raw, {"defaults", "products"}, f"plan {path}")
    defaults = _mapping(raw.get("defaults", {}), "plan 'defaults'")
    _unknown(defaults, DEFAULT_FIELDS, "plan 'defaults'")
    entries = raw.get("products")
    if not isinstance(entries, list) or not entries:
        raise DefectscopeError(f"plan {path} needs a non-empty 'products' list")
    products = []
    for number, entry in enumerate(entries, 1):
        entry = _mapping(entry, f"product {number}")
        _unknown(entry, PRODUCT_FIELDS, f"product {number}")
        name = check_name(entry.get("name"), "product")
        if not isinstance(entry.get("data"), str):
            raise DefectscopeError(f"product {name} needs 'data': the folder of its images")
        model = entry.get("model", defaults.get("model", "patchcore"))
        if model not in good_only_models():
            raise DefectscopeError(f"product {name}: model {model!r} cannot be fitted on good images; "
                                   f"choose one of: {', '.join(good_only_models())}")
        settings = {**_mapping(defaults.get("settings", {}), "defaults 'settings'"),
                    **_mapping(entry.get("settings", {}), f"product {name} 'settings'")}
        try:
            detector_class(model).config_class.from_dict(settings)
        except DefectscopeError as exc:
            raise DefectscopeError(f"product {name}: {exc}") from exc
        out = path.parent / entry.get("out", f"models/{name}.dsmodel")
        products.append(Product(name, path.parent / entry["data"], model, settings, out))
    for field in ("name", "out"):
        values = [getattr(p, field) for p in products]
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise DefectscopeError(f"plan {path}: products share the {field} {', '.join(repeated)}")
    return products


def fingerprint(product: Product) -> str:
    """sha256 of what a fit depends on: the training images (path, size, mtime), model, settings, library version."""
    dataset = load_dataset(product.data)
    images = []
    for sample in dataset.train:
        stat = Path(sample.path).stat()
        images.append([os.path.relpath(sample.path, product.data), stat.st_size, stat.st_mtime_ns])
    content = {"model": product.model, "settings": product.settings, "library": __version__, "train": images}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def recorded_fingerprint(path: Path) -> str | None:
    """The fingerprint a model file records (from its header only), or None."""
    manifest = peek_manifest(path)
    summary = manifest.get("train_summary") if manifest else None
    return summary.get("fingerprint") if isinstance(summary, dict) else None
