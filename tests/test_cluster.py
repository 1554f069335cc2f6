"""`fit-many` and `score` on a Ray cluster of several nodes that cannot read the driver's files: results on the driver,
identical to this process's, with nothing lost or repeated when a node is killed midway."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from defectscope import load_dataset
from defectscope.artifacts import load_model
from defectscope.jobs import RayCluster
from defectscope.pipeline import fit_model
from defectscope.scale.fit_many import fit_many
from defectscope.scale.scoring import score_to_parquet

pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")

HOOKS = Path(__file__).parent  # refuse_driver_files.py, installed in every Ray worker of the cluster


@pytest.fixture(scope="module")
def cluster(demo_root: Path, served_folder: Path):
    """A head without CPUs and two 1-CPU worker nodes (so the work runs on the workers), whose processes may not open
    anything under the demo data or the served model's folder; connected through a RayCluster whose runtime_env
    installs that refusal."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
    hidden = [str(demo_root.resolve()), str(served_folder.resolve())]
    where = RayCluster(nodes.address, runtime_env={  # a runtime_env as `--ray-env` gives it
        "env_vars": {"PYTHONPATH": str(HOOKS), "DRIVER_ONLY": ":".join(hidden)},
        "worker_process_setup_hook": "refuse_driver_files.install"})
    where.connect()
    yield nodes, workers, where
    ray.shutdown()
    nodes.shutdown()


# A driver as the CLI is one: a new interpreter whose environment knows no token.
TOKEN_CHECK = """
import sys
from pathlib import Path
from defectscope.errors import DefectscopeError
from defectscope.jobs import RayCluster, run_jobs


def square(number):
    return number * number


try:
    print(run_jobs(square, [3], RayCluster(sys.argv[1], Path(sys.argv[2]))))
except DefectscopeError as exc:
    print(exc)
"""


@pytest.fixture(scope="module")
def token_cluster():
    """A one-node cluster started by `ray start` that demands a token, as Ray 2.60+ does once a token exists; its
    address, token and environment without Ray's variables. Its processes are killed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ray-token-"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
                    f"--temp-dir={folder}", "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   capture_output=True, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, timeout=120)
    yield f"127.0.0.1:{port}", token, env
    stop_cluster(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_cluster(folder: Path) -> None:
    """Kill the processes of a cluster whose command lines name `folder` (as `ray start`'s do), then remove it."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("given, expected", [("right", "[(9, None)]"), ("wrong", "cannot connect to the Ray cluster")])
def test_a_cluster_that_demands_a_token_gets_the_token_files(token_cluster, tmp_path: Path, given: str,
                                                             expected: str) -> None:
    """The driver passes the token in --ray-token-file, and only that one; a refused token is one clear line."""
    address, token, env = token_cluster
    (tmp_path / "right").write_text(token)
    (tmp_path / "wrong").write_text(secrets.token_hex(16))
    result = subprocess.run([sys.executable, "-c", TOKEN_CHECK, address, str(tmp_path / given)], capture_output=True,
                            text=True, timeout=300, env={**env, "HOME": str(tmp_path)})  # no ~/.ray/auth_token
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout.splitlines()[-1], result.stdout


def test_ray_local_starts_its_own_instance_whatever_cluster_the_machine_names(token_cluster, served_folder: Path,
                                                                             demo_root: Path, tmp_path: Path) -> None:
    """`--ray local` is a private instance even where RAY_ADDRESS (or the latest `ray start`) names a cluster on this
    machine: it neither joins that cluster's jobs nor needs its token, nor loses its actors when it stops."""
    address, _token, env = token_cluster
    out = tmp_path / "scores"
    run = subprocess.run([sys.executable, "-c", "from defectscope.cli import main; main()", "-q", "score",
                          str(served_folder / "part.dsmodel"), str(demo_root / "test" / "good"), "--out", str(out),
                          "--ray", "local"], capture_output=True, text=True, timeout=300,
                         env={**env, "RAY_ADDRESS": address, "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]  # before: it joined the token cluster, and was refused
    assert pq.read_table(out).num_rows == len(list((demo_root / "test" / "good").glob("*.png")))


def test_fit_many_on_a_cluster_without_the_drivers_files(cluster, demo_root: Path, tmp_path: Path) -> None:
    """The training images travel with the job; the model file comes back and is the one this process fits."""
    settings = {"image_size": 64, "crop": None, "calibration_folds": 4}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"defaults": {"model": "patchcore", "settings": settings},
                                    "products": [{"name": "part", "data": str(demo_root)}]}))
    rows = fit_many(plan, ray_address=cluster[2], retries=0, threads=1)
    assert rows[0]["status"] == "fitted", rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = load_model(fit_model(demo_root, "patchcore", settings, tmp_path / "direct.dsmodel").path).tensors()
    finally:
        torch.set_num_threads(threads)
    shipped = load_model(tmp_path / "models" / "part.dsmodel").tensors()
    assert shipped.keys() == direct.keys() and all(torch.equal(shipped[k], direct[k]) for k in direct)


