"""Self-describing safetensors files: a JSON manifest in the header's metadata, checked before use (no torch)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectscope._version import __version__
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.files import json_text, loads_strict

MANIFEST_KEY = "defectscope"
DIGEST_KEY = "defectscope.sha256"  # sha256 of the manifest's text: a hand-edited manifest is refused
TENSORS_KEY = "defectscope.tensors_sha256"  # sha256 of the bytes after the header: a damaged tensor is refused
MAX_HEADER = 100 * 1024 * 1024


def header_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The safetensors header metadata that carries a manifest and its digest."""
    text = json_text(manifest, indent=None)
    return {MANIFEST_KEY: text, DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}


def file_bytes(serialize: Callable[[dict[str, str]], bytes], manifest: dict[str, Any]) -> bytes:
    """A safetensors file (`serialize(metadata)`) whose header carries the manifest, its digest and the sha256 of the
    tensor bytes; serialized twice, as the tensor bytes never depend on the header."""
    metadata = header_metadata(manifest)
    return serialize({**metadata, TENSORS_KEY: _tensors_sha256(serialize(metadata))})  # the first copy freed before


def _tensors_sha256(data: bytes) -> str:
    """The sha256 of a safetensors file's bytes after its header."""
    return hashlib.sha256(memoryview(data)[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()


def peek_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a safetensors file with one, read from its header only; None for anything else."""
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = stream.read(size) if 0 < size <= MAX_HEADER else b""
        manifest = loads_strict(loads_strict(header, "header")["__metadata__"][MANIFEST_KEY], "manifest")
    except (OSError, DefectscopeError, KeyError, TypeError, AttributeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_manifest_file(path: Path, file_format: str) -> bool:
    """Whether `path` is a safetensors file whose manifest declares `file_format` (reads the header only)."""
    manifest = peek_manifest(path)
    return manifest is not None and manifest.get("format") == file_format


def read_header_manifest(data: bytes, path: Path, file_format: str, max_version: int, what: str,
                         digest_since: int) -> dict[str, Any]:
    """Parse and check the manifest in a safetensors header (format, version, its digest from version
    `digest_since` on), and that the file is complete."""
    if len(data) < 8:
        raise ModelFileError(f"{path} is not a {what} (too short: {len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_HEADER, len(data) - 8):
        raise ModelFileError(f"{path} is not a {what}, or it is truncated (bad header length)")
    try:
        header = loads_strict(data[8 : 8 + header_size], f"the header of {path}")
        text = header["__metadata__"][MANIFEST_KEY]
        manifest = loads_strict(text, f"the manifest of {path}")
        digest = header["__metadata__"].get(DIGEST_KEY)
        tensors_digest = header["__metadata__"].get(TENSORS_KEY)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} is not a {what} (no manifest in its header)") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != file_format:
        raise ModelFileError(f"{path} is not a {what} (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{path} is damaged: its format version {version!r} is not a whole number >= 1")
    if version > max_version:
        raise ModelFileError(f"{path} has format version {version}, newer than this defectscope ({__version__}) reads "
                               f"(up to {max_version}); upgrade defectscope")
    if (digest is not None or version >= digest_since) and digest != hashlib.sha256(str(text).encode()).hexdigest():
        raise ModelFileError(f"{what} {path} was altered: its manifest does not match the digest written with it; "
                               "write it again with defectscope (calibrate, export) instead of editing it")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]
    if max(ends, default=0) != len(data) - 8 - header_size:
        raise ModelFileError(f"{what} {path} is corrupt or truncated: its tensors need {max(ends, default=0)} bytes, "
                               f"it holds {len(data) - 8 - header_size}")
    if tensors_digest is not None and tensors_digest != _tensors_sha256(data):
        raise ModelFileError(f"{what} {path} is damaged: its tensors do not match the digest written with them (changed "
                             "on disk or in a copy); copy it again, or promote a kept version")
    return manifest
