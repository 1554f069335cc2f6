"""Uploaded images: bounded reads, content sniffed from the bytes, pixel limit before decoding."""

from __future__ import annotations

import io
import warnings

import numpy as np
from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

from defectscope.data.decode import ImageTooLarge, decode_image, max_pixels
from defectscope.errors import DefectscopeError

FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF", "WEBP"})  # what the decoder reads; sniffed, never taken from the name


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, refusing (413) as soon as it exceeds `limit`."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{upload.filename or 'an upload'} is larger than {limit:,} bytes")
    return data


def sniff(data: bytes, name: str) -> int:
    """The pixel count from the header of an image format the decoder reads: 415 for anything else, whatever the
    file is called; 413 above the pixel limit (before any pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                kind, pixels = image.format, image.width * image.height
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"{name} has more pixels than the limit of {max_pixels():,}") from exc
    except (UnidentifiedImageError, OSError, ValueError):
        kind, pixels = None, 0
    if kind not in FORMATS:
        raise HTTPException(415, f"{name} is not a PNG, JPEG, BMP, TIFF or WebP image")
    if pixels > max_pixels():
        raise HTTPException(413, f"{name} has {pixels:,} pixels, above the limit of {max_pixels():,}")
    return pixels


def decode(data: bytes, name: str) -> np.ndarray:
    """RGB pixels of a sniffed upload; too many pixels is 413, a broken file 400 (checked before decoding)."""
    try:
        return decode_image(np.frombuffer(data, np.uint8), name, checked=True)  # sniff checked the header
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except DefectscopeError as exc:
        raise HTTPException(400, str(exc)) from exc
