"""The operating point a model carries: its threshold, how it was chosen, and what it promises (no SciPy: the runtime
reads it too; `thresholds` computes it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from defectscope.errors import DefectscopeError

def stated_rank(count: int, rate: float) -> int:
    """The order statistic (1-based) whose value states `rate` among `count` good scores; above `count`, the rate lies
    beyond them."""
    return math.ceil((count + 1) * (1 - rate))


@dataclass(frozen=True)
class Calibration:
    """A threshold on raw scores, how it was chosen, the good-score statistics behind it, and what it promises.

    false_alarm_rate: expected share of new good parts called defective; false_alarm_interval: its
    95% interval; recall / recall_interval: the same for defective parts when labels chose the threshold.
    map_threshold: the map level that marks a defect's region when the map does not show every view the image
    score fuses (PatchCore's patch distances beside its place and global views): the same rule on the cross-fitted
    scores of the view the map shows. None: the maps share the threshold's scale. good_median: the good scores'
    median, the reference of the line's drift check (`line.drift`); None in files from before it.
    """

    threshold: float
    method: str
    param: float
    good_mean: float
    good_std: float
    good_count: int
    warning: str | None = None
    false_alarm_rate: float | None = None
    false_alarm_interval: tuple[float, float] | None = None
    recall: float | None = None
    recall_interval: tuple[float, float] | None = None
    gap_interval: tuple[float, float] | None = None  # labelled: the nearest good score below, defective score at/above
    map_threshold: float | None = None
    good_median: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """A calibration from its stored form; every field's type and value checked (DefectscopeError otherwise)."""
        if not isinstance(data, dict):
            raise DefectscopeError(f"a calibration must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise DefectscopeError(f"calibration has unknown field(s) {', '.join(map(str, unknown))}")
        values = {}
        for key, field in cls.__dataclass_fields__.items():
            if key not in data and field.default is not dataclasses.MISSING:
                continue
            values[key] = _checked_field(key, data.get(key), "| None" in str(field.type))
        return cls(**values)

    @property
    def region_threshold(self) -> float:
        """The map level at and above which a map's pixels form a defect's region."""
        return self.threshold if self.map_threshold is None else self.map_threshold

    def describe(self) -> str:
        """One line: the threshold and the false-alarm rate (and recall) it stands for."""
        text = f"threshold {self.threshold:.4g} ({self.method} {self.param:g})"
        if self.false_alarm_rate is not None:
            low, high = self.false_alarm_interval or (math.nan, math.nan)
            text += f"; expected false-alarm rate {self.false_alarm_rate:.2%} (95% interval {low:.2%} to {high:.2%})"
        if self.recall is not None:
            low, high = self.recall_interval or (math.nan, math.nan)
            text += f"; recall {self.recall:.1%} (95% interval {low:.1%} to {high:.1%})"
        if self.gap_interval is not None:
            good, defective = (value / self.threshold for value in self.gap_interval)
            text += f"; nearest labelled scores: good {good:.3f}, defective {defective:.3f} (normalized)"
            if defective == 1.0:
                text += ", the threshold sits on a defective score (--margin leaves room)"
        if self.map_threshold is not None:
            text += f"; defect regions from map level {self.map_threshold:.4g}"
        return text


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DefectscopeError(f"calibration field '{key}' must be a finite number, got {value!r:.40}")
    return float(value)


def _checked_field(key: str, value: object, optional: bool) -> object:
    """One stored calibration field, checked for its type."""
    if value is None and optional:
        return None
    if key in ("method", "warning"):
        if not isinstance(value, str):
            raise DefectscopeError(f"calibration field '{key}' must be text, got {value!r:.40}")
        return value
    if key == "good_count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DefectscopeError(f"calibration field 'good_count' must be a whole number >= 0, got {value!r:.40}")
        return value
    if key.endswith("_interval"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise DefectscopeError(f"calibration field '{key}' must be two numbers, got {value!r:.40}")
        return tuple(_number(key, v) for v in value)
    return _number(key, value)
