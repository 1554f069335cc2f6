"""Independent jobs run in this process (a plain loop) or as Ray tasks: the same function, retried, then reported."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError, InputError, SettingsError
from defectscope.process import worker_environment

LOCAL = "local"  # --ray local: start a Ray instance on this machine
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"  # where Ray (2.60+, token authentication) reads the cluster's token
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
CONNECT_TIMEOUT_S = 10.0  # a cluster's head answers a TCP connection at once; none in this time: nothing is there
ENV_PATH_FIELDS = ("working_dir", "py_modules")  # runtime_env fields naming local paths, resolved on the driver


@dataclass(frozen=True)
class RayCluster:
    """Where Ray jobs run: a cluster `address` ('local': a new instance on this machine), the file holding the
    cluster's token (`ray get-auth-token` prints it) and Ray's runtime_env for nodes without the package."""

    address: str = LOCAL
    token_file: Path | None = None
    runtime_env: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_files(cls, address: str, token_file: Path | None = None, env_file: Path | None = None) -> RayCluster:
        """The cluster of the command line: the token file checked, the runtime_env read from a YAML/TOML file,
        its local paths resolved against that file's folder."""
        from defectscope.config_files import read_mapping

        if token_file is not None and not (token_file.is_file() and token_file.stat().st_size):
            raise InputError(f"Ray token file {token_file} does not exist or is empty (`ray get-auth-token` on the "
                             "head node prints the token)")
        env = read_mapping(env_file, "Ray runtime_env fields (pip, working_dir, py_modules, env_vars, ...)") \
            if env_file is not None else {}
        for name in ENV_PATH_FIELDS:
            if name in env:
                env[name] = _resolved(env[name], env_file.parent)
        return cls(address, token_file.resolve() if token_file else None, env)

    def connect(self) -> Any:
        """Ray, connected (once per process) with the token and the runtime_env."""
        if self.token_file is not None:  # before Ray loads: it reads its authentication settings once
            os.environ[TOKEN_PATH_VARIABLE] = str(self.token_file)
            os.environ.setdefault(AUTH_MODE_VARIABLE, "token")
        try:
            import ray
        except ImportError as exc:
            raise DefectscopeError("running on Ray needs Ray: pip install 'defectscope[ray]'") from exc
        if ray.is_initialized():
            return ray
        if self.address != LOCAL:
            self._answers()
        runtime_env = {**self.runtime_env}
        runtime_env["env_vars"] = {**worker_environment()["env_vars"], **runtime_env.get("env_vars", {})}
        try:
            local = self.address == LOCAL  # a private instance: Ray's notes on starting it are noise to the user
            # "local", not None: None would join the latest cluster `ray start` left on this machine (its jobs,
            # its token), and lose its actors when that cluster stops
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR if local else logging.WARNING, runtime_env=runtime_env)
        except (ray.exceptions.AuthenticationError, ConnectionError) as exc:
            raise InputError(f"cannot connect to the Ray cluster at {self.address}: no cluster answers there, or it "
                             "refused this process's token (pass it with --ray-token-file; `ray get-auth-token` on "
                             "the head node prints it)") from exc
        except (TypeError, ValueError) as exc:  # Ray's check of the runtime_env
            raise SettingsError(f"Ray refused the runtime_env: {' '.join(str(exc).split())[:300]}") from exc
        return ray

    def _answers(self) -> None:
        """Raise at once when nothing listens at a host:port address (Ray itself retries for minutes, logging as it
        goes); other addresses ('auto', a name Ray resolves) are left to Ray."""
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            return
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise InputError(f"cannot connect to the Ray cluster at {self.address}: nothing answers there "
                             f"({exc.strerror or exc}); start it (`ray start --head`) or give its address") from exc


def _resolved(value: Any, folder: Path) -> Any:
    """A runtime_env path field with its local paths made absolute (URIs such as s3://... kept as written)."""
    if isinstance(value, list):
        return [_resolved(item, folder) for item in value]
    if isinstance(value, str) and "://" not in value:
        return str((folder / value).resolve())
    return value


def connect_ray(cluster: str | RayCluster) -> Any:
    """Ray, connected to `cluster` (an address, or a RayCluster with its token and runtime_env)."""
    return (cluster if isinstance(cluster, RayCluster) else RayCluster(cluster)).connect()


def check_cpus(ray: Any, cpus: int) -> None:
    """Raise unless a node of the cluster has `cpus` CPUs: Ray waits for ever on a task or actor no node can hold."""
    largest = max((node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if cpus > largest:
        raise SettingsError(f"each Ray task or actor would hold {cpus} CPUs, and the largest node of the cluster has "
                            f"{largest:g}: give --threads {int(largest)} or fewer")


def run_jobs(function: Callable[[Any], Any], items: Sequence[Any], ray_address: str | RayCluster | None = None,
             retries: int = 2, cpus: int = 1, ship: Callable[[Any], Any] | None = None,
             done: Callable[[int], None] = lambda _n: None) -> list[tuple[Any, str | None]]:
    """(result, None) or (None, error) per item, in order. A job that fails on its input (a DefectscopeError: the same
    on every try) is reported at once; any other failure is tried again, up to `retries` times.

    On Ray each job holds `cpus` CPUs and is also retried when its worker dies (the process exits or
    the node is lost). `ship` turns an item into what travels to the worker (its files' bytes, say)
    just before it is sent, and at most twice as many jobs as the cluster's CPUs hold are out at once,
    so what travels stays bounded. `done(1)` is called as each job finishes (a progress bar's advance).
    """
    job = _reporting(function)
    if ray_address is None:
        local = []
        for item in items:
            local.append(_local(job, item, retries))
            done(1)
        return local
    ray = connect_ray(ray_address)
    check_cpus(ray, cpus)
    remote = ray.remote(job).options(max_retries=retries, retry_exceptions=True, num_cpus=cpus)
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
            outcomes[index] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
            outcomes[index] = (None, _reason(cause))
        done(1)
        send()
    return outcomes


def _reporting(function: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, str | None]]:
    """`function` returning (result, None), or (None, reason) when it fails on its input: such a failure is not retried."""
    def job(item: Any) -> tuple[Any, str | None]:
        try:
            return function(item), None
        except DefectscopeError as exc:
            return None, _reason(exc)

    return job


def _local(job: Callable[[Any], tuple[Any, str | None]], item: Any, retries: int) -> tuple[Any, str | None]:
    for attempt in range(retries + 1):
        try:
            return job(item)
        except Exception as exc:  # noqa: BLE001  (any failure of one job is reported; the others go on)
            if attempt == retries:
                return None, _reason(exc)
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if isinstance(exc, DefectscopeError) and text else f"{type(exc).__name__}: {' '.join(text)[:300]}"


def map_on_ray(ray_address: str | RayCluster, cpus: int) -> Callable[[Callable[[Any], Any], list], list]:
    """A map that runs each job as a Ray task holding `cpus` CPUs and returns the results in order; any failure
    (after retries) raises."""
    def mapped(function: Callable[[Any], Any], items: list) -> list:
        outcomes = run_jobs(function, items, ray_address, cpus=cpus)
        failed = [error for _, error in outcomes if error is not None]
        if failed:
            raise DefectscopeError(f"{len(failed)} of {len(items)} Ray jobs failed; the first: {failed[0]}")
        return [result for result, _ in outcomes]

    return mapped
