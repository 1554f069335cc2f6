"""Process-wide settings, made once by an entry point (the CLI, Ray's workers, the benchmarks), never on import."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from typing import Any

# OpenMP threads that sleep when idle instead of spinning: torch's spinning workers otherwise take the cores of the
# image decoders and of the NumPy search between backbone passes (bottle, PatchCore, batch 1: 86 -> 60 ms/image; fit
# 11.5 -> 10.3 s). Sleeping at once, they paid a wake-up for each of a pass's ~170 operators, microseconds apart: a
# spin of 10,000 rounds (about 0.1 ms, GNU OpenMP's) bridges those gaps and still sleeps through the decoders' and the
# search's (PatchCore, batch 1: bottle 59 -> 48, fine-defects 62 -> 57, juice_bottle 76 -> 70 ms/image, medians of 4;
# bottle's fit 37.5 -> 33 s; batched unchanged). OpenMP reads them when torch loads, so an entry point sets them
# first; a value the user set wins.
THREAD_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}

# glibc's allocator gives every block above 32 MB a mapping of its own and unmaps it when freed, so each backbone pass
# had its activations (hundreds of MB a batch) mapped and zero-filled again page by page: juice_bottle's fit spent 26
# of its 150 CPU seconds in the kernel, 10 million page faults. Blocks from the heap instead, and up to 256 MB of
# freed heap kept for the next pass (a batch's activations): that fit spends 4 s in the kernel, 13 s less in all; its
# peak 2.07 -> 2.2-2.6 GB across runs at 32 images a pass (holes in the heap that a slightly larger block cannot
# reuse; PatchCore now passes 16 images, 1.9 GB). One arena for every thread: a thread's own arena keeps what it freed
# for that thread alone (its heaps, under 256 MB each, are never trimmed), so the threads that hold large arrays (the
# shard coresets, the search's scans, the decoders) each kept their own high-water mark (threaded-parts' fit and
# scoring 2624-2725 -> 2303-2316 MB, juice_bottle's 2058 -> 1897, the same time). glibc reads these variables when a
# process starts (a new process gets them in its environment); a running one gets them by `mallopt`, which an arena
# a thread already has keeps.
ALLOCATOR_POLICY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_ARENA_MAX": "1"}
MALLOPT_OPTIONS = {"MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_ARENA_MAX": -8}  # glibc's M_MMAP_MAX,
# M_TRIM_THRESHOLD and M_ARENA_MAX


def configure_process() -> None:
    """Give this process the thread policy (before torch loads) and the allocator policy."""
    for name, value in THREAD_POLICY.items():
        os.environ.setdefault(name, value)
    configure_allocator()


def _glibc(name: str) -> Any:
    """A function of glibc's allocator, or None off Linux or without glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None


def configure_allocator() -> None:
    """The allocator policy for this running process (glibc only; a variable the user set wins)."""
    mallopt = _glibc("mallopt")
    for name, value in ALLOCATOR_POLICY.items():
        if mallopt is not None and name not in os.environ:
            mallopt(MALLOPT_OPTIONS[name], int(value))


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`), between phases of a fit: under the
    allocator policy freed heap is kept for reuse, and a block still live above the holes keeps them all in memory."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def release_memory() -> None:
    """Collect what is no longer referenced (a replaced model sits in reference cycles) and give the freed heap back
    to the system (`release_free_heap`)."""
    gc.collect()
    release_free_heap()


def freeze_loaded() -> None:
    """Take every object alive now out of the collector's sight (`gc.freeze`), in `serve` once its libraries are
    loaded: each full collection scanned their ~340,000 objects with the GIL held, a pause of 150-230 ms every 15-20 s
    of load that every request in flight waited through (bottle, OpenVINO, 16 clients: 3-11 ms after). Frozen objects
    are still freed when nothing refers to them; a cycle among them is not, so what may be replaced (a served model) is
    loaded after. (`watch`, one image at a time, makes little garbage: the collection before the freeze, ~150 ms,
    would only delay its first part after a restart.)"""
    gc.collect()
    gc.freeze()


def worker_environment() -> dict[str, Any]:
    """The environment of a new worker process (Ray's runtime_env, the benchmarks' processes): both policies, or the
    user's values, in place before it starts."""
    policies = {**THREAD_POLICY, **ALLOCATOR_POLICY}
    return {"env_vars": {name: os.environ.get(name, value) for name, value in policies.items()}}
