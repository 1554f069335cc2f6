"""Checked construction of settings dataclasses from plain dicts (config files, model manifests)."""

from __future__ import annotations

from dataclasses import fields

from defectscope.errors import DefectscopeError


def check_field_types(cls: type, data: dict) -> None:
    """Reject unknown fields and values whose type differs from the field's default (an int is a valid float)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DefectscopeError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in data.items():
        default = known[name].default
        if default is None or value is None:
            continue
        if isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = type(value) is type(default)
        if not ok:
            raise DefectscopeError(f"field '{name}' must be {type(default).__name__}, got {value!r}")
