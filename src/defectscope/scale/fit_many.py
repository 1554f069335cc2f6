"""`fit-many`: one fit per product of a plan, skipping products whose model file is up to date.

The driver resolves every path, checks every product (a missing folder fails at once, without retries),
fingerprints each product's training images by content and skips those whose model file records the
same fingerprint. On Ray the driver reads a product's training images just before its job is sent, and
they travel with it as bytes. A job fits in a scratch folder of whichever process or Ray node runs it
and returns the model file's bytes; the driver writes them to the product's `out`, atomically. So no
node needs the data, its working directory or its local disk, and a model fitted on Ray is the file this
process would write.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from defectscope.artifacts import check_model_output
from defectscope.data.decode import EncodedImage
from defectscope.data.layout import Dataset, load_dataset
from defectscope.errors import DefectscopeError
from defectscope.files import scratch_folder, write_atomic
from defectscope.jobs import RayCluster, run_jobs
from defectscope.names import check_threads
from defectscope.pipeline import fit_model, warn_defects_learned
from defectscope.progress import ProgressBar, no_progress
from defectscope.scale.plan import Product, fingerprint, fingerprint_of, load_plan, recorded_fingerprint
from defectscope.versions import keeping_replaced


@dataclass(frozen=True)
class FitJob:
    """One product to fit on `threads` threads; with `images`, its training images travel with it as bytes (and
    `dataset` is its layout as read on the driver), so a node that cannot see `product.data` fits the same model."""

    product: Product
    threads: int
    fingerprint: str
    dataset: Dataset | None = None
    images: list[EncodedImage] | None = None


def with_images(job: FitJob) -> FitJob:
    """The job with its training images read here (on the driver), to travel to a Ray node, and the fingerprint of
    those bytes (an image edited since the up-to-date check is fitted, and recorded, as it is now)."""
    dataset = load_dataset(job.product.data)
    images = [EncodedImage.read(sample.path) for sample in dataset.train]
    digests = [(image.path, hashlib.sha256(image.data).hexdigest() if image.data is not None else "unreadable")
               for image in images]
    warn_defects_learned(digests, dataset)
    return replace(job, dataset=dataset, images=images, fingerprint=fingerprint_of(job.product, digests))


def fit_product(job: FitJob) -> dict[str, Any]:
    """Fit one product in a scratch folder; returns the model file's bytes with the report.

    The thread count is part of the job: convolution results depend on it in their last bits, so a
    Ray worker fits exactly what this process would. The process's own count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    try:
        with scratch_folder("fit") as scratch:
            target = Path(scratch) / "model.dsmodel"
            data = job.dataset if job.dataset is not None else job.product.data
            fitted = fit_model(data, job.product.model, job.product.settings, target, fingerprint=job.fingerprint,
                               images=job.images)
            model = target.read_bytes()
    finally:
        torch.set_num_threads(threads)
    return {"status": "fitted", "seconds": time.perf_counter() - start, "images": fitted.report.train_images,
            "model": model}


def fit_many(plan: str | Path, ray_address: str | RayCluster | None = None, retries: int = 2, threads: int | None = None,
             bar: ProgressBar = no_progress) -> list[dict[str, Any]]:
    """Every product of the plan (as Ray tasks with `ray_address`, each holding `threads` CPUs; default: this
    process's torch threads); one row per product, failures reported, not raised."""
    check_threads(threads)
    products = load_plan(plan)
    threads = threads or torch.get_num_threads()
    rows: dict[str, dict[str, Any]] = {}
    jobs = []
    with bar(f"checking {len(products)} product(s): fingerprints of their training images", len(products)) as advance:
        for product in products:
            advance(1)
            row = {"name": product.name, "model": product.model, "out": str(product.out)}
            try:
                current = fingerprint(product)
                if product.out.is_file() and recorded_fingerprint(product.out) == current:
                    rows[product.name] = {**row, "status": "up to date", "seconds": 0.0}
                    continue
                check_model_output(product.out, force=False)
            except DefectscopeError as exc:  # the same on every try: reported now, never retried
                rows[product.name] = {**row, "status": "failed", "error": str(exc)}
                continue
            jobs.append(FitJob(product, threads, current))
    with bar(f"fitting {len(jobs)} product(s)", len(jobs)) as advance:
        outcomes = run_jobs(fit_product, jobs, ray_address, retries, cpus=threads, ship=with_images, done=advance)
    for product, (result, error) in zip((job.product for job in jobs), outcomes):
        row = {"name": product.name, "model": product.model, "out": str(product.out)}
        if error is None:
            with keeping_replaced(product.out, "fit"):  # a model with versions (served): the replaced one kept
                write_atomic(product.out, result.pop("model"))
            rows[product.name] = {**row, **result}
        else:
            rows[product.name] = {**row, "status": "failed", "error": error}
    return [rows[product.name] for product in products]
