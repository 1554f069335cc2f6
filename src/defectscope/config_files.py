"""Config files (YAML without aliases, or TOML) read as one bounded mapping: experiments and plans share it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from defectscope.errors import DefectscopeError

MAX_CONFIG_BYTES = 1024 * 1024


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-3 (no dot) as a float, as TOML and JSON do, and refuses aliases.

    Aliases (*name) are the one way a few hundred bytes of YAML expand to gigabytes ("billion laughs").
    """

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in defectscope configs", mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_mapping(path: Path, what: str = "an 'attempts' list") -> dict:
    """A YAML (no aliases) or TOML config file that must hold a mapping (`what` names its expected content)."""
    if not path.is_file():
        raise DefectscopeError(f"config file {path} does not exist" if not path.exists() else f"config {path} is not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DefectscopeError(f"config {path} is larger than {MAX_CONFIG_BYTES // 1024} KB; a config lists attempts, not data")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as Windows editors write, is no statement
    except (OSError, UnicodeDecodeError) as exc:
        raise DefectscopeError(f"cannot read config {path}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
        else:
            raise DefectscopeError(f"config {path} must be .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise DefectscopeError(f"config {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    except RecursionError as exc:
        raise DefectscopeError(f"config {path} nests too deeply to be a config") from exc
    if not isinstance(data, dict):
        raise DefectscopeError(f"config {path} must be a mapping with {what}")
    return data
