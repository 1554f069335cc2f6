"""Settings dataclasses built from plain dicts (config files, manifests) and checked in one declared place.

Every settings class derives from `Settings`: `from_dict` rejects unknown fields and wrong types,
builds the object and calls `check()`, which each class extends (calling `super().check()`) to
reject values no run could use, naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

from defectscope.errors import SettingsError

S = TypeVar("S", bound="Settings")


def check_field_types(cls: type, data: dict) -> None:
    """Reject unknown fields and values whose type differs from the field's default (an int is a valid float)."""
    if not isinstance(data, dict):
        raise SettingsError(f"settings must be a mapping of field names to values, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise SettingsError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in data.items():
        field = known[name]
        default = field.default_factory() if field.default is MISSING and field.default_factory is not MISSING else field.default
        if default is None or value is None:
            continue
        if isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = type(value) is type(default)
        if not ok:
            raise SettingsError(f"field '{name}' must be {type(default).__name__}, got {value!r}")


def require_range(name: str, value: float | None, low: float | None = None, high: float | None = None,
                  *, low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Raise unless `value` is a finite number within [low, high] (open ends where asked)."""
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SettingsError(f"field '{name}' must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise SettingsError(f"field '{name}' must be in {span}{' or null' if optional else ''}, got {value!r}")


MAX_SEED = 2**31 - 1  # the widest seed every random source here takes (faiss's is a signed 32-bit int)


def require_seed(name: str, value: int) -> None:
    """Raise unless `value` is a whole number every random source takes: 0 to MAX_SEED."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise SettingsError(f"field '{name}' must be a whole number from 0 to {MAX_SEED}, got {value!r}")


def derived_seed(seed: int, offset: int) -> int:
    """The seed of a fold, shard or run `offset` after `seed`, wrapped into 0 to MAX_SEED."""
    return (seed + offset) % (MAX_SEED + 1)


def require_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise SettingsError(f"field '{name}' must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class Settings:
    """Base of every settings class: checked construction from a dict, and back.

    `inapplicable` names inherited fields a class does not use, with the reason: setting one to anything but its
    default is refused, never silently ignored.
    """

    inapplicable: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[S], data: dict) -> S:
        """The checked settings; they remember which fields `data` gave (`given`), as against the defaults."""
        check_field_types(cls, data)
        settings = cls(**data)
        settings.check()
        settings._given = frozenset(data)
        return settings

    @property
    def given(self) -> frozenset[str]:
        """The fields the user set, which a choice made per product (PatchCore's frame) leaves as they are: the keys
        of `from_dict`'s mapping; for settings built otherwise, the fields that differ from their defaults."""
        given = getattr(self, "_given", None)
        if given is None:
            given = frozenset(f.name for f in fields(self) if f.default is not MISSING and getattr(self, f.name) != f.default)
        return given

    def check(self) -> None:
        """Reject values no run could use; subclasses extend it and call super().check()."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, reason in self.inapplicable.items():
            if getattr(self, name) != defaults[name]:
                raise SettingsError(f"field '{name}' does not apply to {type(self).__name__}: {reason}")


@dataclass
class FrameConfig(Settings):
    """The backbone and the frame it sees (square resize, optional center crop), shared by every model kind."""

    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    crop: int | None = 224
    seed: int = 0
    batch_size: int = 32

    @classmethod
    def from_dict(cls: type[S], data: dict) -> S:
        """`Settings.from_dict`; an image_size given without a crop keeps the default frame's margin (PatchCore's
        352 -> 320 makes 416 -> 384 and 288 -> 256): the default crop itself would cut a larger frame's borders off
        unseen, and exceed a smaller one."""
        defaults = {f.name: f.default for f in fields(cls)}
        size = data.get("image_size") if isinstance(data, dict) and "crop" not in data else None
        if defaults["crop"] is None or not isinstance(size, int) or isinstance(size, bool):
            return super().from_dict(data)
        crop = size - (defaults["image_size"] - defaults["crop"])
        settings = super().from_dict({**data, "crop": crop if crop >= 16 else None})
        settings._given = frozenset(data)  # the crop followed the size the user gave
        return settings

    def check(self) -> None:
        super().check()
        require_range("image_size", self.image_size, 16, 8192)
        require_range("crop", self.crop, 16, self.image_size, optional=True)
        require_range("batch_size", self.batch_size, 1)
        require_seed("seed", self.seed)
