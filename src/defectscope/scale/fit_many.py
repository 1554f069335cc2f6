"""`fit-many`: one fit per product of a plan, skipping products whose model file is up to date."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from defectscope.jobs import run_jobs
from defectscope.pipeline import fit_model
from defectscope.scale.plan import Product, fingerprint, load_plan, recorded_fingerprint


def fit_product(job: tuple[Product, int]) -> dict[str, Any]:
    """Fit one product on `threads` threads unless its model file already records the same data and settings.

    The thread count is part of the job: convolution results depend on it in their last bits, so a
    Ray worker fits exactly what this process would.
    """
    product, threads = job
    torch.set_num_threads(threads)
    current = fingerprint(product)
    if product.out.is_file() and recorded_fingerprint(product.out) == current:
        return {"status": "up to date", "seconds": 0.0}
    start = time.perf_counter()
    fitted = fit_model(product.data, product.model, product.settings, product.out, fingerprint=current)
    return {"status": "fitted", "seconds": time.perf_counter() - start, "images": fitted.report.train_images}


def fit_many(plan: str | Path, ray_address: str | None = None, retries: int = 2, threads: int | None = None
             ) -> list[dict[str, Any]]:
    """Every product of the plan (as Ray tasks with `ray_address`, each holding `threads` CPUs; default: this
    process's torch threads); one row per product, failures reported, not raised."""
    products = load_plan(plan)
    threads = threads or torch.get_num_threads()
    jobs = [(product, threads) for product in products]
    rows = []
    for product, (result, error) in zip(products, run_jobs(fit_product, jobs, ray_address, retries, cpus=threads)):
        row = {"name": product.name, "model": product.model, "out": str(product.out)}
        rows.append({**row, **result} if error is None else {**row, "status": "failed", "error": error})
    return rows
