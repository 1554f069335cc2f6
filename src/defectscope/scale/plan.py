"""Fit plans: one product per entry (data folder, model, settings, output file), checked before anything runs.

    defaults: {model: patchcore, settings: {coreset_ratio: 0.1}}
    products:
      - {name: bottle, data: ../datasets/mvtec_ad/bottle}                # out: models/bottle.dsmodel
      - {name: tire, data: ../datasets/tire, settings: {image_size: 320}, out: tire.dsmodel}

Paths are relative to the plan file. A product's fingerprint covers its training images (name within
the data folder and sha256 of the content), model, settings and the library version; a model file that
records the same fingerprint is up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope._version import __version__
from defectscope.config_files import read_mapping
from defectscope.data.layout import load_dataset
from defectscope.detectors.base import detector_config
from defectscope.errors import DefectscopeError
from defectscope.files import file_sha256
from defectscope.names import GOOD_ONLY_MODELS, MODEL_SUFFIX, check_name

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
        if model not in GOOD_ONLY_MODELS:  # a constant: a plan of 10,000 products imports only the models it names
            raise DefectscopeError(f"product {name}: model {model!r} cannot be fitted on good images; "
                                   f"choose one of: {', '.join(GOOD_ONLY_MODELS)}")
        settings = {**_mapping(defaults.get("settings", {}), "defaults 'settings'"),
                    **_mapping(entry.get("settings", {}), f"product {name} 'settings'")}
        try:
            detector_config(model, settings)
        except DefectscopeError as exc:
            raise DefectscopeError(f"product {name}: {exc}") from exc
        out = entry.get("out", f"models/{name}.dsmodel")
        if not isinstance(out, str) or not out.strip() or Path(out).suffix != MODEL_SUFFIX:
            raise DefectscopeError(f"product {name}: 'out' must be a file name ending in {MODEL_SUFFIX}, got {out!r}")
        products.append(Product(name, (path.parent / entry["data"]).resolve(), model, settings, (path.parent / out).resolve()))
    _refuse_shared(products, path)
    return products


def _refuse_shared(products: list[Product], path: Path) -> None:
    """Names and output files (resolved: `a.dsmodel` and `sub/../a.dsmodel` are one file) must be unique, and no
    product may write its model inside another product's data folder."""
    for field in ("name", "out"):
        seen: dict[object, str] = {}
        for product in products:
            key = getattr(product, field)
            if key in seen:
                raise DefectscopeError(f"plan {path}: products {seen[key]} and {product.name} share the {field} {key}")
            seen[key] = product.name
    folders = {product.data: product.name for product in products}
    for product in products:
        for folder in [product.out, *product.out.parents]:
            if folder in folders:
                raise DefectscopeError(f"plan {path}: product {product.name} would write its model {product.out} inside "
                                       f"the data folder of product {folders[folder]}")


def fingerprint(product: Product) -> str:
    """sha256 of what a fit depends on: the training images (name within the data folder and sha256 of the content:
    a copy elsewhere, with other times, is the same data; an edit that keeps size and time is not), model, settings,
    library version."""
    dataset = load_dataset(product.data)
    return fingerprint_of(product, [(sample.path, file_sha256(Path(sample.path))) for sample in dataset.train])


def fingerprint_of(product: Product, digests: Sequence[tuple[str | Path, str]]) -> str:
    """The fingerprint of `product` from its training images' (path, sha256 of the content)."""
    images = [[os.path.relpath(path, product.data), digest] for path, digest in digests]
    content = {"model": product.model, "settings": product.settings, "library": __version__, "train": images}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def recorded_fingerprint(path: Path) -> str | None:
    """The fingerprint a model file records, or None; the whole file is checked as loading checks it (complete,
    manifest digest, finite tensors), so a damaged file is never "up to date"."""
    from defectscope.model_header import model_info

    try:
        summary = model_info(path).get("train_summary")
    except DefectscopeError:
        return None
    return summary.get("fingerprint") if isinstance(summary, dict) else None
