"""Process-wide settings, made once by an entry point (the CLI, Ray's workers), never on import."""

from __future__ import annotations

import os
from typing import Any

# OpenMP threads that sleep when idle instead of spinning: torch's spinning workers otherwise take the cores of the
# image decoders and of the NumPy search between backbone passes (bottle, PatchCore, batch 1: 86 -> 60 ms/image; fit
# 11.5 -> 10.3 s). OpenMP reads it when torch loads, so an entry point sets it first; a value the user set wins.
THREAD_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_threads() -> None:
    """Give this process the thread policy (before torch loads)."""
    for name, value in THREAD_POLICY.items():
        os.environ.setdefault(name, value)


def worker_environment() -> dict[str, Any]:
    """Ray's runtime_env for the workers: the same thread policy (or the user's value), set before they load torch."""
    return {"env_vars": {name: os.environ.get(name, value) for name, value in THREAD_POLICY.items()}}
