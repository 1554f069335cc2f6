"""Independent jobs run in this process (a plain loop) or as Ray tasks: the same function, retried, then reported."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from defectscope.errors import DefectscopeError
from defectscope.process import worker_environment

LOCAL = "local"  # --ray local: start a Ray instance on this machine


def connect_ray(address: str) -> Any:
    """Ray, connected to `address` (a running cluster) or, for 'local', to a new instance on this machine."""
    try:
        import ray
    except ImportError as exc:
        raise DefectscopeError("running on Ray needs Ray: pip install 'defectscope[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=None if address == LOCAL else address, include_dashboard=False, log_to_driver=False,
                 runtime_env=worker_environment())
    return ray


def run_jobs(function: Callable[[Any], Any], items: Sequence[Any], ray_address: str | None = None,
             retries: int = 2, cpus: int = 1, ship: Callable[[Any], Any] | None = None) -> list[tuple[Any, str | None]]:
    """(result, None) or (None, error) per item, in order; each job is tried up to 1 + `retries` times.

    On Ray each job holds `cpus` CPUs and is also retried when its worker dies (the process exits or
    the node is lost). `ship` turns an item into what travels to the worker (its files' bytes, say)
    just before it is sent, and at most twice as many jobs as the cluster's CPUs hold are out at once,
    so what travels stays bounded.
    """
    if ray_address is None:
        return [_local(function, item, retries) for item in items]
    ray = connect_ray(ray_address)
    remote = ray.remote(function).options(max_retries=retries, retry_exceptions=True, num_cpus=cpus)
    limit = max(1, 2 * int(ray.cluster_resources().get("CPU", 0) // cpus))
    outcomes: list[tuple[Any, str | None]] = [(None, None)] * len(items)
    waiting, out = iter(enumerate(items)), {}

    def send() -> None:
        job = next(waiting, None)
        if job is not None:
            out[remote.remote(ship(job[1]) if ship is not None else job[1])] = job[0]

    for _ in range(limit):
        send()
    while out:
        (ref,), _ = ray.wait(list(out), num_returns=1)
        index = out.pop(ref)
        try:
            outcomes[index] = (ray.get(ref), None)
        except ray.exceptions.RayError as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
            outcomes[index] = (None, _reason(cause))
        send()
    return outcomes


def _local(function: Callable[[Any], Any], item: Any, retries: int) -> tuple[Any, str | None]:
    for attempt in range(retries + 1):
        try:
            return function(item), None
        except Exception as exc:  # noqa: BLE001  (any failure of one job is reported; the others go on)
            if attempt == retries:
                return None, _reason(exc)
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if isinstance(exc, DefectscopeError) and text else f"{type(exc).__name__}: {' '.join(text)[:300]}"


def map_on_ray(ray_address: str, cpus: int) -> Callable[[Callable[[Any], Any], list], list]:
    """A map that runs each job as a Ray task holding `cpus` CPUs and returns the results in order; any failure
    (after retries) raises."""
    def mapped(function: Callable[[Any], Any], items: list) -> list:
        outcomes = run_jobs(function, items, ray_address, cpus=cpus)
        failed = [error for _, error in outcomes if error is not None]
        if failed:
            raise DefectscopeError(f"{len(failed)} of {len(items)} Ray jobs failed; the first: {failed[0]}")
        return [result for result, _ in outcomes]

    return mapped
