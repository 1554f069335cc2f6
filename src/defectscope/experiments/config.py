"""Experiment config files (YAML or TOML): attempts with a model and hyperparameters, optionally inheriting.

    name: attempts-autoencoder
    data: ../../shared/datasets/mvtec_ad/bottle   # relative to this file; --data overrides
    metric: image_auroc                           # picks the best attempt
    baseline: ae-baseline                         # default: the first attempt
    attempts:
      - {name: ae-baseline, model: autoencoder, epochs: 50, lr: 1.0e-3, optimizer: adam}
      - {name: ae-augmented, base: ae-baseline, hflip: true}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope.config_files import read_mapping
from defectscope.errors import DefectscopeError, SettingsError
from defectscope.experiments.kinds import attempt_config
from defectscope.names import check_name

RESERVED = {"name", "model", "base", "description"}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "accuracy", "balanced_accuracy", "macro_f1", "tail_recall",
           "box_ap", "box_ap50", "mask_ap", "mask_ap50")


@dataclass
class Attempt:
    name: str
    model: str
    settings: dict[str, Any]
    description: str = ""


@dataclass
class Experiment:
    name: str
    data: str | None
    metric: str
    baseline: str
    attempts: list[Attempt]


def _resolve_all(raw: dict[str, dict]) -> dict[str, dict]:
    """Each attempt's fields with its `base` chain applied (bases first, own fields win), without recursion."""
    resolved: dict[str, dict] = {}
    for name in raw:
        chain = [name]
        while (base := raw[chain[-1]].get("base")) is not None and base not in resolved:
            if not isinstance(base, str) or base not in raw:
                raise DefectscopeError(f"attempt '{chain[-1]}': field 'base' names unknown attempt {base!r}")
            if base in chain:
                raise DefectscopeError(f"attempt '{base}': 'base' chain loops ({' -> '.join((*chain, base))})")
            chain.append(base)
        for item in reversed(chain):
            entry, base = raw[item], raw[item].get("base")
            merged = {} if base is None else {k: v for k, v in resolved[base].items() if k != "description"}
            resolved[item] = {**merged, **entry}
    return resolved


def load_experiment(path: str | Path) -> Experiment:
    """Read, resolve inheritance and validate every attempt; errors name the attempt and field."""
    path = Path(path)
    data = read_mapping(path)
    entries = data.get("attempts")
    if not isinstance(entries, list) or not entries:
        raise DefectscopeError(f"config {path}: 'attempts' must be a non-empty list")
    unknown = sorted(set(data) - {"name", "data", "metric", "baseline", "attempts"})
    if unknown:
        raise DefectscopeError(f"config {path}: unknown top-level field(s) {', '.join(unknown)}")
    raw: dict[str, dict] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DefectscopeError(f"config {path}: attempt #{index + 1} needs a 'name'")
        check_name(entry["name"], f"config {path}: attempt")
        if entry["name"] in raw:
            raise DefectscopeError(f"config {path}: two attempts are named '{entry['name']}'")
        raw[entry["name"]] = entry
    attempts = []
    for name, merged in _resolve_all(raw).items():
        if "model" not in merged:
            raise DefectscopeError(f"attempt '{name}': missing field 'model'")
        settings = {k: v for k, v in merged.items() if k not in RESERVED}
        try:
            if not isinstance(merged["model"], str):
                raise SettingsError(f"field 'model' must be a model name, got {merged['model']!r}")
            attempt_config(merged["model"], settings)
        except DefectscopeError as exc:
            raise DefectscopeError(f"attempt '{name}': {exc}") from exc
        attempts.append(Attempt(name, merged["model"], settings, str(merged.get("description", ""))))
    metric = data.get("metric", "image_auroc")
    if metric not in METRICS:
        raise DefectscopeError(f"config {path}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    baseline = data.get("baseline", attempts[0].name)
    if baseline not in raw:
        raise DefectscopeError(f"config {path}: baseline '{baseline}' is not an attempt")
    default = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-_") or "experiment"
    name = check_name(data.get("name", default), f"config {path}: experiment")
    if data.get("data") is not None and not isinstance(data["data"], str):
        raise DefectscopeError(f"config {path}: 'data' must be a folder path, got {data['data']!r}")
    folder = None if data.get("data") is None else str(path.parent / data["data"])  # as plans: relative to the file
    return Experiment(name, folder, metric, baseline, attempts)
