"""Uploaded images: bounded reads, content sniffed from the bytes, pixel limit before decoding."""

from __future__ import annotations

import io

import numpy as np
from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

from defectscope.data.decode import ImageTooLarge, decode_image
from defectscope.errors import DefectscopeError

FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF", "WEBP"})  # what the decoder reads; sniffed, never taken from the name


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, refusing (413) as soon as it exceeds `limit`."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{upload.filename or 'an upload'} is larger than {limit:,} bytes")
    return data


def sniff(data: bytes, name: str) -> None:
    """Refuse (415) bytes that are not an image format the decoder reads, whatever the file is called."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        kind = None
    if kind not in FORMATS:
        raise HTTPException(415, f"{name} is not a PNG, JPEG, BMP, TIFF or WebP image")


def decode(data: bytes, name: str) -> np.ndarray:
    """RGB pixels of a sniffed upload; too many pixels is 413, a broken file 400 (checked before decoding)."""
    try:
        return decode_image(np.frombuffer(data, np.uint8), name)
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except DefectscopeError as exc:
        raise HTTPException(400, str(exc)) from exc