def test_score_on_a_cluster_without_the_drivers_files_survives_a_lost_node(cluster, demo_root: Path,
                                                                            served_folder: Path, tmp_path: Path) -> None:
    nodes, workers, where = cluster
    model = served_folder / "part.dsmodel"
    images = [s.path for s in load_dataset(demo_root).test]

    def read(path: str) -> bytes:
        return Path(path).read_bytes()

    with pytest.raises(ray.exceptions.RayTaskError, match="on the driver only"):  # the workers cannot read them
        ray.get(ray.remote(read).options(num_cpus=1).remote(str(images[0])))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' count: convolution results depend on it in their last bits
    try:
        local = score_to_parquet(model, images, tmp_path / "local", chunk_images=3)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "on-cluster"
    finished: dict = {}
    run = threading.Thread(target=lambda: finished.update(
        score_to_parquet(model, images, out, ray_address=where, workers=2, chunk_images=3, threads=1)))
    run.start()
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    parts_before = len(list(out.glob("part-*.parquet")))
    nodes.remove_node(workers[0], allow_graceful=False)  # a worker node is lost midway: its actor starts elsewhere
    nodes.add_node(num_cpus=1)
    run.join(timeout=600)
    assert not run.is_alive() and finished["failed"] == 0, finished
    assert 0 < parts_before < local["chunks"]  # the node was lost while chunks were still out
    assert finished["chunks"] == local["chunks"]
    expected = pq.read_table(tmp_path / "local").sort_by("path").to_pydict()
    table = pq.read_table(out).sort_by("path").to_pydict()
    assert table["path"] == sorted(map(str, images))  # every image exactly once
    assert table == expected  # the same rows as in this process (same threads: the same bits)


# A driver whose job needs the package on the worker (run_jobs's wrapper is defectscope's); argv: address [py_modules].
PACKAGE_CHECK = """
import sys
from defectscope.jobs import RayCluster, run_jobs


def origin(_item):
    import defectscope
    return defectscope.__file__


runtime_env = {"py_modules": sys.argv[2:]} if sys.argv[2:] else {}
print(run_jobs(origin, [0], RayCluster(sys.argv[1], runtime_env=runtime_env), retries=0))
"""


def test_a_node_without_the_package_gets_it_from_the_runtime_env(tmp_path: Path) -> None:
    """A worker node whose Python has every library but defectscope runs nothing of ours until --ray-env's py_modules
    ships the package: then the job runs, with the package unpacked by Ray on that node."""
    import defectscope

    folder = Path(tempfile.mkdtemp(prefix="ray-bare-"))  # short: Ray's socket paths live under it
    try:
        bare = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
        libraries = next(p for p in sys.path if (Path(p) / "ray" / "__init__.py").is_file())
        # This environment's libraries as a plain folder: its .pth files (the installed defectscope) are not read.
        (next((bare / "lib").glob("python*/site-packages")) / "libraries.pth").write_text(libraries + "\n")
        python = str(bare / "bin" / "python")
        missing = subprocess.run([python, "-c", "import defectscope"], capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "No module named 'defectscope'" in missing.stderr
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_AUTH_MODE": "disabled"}
        address = f"127.0.0.1:{free_port()}"
        ray_cli = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
        start = ["start", "--disable-usage-stats"]
        subprocess.run([sys.executable, "-c", ray_cli, *start, "--head", f"--port={address.split(':')[1]}",
                        "--num-cpus=0", f"--temp-dir={folder / 'ray'}", "--include-dashboard=false"],
                       check=True, capture_output=True, env=env, timeout=120, cwd=folder)
        subprocess.run([python, "-c", ray_cli, *start, f"--address={address}", "--num-cpus=1"], check=True,
                       capture_output=True, env=env, timeout=120, cwd=folder)
        package = str(Path(defectscope.__file__).parent)
        runs = [subprocess.run([sys.executable, "-c", PACKAGE_CHECK, address, *modules], capture_output=True,
                               text=True, timeout=300, env=env, cwd=tmp_path) for modules in ([], [package])]
        assert all(run.returncode == 0 for run in runs), [run.stderr[-2000:] for run in runs]
        without, shipped = (run.stdout.splitlines()[-1] for run in runs)
        assert without.startswith("[(None, ") and "failed to import on the worker" in without, without
        assert shipped.startswith("[('") and "runtime_resources" in shipped and package not in shipped, shipped
    finally:
        stop_cluster(folder)
