"""Experiment config files (YAML or TOML): attempts with a model and hyperparameters, optionally inheriting.

    name: attempts-autoencoder
    data: ../shared/datasets/mvtec_ad/bottle   # relative to the working folder; --data overrides
    metric: image_auroc                        # picks the best attempt
    baseline: ae-baseline                      # default: the first attempt
    attempts:
      - {name: ae-baseline, model: autoencoder, epochs: 50, lr: 1.0e-3, optimizer: adam}
      - {name: ae-augmented, base: ae-baseline, hflip: true}
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from defectscope.classify.model import ClassifierConfig
from defectscope.detectors import detector_class
from defectscope.errors import DefectscopeError

CLASSIFIER = "classifier"
RESERVED = {"name", "model", "base", "description"}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "accuracy", "balanced_accuracy", "macro_f1", "tail_recall")


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-3 (no dot) as a float, as TOML and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


@dataclass
class Attempt:
    name: str
    model: str
    settings: dict[str, Any]
    description: str = ""

    @property
    def is_classifier(self) -> bool:
        return self.model == CLASSIFIER


@dataclass
class Experiment:
    name: str
    data: str | None
    metric: str
    baseline: str
    attempts: list[Attempt]


def _read(path: Path) -> dict:
    if not path.is_file():
        raise DefectscopeError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
        else:
            raise DefectscopeError(f"config {path} must be .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise DefectscopeError(f"config {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise DefectscopeError(f"config {path} must be a mapping with an 'attempts' list")
    return data


def check_settings(model: str, settings: dict) -> None:
    """Raise if the model is unknown or a setting is unknown or has a bad value."""
    if model == CLASSIFIER:
        ClassifierConfig.from_dict(settings)
    else:
        detector_class(model)(detector_class(model).config_class.from_dict(settings))


def _resolve(name: str, raw: dict[str, dict], chain: tuple[str, ...] = ()) -> dict:
    entry = raw[name]
    if name in chain:
        raise DefectscopeError(f"attempt '{name}': 'base' chain loops ({' -> '.join((*chain, name))})")
    base = entry.get("base")
    if base is None:
        return dict(entry)
    if base not in raw:
        raise DefectscopeError(f"attempt '{name}': field 'base' names unknown attempt '{base}'")
    merged = _resolve(base, raw, (*chain, name))
    merged.pop("description", None)
    return {**merged, **entry}


def load_experiment(path: str | Path) -> Experiment:
    """Read, resolve inheritance and validate every attempt; errors name the attempt and field."""
    path = Path(path)
    data = _read(path)
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
        if entry["name"] in raw:
            raise DefectscopeError(f"config {path}: two attempts are named '{entry['name']}'")
        raw[entry["name"]] = entry
    attempts = []
    for name in raw:
        merged = _resolve(name, raw)
        if "model" not in merged:
            raise DefectscopeError(f"attempt '{name}': missing field 'model'")
        settings = {k: v for k, v in merged.items() if k not in RESERVED}
        try:
            check_settings(merged["model"], settings)
        except DefectscopeError as exc:
            raise DefectscopeError(f"attempt '{name}': {exc}") from exc
        attempts.append(Attempt(name, merged["model"], settings, str(merged.get("description", ""))))
    metric = data.get("metric", "image_auroc")
    if metric not in METRICS:
        raise DefectscopeError(f"config {path}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    baseline = data.get("baseline", attempts[0].name)
    if baseline not in raw:
        raise DefectscopeError(f"config {path}: baseline '{baseline}' is not an attempt")
    return Experiment(str(data.get("name", path.stem)), data.get("data"), metric, baseline, attempts)
