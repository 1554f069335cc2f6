"""Dynamic batching: concurrent requests to one model are gathered into one model call.

The first waiting image opens a batch; images arriving within `wait_ms` (up to `max_batch`) join
it. Inference runs in one worker thread per model, off the event loop. At most `max_queue`
images wait; more is refused at once (the caller answers 503), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from defectscope.prediction import Prediction
from defectscope.predictor import Predictor


class QueueFull(Exception):
    """More images are waiting for this model than the service allows."""


@dataclass
class _Job:
    images: list[np.ndarray]
    future: asyncio.Future


class Batcher:
    """Gathers images for one model and runs them through `predict` in batches."""

    def __init__(self, detector: Predictor, max_batch: int = 32, wait_ms: float = 5.0, max_queue: int = 256,
                 max_queue_pixels: int = 512_000_000) -> None:
        self.detector, self.max_batch, self.wait, self.max_queue = detector, max_batch, wait_ms / 1000, max_queue
        self.max_queue_pixels = max_queue_pixels
        self.pending = 0  # images admitted: being decoded, queued or being scored
        self.pending_pixels = 0  # their pixels (from the headers)
        self.batches = 0  # model calls made
        self._retired = False
        self.closed = asyncio.Event()  # set once it is closed: it answers nothing more
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"defectscope-{detector.name}")

    @contextmanager
    def admit(self, count: int, pixels: int) -> Iterator[None]:
        """Hold room for `count` images of `pixels` pixels in all (before they are decoded); QueueFull at once if there is none."""
        if self.closed.is_set():
            raise QueueFull("the model was replaced; the new one serves this name")
        if self.pending + count > self.max_queue:
            raise QueueFull(f"{self.pending} images are waiting; the limit is {self.max_queue}")
        if self.pending_pixels + pixels > self.max_queue_pixels:
            raise QueueFull(f"{self.pending_pixels:,} pixels are waiting; the limit is {self.max_queue_pixels:,}")
        self.pending, self.pending_pixels = self.pending + count, self.pending_pixels + pixels
        try:
            yield
        finally:
            self.pending, self.pending_pixels = self.pending - count, self.pending_pixels - pixels
            if self._retired and not self.pending:
                self.close()

    async def predict(self, images: list[np.ndarray], admitted: bool = False) -> Prediction:
        """Scores and model-frame maps of these images, scored together with whatever else is waiting.

        `admitted`: the caller already holds room for them (`admit`); otherwise they are admitted here.
        """
        if not admitted:
            with self.admit(len(images), sum(image.shape[0] * image.shape[1] for image in images)):
                return await self.predict(images, admitted=True)
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _gather(self, jobs: list[_Job]) -> None:
        """Fill `jobs` with the next batch: the first job, then whatever arrives within the wait, up to max_batch images."""
        loop = asyncio.get_running_loop()
        jobs.clear()
        jobs.append(await self._queue.get())
        count, deadline = len(jobs[0].images), loop.time() + self.wait
        while count < self.max_batch:
            try:
                remaining = deadline - loop.time()
                job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (TimeoutError, asyncio.QueueEmpty):
                break
            jobs.append(job)
            count += len(job.images)

    async def _run(self) -> None:
        jobs: list[_Job] = []
        try:
            await self._serve(jobs)
        finally:  # closed (model replaced or shutdown): nobody waits forever; callers answer 503 and retry
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(QueueFull("the model was replaced or the service is stopping"))

    async def _serve(self, jobs: list[_Job]) -> None:
        """Gather and score batches until cancelled; `jobs` holds the batch in progress."""
        loop = asyncio.get_running_loop()
        while True:
            await self._gather(jobs)
            images = [image for job in jobs for image in job.images]
            try:
                prediction = await loop.run_in_executor(self._executor, self._predict, images)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, none hangs
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for job in jobs:
                stop = start + len(job.images)
                if not job.future.done():
                    job.future.set_result(_slice(prediction, start, stop))
                start = stop

    def _predict(self, images: list[np.ndarray]) -> Prediction:
        return self.detector.predict(images, map_size="input", keep_going=True)  # callers map back only when asked

    def retire(self) -> None:
        """Close once every admitted image has its answer: requests in flight finish on this model."""
        self._retired = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        self.closed.set()
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _slice(prediction: Prediction, start: int, stop: int) -> Prediction:
    return Prediction(prediction.scores[start:stop], None if prediction.maps is None else prediction.maps[start:stop],
                      prediction.threshold, None if prediction.errors is None else prediction.errors[start:stop],
                      None if prediction.detections is None else prediction.detections[start:stop])
