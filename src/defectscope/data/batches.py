"""Decoded images in the model frame, batch by batch, decoding ahead in a thread pool (NumPy only)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from defectscope.data.decode import ImageSource, load_image
from defectscope.data.frame import Preprocess
from defectscope.errors import DefectscopeError

# Input pixels per network pass. A pass's widest activations (EfficientNet-Lite's second stage: 96 float32
# channels at half resolution, about 100 bytes per input pixel) then stay within a 32 MB L3 cache; measured on
# a 2-core EPYC, Lite0 an image: 384 x 384 frames 16 ms in passes of 2, 22 ms in passes of 4; 672 x 320 frames
# 25 ms one at a time, 35 ms in passes of 4. The passes' outputs are the same whatever their size.
PASS_PIXELS = 300_000


def images_per_pass(height: int, width: int) -> int:
    """How many frames of `height` x `width` one network pass takes (at least one)."""
    return max(1, PASS_PIXELS // (height * width))


def framed_image(source: ImageSource, preprocess: Preprocess, index: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """One image decoded (or taken as an RGB uint8 array), resized and cropped: (3 x h x w uint8, original (H, W))."""
    image = load_image(source)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectscopeError(f"image {index} must be an RGB uint8 array HxWx3, got {image.dtype} {image.shape}")
    frame = preprocess.resize_crop(image)
    return np.ascontiguousarray(frame.transpose(2, 0, 1)), image.shape[:2]


def iterate_batches(
    images: Sequence[ImageSource], preprocess: Preprocess, batch_size: int = 32, workers: int = 2,
    errors: list[str | None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (uint8 N x 3 x h x w batch, original sizes N x 2); decoding runs ahead in a thread pool.

    OpenCV releases the GIL while decoding and resizing, so threads overlap decoding with
    the model's compute without the start-up cost of worker processes. An unreadable image
    stops the iteration, or, given an `errors` list, becomes a blank frame of size 0 x 0 and
    its reason is appended there (None for every readable image, in input order).
    """
    images = images if isinstance(images, Sequence) else list(images)  # a lazy sequence stays lazy (`selection.Pasted`)
    blank = np.zeros((3, *preprocess.input_shape), dtype=np.uint8)

    def load(index: int) -> tuple[np.ndarray, tuple[int, int], str | None]:
        try:
            return (*framed_image(images[index], preprocess, index), None)
        except DefectscopeError as exc:
            if errors is None:
                raise
            return blank, (0, 0), str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(load, i) for i in range(min(len(images), 2 * batch_size))]
        submitted = len(pending)
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            items = [pending[i - start].result() for i in range(start, stop)]
            pending = pending[stop - start :]
            while submitted < min(len(images), stop + 2 * batch_size):
                pending.append(pool.submit(load, submitted))
                submitted += 1
            if errors is not None:
                errors += [error for _, _, error in items]
            yield np.stack([frame for frame, _, _ in items]), np.array([size for _, size, _ in items], dtype=np.int64)
