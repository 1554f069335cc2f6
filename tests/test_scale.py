"""fit-many and score: in this process and on a local Ray instance, with the same results; failures and resumption."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from defectscope import load_dataset
from defectscope.artifacts import load_model
from defectscope.errors import DefectscopeError
from defectscope.pipeline import fit_model
from defectscope.scale import scoring
from defectscope.scale.fit_many import FitJob, fit_many, fit_product, with_images
from defectscope.jobs import RayCluster, run_jobs
from defectscope.scale.plan import fingerprint, load_plan, recorded_fingerprint
from defectscope.scale.scoring import score_to_parquet
from defectscope.files import file_sha256
from defectscope.names import version_of
from defectscope.versions import VersionStore

pq = pytest.importorskip("pyarrow.parquet")
SMALL = {"image_size": 64, "crop": None, "calibration_folds": 4}


def _plan(folder: Path, products: list[dict], defaults: dict | None = None) -> Path:
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults or {"model": "patchcore", "settings": SMALL},
                                    "products": products}))
    return path


def _same_model(a: Path, b: Path) -> bool:
    first, second = load_model(a).tensors(), load_model(b).tensors()
    return first.keys() == second.keys() and all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def test_fit_many_fits_reports_failures_and_skips_what_is_up_to_date(demo_root: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, [{"name": "part", "data": str(demo_root)},
                            {"name": "part-knn", "data": str(demo_root), "model": "knn"},
                            {"name": "missing", "data": "no-such-folder"}])
    rows = {row["name"]: row for row in fit_many(plan, retries=1)}
    assert rows["part"]["status"] == rows["part-knn"]["status"] == "fitted"
    assert rows["missing"]["status"] == "failed" and "does not exist" in rows["missing"]["error"]
    direct = fit_model(demo_root, "patchcore", SMALL, tmp_path / "direct.dsmodel").path
    assert _same_model(tmp_path / "models" / "part.dsmodel", direct)
    again = {row["name"]: row["status"] for row in fit_many(plan, retries=0)}
    assert again == {"part": "up to date", "part-knn": "up to date", "missing": "failed"}
    store, _ = VersionStore.of(tmp_path / "models" / "part.dsmodel")
    served = store.adopt("part")["version"]  # served: a refit keeps the model it replaces
    first = load_dataset(demo_root).train[0].path
    stat, original = os.stat(first), first.read_bytes()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, same content: up to date
    try:
        assert {row["name"]: row["status"] for row in fit_many(plan, retries=0)}["part"] == "up to date"
        image = np.asarray(Image.open(first)).copy()
        image[0, 0] ^= 1  # one pixel edited, the file's time kept
        Image.fromarray(image).save(first)
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert {row["name"]: row["status"] for row in fit_many(plan, retries=0)}["part"] == "fitted"
        refit = store.history("part")
        assert (refit["versions"][-1]["action"], refit["versions"][-1]["parent"]) == ("fit", served)
        assert refit["active"] == version_of(file_sha256(tmp_path / "models" / "part.dsmodel")) != served
    finally:
        first.write_bytes(original)
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_fit_job_returns_its_model_and_the_driver_writes_it(demo_root: Path, tmp_path: Path) -> None:
    """No shared file system: the job fits in its own scratch folder and sends the bytes back; a copy of the data
    elsewhere (other times) has the same fingerprint, so a copy on another node is not a reason to refit."""
    plan = _plan(tmp_path, [{"name": "part", "data": str(demo_root)}])
    product = load_plan(plan)[0]
    copy = tmp_path / "copy"
    shutil.copytree(demo_root, copy, copy_function=shutil.copyfile)  # new modification times
    assert fingerprint(product) == fingerprint(replace(product, data=copy))
    left = Path(tempfile.gettempdir()) / f"defectscope-fit-{_dead_pid()}-x1y2"  # a job killed with its node left it
    left.mkdir()
    result = fit_product(FitJob(product, 2, fingerprint(product)))
    assert not product.out.exists() and result["model"][:8] != b""  # nothing written where the job ran
    assert not left.exists()
    product.out.parent.mkdir(parents=True)
    product.out.write_bytes(result["model"])
    assert recorded_fingerprint(product.out) == fingerprint(product)
    assert {row["name"]: row["status"] for row in fit_many(plan, retries=0)} == {"part": "up to date"}


def test_a_shipped_job_records_the_fingerprint_of_the_bytes_it_carries(demo_root: Path, tmp_path: Path) -> None:
    """An image edited after the up-to-date check travels as it is now, and the model records that content."""
    data = tmp_path / "part"
    shutil.copytree(demo_root, data)
    product = load_plan(_plan(tmp_path, [{"name": "part", "data": str(data)}]))[0]
    checked = fingerprint(product)
    first = load_dataset(data).train[0].path
    first.write_bytes(load_dataset(data).train[1].path.read_bytes())  # edited between the check and the shipping
    shipped = with_images(FitJob(product, 1, checked))
    assert shipped.fingerprint != checked
    assert shipped.fingerprint == fingerprint(product)


def test_scratch_folders_of_ended_processes_are_cleared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this user's folders of the same kind whose process has ended are removed; nothing else is touched."""
    from defectscope.files import scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = _dead_pid()
    stale, live = tmp_path / f"defectscope-score-{dead}-a", tmp_path / f"defectscope-score-{os.getpid()}-b"
    other_kind, a_file = tmp_path / f"defectscope-fit-{dead}-c", tmp_path / f"defectscope-score-{dead}-d"
    for folder in (stale, live, other_kind):
        folder.mkdir()
    a_file.write_text("not a folder")
    with scratch_folder("score") as scratch:
        assert Path(scratch).name.startswith(f"defectscope-score-{os.getpid()}-")
    assert not stale.exists() and live.is_dir() and other_kind.is_dir() and a_file.read_text() == "not a folder"


def test_fit_many_threads_is_the_thread_count_of_each_fit(demo_root: Path, tmp_path: Path, cli) -> None:
    """`fit-many --threads 1` writes what a fit on one thread writes (convolutions round by thread count)."""
    plan = _plan(tmp_path, [{"name": "part", "data": str(demo_root)}])
    threads = torch.get_num_threads()
    assert cli("fit-many", plan, "--threads", "1").code == 0
    assert torch.get_num_threads() == threads  # the fit's count is the fit's only
    torch.set_num_threads(1)
    try:
        direct = fit_model(demo_root, "patchcore", SMALL, tmp_path / "direct.dsmodel").path
    finally:
        torch.set_num_threads(threads)
    assert _same_model(tmp_path / "models" / "part.dsmodel", direct)


def _recording_bar(bars: list[list]):
    """A progress bar that records [description, total, steps advanced]."""
    @contextmanager
    def bar(description: str, total: int | None):
        entry = [description, total, 0]
        bars.append(entry)
        yield lambda n: entry.__setitem__(2, entry[2] + n)

    return bar


def test_fit_many_and_score_report_progress_as_the_work_is_done(demo_root: Path, served_folder: Path,
                                                                tmp_path: Path) -> None:
    bars: list[list] = []
    plan = _plan(tmp_path, [{"name": "part", "data": str(demo_root)}, {"name": "gone", "data": "no-such-folder"}])
    fit_many(plan, retries=0, bar=_recording_bar(bars))
    assert [(total, steps) for _, total, steps in bars] == [(2, 2), (1, 1)]  # both checked, the one left fitted
    assert "checking 2 product(s)" in bars[0][0] and "fitting 1 product(s)" in bars[1][0]
    bars.clear()
    images = [s.path for s in load_dataset(demo_root).test[:7]]
    score_to_parquet(served_folder / "part.dsmodel", images, tmp_path / "scores", chunk_images=3,
                     bar=_recording_bar(bars))
    assert bars == [["scoring 7 images into 3 part file(s)", 7, 7]]


def test_checking_a_plan_imports_only_the_models_it_names(tmp_path: Path) -> None:
    """A plan's check costs the same per product: it never loads every model kind (scikit-learn, torchvision)."""
    plan = _plan(tmp_path, [{"name": f"p{i}", "data": f"data/p{i}"} for i in range(200)])
    probe = ("import sys\nfrom defectscope.scale.plan import load_plan\n"
             "print(len(load_plan(sys.argv[1])), [m for m in ('sklearn', 'torchvision') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", probe, str(plan)], capture_output=True, text=True, timeout=120)
    assert run.stdout.split(maxsplit=1) == ["200", "[]\n"], run.stderr[-500:]


@pytest.mark.parametrize("products, message", [
    ([{"name": "a", "data": "x", "colour": "red"}], "unknown field"),
    ([{"name": "a", "data": "x"}, {"name": "a", "data": "y"}], "share the name"),
    ([{"name": "a", "data": "x", "settings": {"coreset_ratio": 2}}], "coreset_ratio"),
    ([{"name": "../a", "data": "x"}], "product name"),
    ([{"name": "a", "data": "x", "model": "segmenter"}], "cannot be fitted on good images"),
])
def test_bad_plans_are_refused_before_anything_runs(tmp_path: Path, products: list, message: str, cli) -> None:
    plan = _plan(tmp_path, products)
    with pytest.raises(DefectscopeError, match=message):
        load_plan(plan)
    result = cli("fit-many", plan)
    assert result.code == 2 and message.split()[0] in result.err and not (tmp_path / "models").exists()


def test_score_resumes_an_interrupted_run_without_gaps_or_repeats(served_folder: Path, demo_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = served_folder / "part.dsmodel"
    images = [s.path for s in load_dataset(demo_root).test]
    listing = tmp_path / "images.txt"
    listing.write_text("# test images\n" + "\n".join(str(p) for p in images) + "\n")
    out = tmp_path / "scores"
    write = scoring.write_chunk

    def interrupted(model, folder, chunk, paths):
        if chunk == 2:
            raise KeyboardInterrupt  # the run is stopped while scoring the third chunk
        return write(model, folder, chunk, paths)

    monkeypatch.setattr(scoring, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        score_to_parquet(model, [listing], out, chunk_images=8)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    monkeypatch.setattr(scoring, "write_chunk", write)
    summary = score_to_parquet(model, [listing], out, chunk_images=8)
    assert summary["resumed_chunks"] == 2 and summary["scored_now"] == len(images) - 16
    table = pq.read_table(out).to_pydict()
    assert sorted(table["path"]) == sorted(map(str, images))  # every image exactly once
    expected = load_model(model).predict(images)
    by_path = dict(zip(table["path"], zip(table["score"], table["verdict"])))
    # to float32 rounding: a backbone pass of 8 images and one of all of them may order their sums differently
    np.testing.assert_allclose([by_path[str(p)][0] for p in images], expected.scores, rtol=1e-5)
    assert [by_path[str(p)][1] for p in images] == expected.verdicts
    assert table["sha256"] == [file_sha256(Path(path)) for path in table["path"]]
    spelled = Path(os.path.relpath(model, tmp_path))  # the same model, its path spelled another way
    monkeypatch.chdir(tmp_path)
    assert score_to_parquet(spelled, [listing], out, chunk_images=8)["resumed_chunks"] == summary["chunks"]
    with pytest.raises(DefectscopeError, match="another scoring job"):
        score_to_parquet(model, images[:3], out)
    assert score_to_parquet(model, images[:3], out, force=True)["scored_now"] == 3
    assert pq.read_table(out).num_rows == 3


def test_a_resumed_score_job_scores_again_an_image_replaced_since(served_folder: Path, demo_root: Path,
                                                                   tmp_path: Path) -> None:
    """A resume kept the row of an image whose file was replaced after its chunk was scored: the score of content it
    no longer holds, reported as done."""
    model = served_folder / "part.dsmodel"
    images = tmp_path / "images"
    shutil.copytree(demo_root / "test", images)
    out = tmp_path / "scores"
    first = score_to_parquet(model, [images], out, chunk_images=8)
    assert first["scored_now"] == first["images"]
    replaced = sorted((images / "good").iterdir())[0]
    shutil.copyfile(next((images / "broken").iterdir()), replaced)  # a defective part under a good one's name
    again = score_to_parquet(model, [images], out, chunk_images=8)
    assert again["resumed_chunks"] == first["chunks"] - 1 and again["scored_now"] == 8  # its chunk alone
    table = pq.read_table(out).to_pydict()
    row = table["path"].index(str(replaced.resolve()))
    assert table["sha256"][row] == file_sha256(replaced)
    assert table["verdict"][row] == load_model(model).predict([replaced]).verdicts[0] == "defective"


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _dead_pid() -> int:
    """The id of a process that has just ended."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def test_a_scoring_actor_keeps_no_scratch_folder_once_loaded(local_ray, served_folder: Path, demo_root: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder a scoring actor unpacks the model into is gone once the model is loaded, and the folder an actor
    killed while unpacking left (no finalizer runs) is removed by the next one; it still scores every chunk it is sent."""
    from defectscope.data.decode import EncodedImage
    from defectscope.predictor import load_predictor, model_files

    model = served_folder / "part.dsmodel"
    files = local_ray.put(model_files(model, load_predictor(model), file_sha256(model)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"defectscope-score-{_dead_pid()}-x1y2"
    left.mkdir()
    (left / "part.dsmodel").write_bytes(b"half written")
    scorer = scoring.ChunkScorer(model.name, torch.get_num_threads())
    images = [EncodedImage.read(str(s.path)) for s in load_dataset(demo_root).test[:4]]
    for chunk in range(2):
        assert scorer.score(chunk, images, [files])[0] == chunk
    assert list(tmp_path.glob("defectscope-score-*")) == []


def test_ray_gives_the_in_process_results(local_ray, demo_root: Path, served_folder: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, [{"name": "part", "data": str(demo_root)}, {"name": "missing", "data": "nowhere"}])
    rows = {row["name"]: row for row in fit_many(plan, ray_address="local", retries=1)}
    assert rows["part"]["status"] == "fitted" and rows["missing"]["status"] == "failed"
    direct = fit_model(demo_root, "patchcore", SMALL, tmp_path / "direct.dsmodel").path
    assert _same_model(tmp_path / "models" / "part.dsmodel", direct)
    sharded = fit_model(demo_root, "patchcore", SMALL, tmp_path / "sharded.dsmodel", ray_address="local").path
    assert _same_model(sharded, direct)  # the coreset shards ran as Ray tasks
    images = [s.path for s in load_dataset(demo_root).test]
    model = served_folder / "part.dsmodel"
    score_to_parquet(model, images, tmp_path / "local", chunk_images=8)
    score_to_parquet(model, images, tmp_path / "on-ray", ray_address="local", chunk_images=8)
    local = pq.read_table(tmp_path / "local").sort_by("path").to_pydict()
    on_ray = pq.read_table(tmp_path / "on-ray").sort_by("path").to_pydict()
    assert local == on_ray


def test_a_job_whose_worker_dies_is_retried_and_counted_once(local_ray, tmp_path: Path) -> None:
    died = tmp_path / "died"

    def job(item: int) -> int:
        if item == 1 and not died.exists():
            died.write_text("once")
            os._exit(1)  # the worker process dies in the middle of the job
        (tmp_path / f"done-{item}-{os.getpid()}").write_text("")
        return item * 10

    assert run_jobs(job, [0, 1, 2], ray_address="local", retries=1) == [(0, None), (10, None), (20, None)]
    assert died.exists() and sorted(p.name.split("-")[1] for p in tmp_path.glob("done-*")) == ["0", "1", "2"]



@pytest.mark.parametrize("where", [None, "local"])
def test_a_failure_on_the_input_is_reported_at_once_others_are_retried(where: str | None, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:
    """A missing folder fails the same way every time: not retried; a passing fault is (here and on Ray)."""
    if where is not None:
        request.getfixturevalue("local_ray")

    def job(item: str) -> str:
        (tmp_path / f"{item}-{len(list(tmp_path.glob(item + '-*')))}").write_text("")
        if item == "input":
            raise DefectscopeError("data folder x does not exist")
        if len(list(tmp_path.glob(item + "-*"))) < 2:
            raise RuntimeError("a passing fault")
        return item

    outcomes = run_jobs(job, ["input", "flaky"], ray_address=where, retries=2)
    assert outcomes == [(None, "data folder x does not exist"), ("flaky", None)]
    assert len(list(tmp_path.glob("input-*"))) == 1 and len(list(tmp_path.glob("flaky-*"))) == 2


def test_score_scores_failed_rows_again_on_resume(served_folder: Path, demo_root: Path, tmp_path: Path, cli) -> None:
    images = [s.path for s in load_dataset(demo_root).test[:6]]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name.replace(".png", f"-{path.parent.name}.png"))
    broken = sorted(folder.iterdir())[2]
    original = broken.read_bytes()
    broken.write_bytes(b"not an image")
    out = tmp_path / "scores"
    first = cli("score", served_folder / "part.dsmodel", folder, "--out", out)
    assert first.code == 3  # some rows failed
    assert pq.read_table(out).to_pydict()["verdict"].count("error") == 1
    broken.write_bytes(original)  # fixed: the resume scores that chunk again
    again = cli("score", served_folder / "part.dsmodel", folder, "--out", out)
    assert again.code == 0, again.err
    table = pq.read_table(out).to_pydict()
    assert "error" not in table["verdict"] and sorted(table["path"]) == sorted(str(p) for p in folder.iterdir())


def test_a_private_ray_instance_starts_without_a_word(tmp_path: Path) -> None:
    """`--ray local` starts Ray in this process; Ray's notes on doing so (its INFO and token lines) stay out of the
    command's stderr, which holds only what defectscope says."""
    probe = "from defectscope.jobs import run_jobs\nprint(run_jobs(abs, [-2], 'local'))"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0 and run.stdout.strip() == "[(2, None)]", run.stderr[-2000:]
    assert run.stderr == ""


def test_scoring_on_a_private_ray_instance_says_nothing_but_its_summary(served_folder: Path, demo_root: Path,
                                                                       tmp_path: Path) -> None:
    """`score --ray local` through the real entry point: stderr stays empty (the scoring actors take no model in
    their constructor, so Ray's core has no restart warning to print) and the parts hold every image."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    out = tmp_path / "scores"
    run = subprocess.run([sys.executable, "-c", "from defectscope.cli import main; main()", "score",
                          str(served_folder / "part.dsmodel"), str(demo_root / "test"), "--out", str(out),
                          "--ray", "local"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ""
    scored = pq.read_table(sorted(out.glob("part-*.parquet"))).column("path").to_pylist()
    assert sorted(scored) == sorted(str(p) for p in (demo_root / "test").rglob("*.png"))


def test_ray_options_are_checked_before_anything_runs(served_folder: Path, demo_root: Path, tmp_path: Path,
                                                      cli) -> None:
    """A missing token file, or --ray-env without --ray, is one line and exit 2; the runtime_env file's local paths
    are resolved against its own folder (a node has no notion of the driver's working directory)."""
    model, out = served_folder / "part.dsmodel", tmp_path / "scores"
    missing = cli("score", model, demo_root, "--out", out, "--ray", "local", "--ray-token-file", tmp_path / "none")
    assert missing.code == 2 and "token file" in missing.err
    alone = cli("score", model, demo_root, "--out", out, "--ray-env", tmp_path / "env.yaml")
    assert alone.code == 2 and "--ray only" in alone.err
    assert not out.exists()
    env = tmp_path / "cluster" / "env.yaml"
    env.parent.mkdir()
    env.write_text(yaml.safe_dump({"working_dir": "../code", "py_modules": ["lib", "s3://bucket/pkg.zip"],
                                   "pip": ["pyarrow"]}))
    cluster = RayCluster.from_files("10.0.0.5:6379", env_file=env)
    assert cluster.runtime_env == {"working_dir": str((tmp_path / "code").resolve()), "pip": ["pyarrow"],
                                   "py_modules": [str((tmp_path / "cluster" / "lib").resolve()), "s3://bucket/pkg.zip"]}


class Refused(Exception):
    """Raised where a run would start: a count of threads must be refused before."""


@pytest.mark.parametrize("threads", [0, 257, 100_000, 2.5, True])
def test_a_count_of_threads_no_machine_has_is_refused_before_any_thread_starts(threads: object, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`--threads 100000` (a typo) made the runtime start an engine with that many threads, which exhausted the
    machine's processes; a fit of fit-many would set torch's the same."""
    from defectscope import runtime
    from defectscope.errors import SettingsError
    from defectscope.scale import fit_many as fit_many_module

    def refused(*_args, **_kwargs):
        raise Refused

    monkeypatch.setattr(runtime, "read_deployment", refused)
    monkeypatch.setattr(fit_many_module, "load_plan", refused)
    for run in (lambda: runtime.DeployedModel(tmp_path / "m.dsdeploy", threads),
                lambda: fit_many_module.fit_many(tmp_path / "plan.yaml", threads=threads)):
        with pytest.raises(SettingsError, match="threads must be a whole number from 1 to 256"):
            run()


def test_ray_jobs_that_no_node_can_hold_are_refused_instead_of_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task or actor asking more CPUs than any node has waits for ever on Ray (the cluster's total is not enough:
    one node must hold it)."""
    from defectscope import jobs
    from defectscope.errors import SettingsError

    class Cluster:  # two live nodes of 2 CPUs and a dead one of 8
        @staticmethod
        def nodes() -> list[dict]:
            return [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
                    {"Alive": False, "Resources": {"CPU": 8.0}}]

    monkeypatch.setattr(jobs, "connect_ray", lambda _address: Cluster())
    with pytest.raises(SettingsError, match="would hold 3 CPUs, and the largest node of the cluster has 2: give --threads 2"):
        jobs.run_jobs(lambda item: item, [1], "ray://nowhere", cpus=3)
    monkeypatch.setattr(scoring, "connect_ray", lambda _address: Cluster())
    with pytest.raises(SettingsError, match="would hold 4 CPUs"):
        scoring._score_on_ray("ray://nowhere", None, Path("m.dsmodel"), "0" * 64, Path("out"), [(0, ["a.png"])], 2, 4,
                              lambda _n: None)


def test_an_image_list_saved_by_a_windows_editor_or_in_latin_1_is_read(served_folder: Path, demo_root: Path,
                                                                      tmp_path: Path) -> None:
    """A list saved with a UTF-8 byte-order mark made its first image "not exist" (the mark invisible in the message);
    one in Latin-1 was a traceback (UnicodeDecodeError)."""
    image = next(s.path for s in load_dataset(demo_root).test if s.label == 0)
    latin = tmp_path / os.fsdecode(b"Pr\xfcfung.png")
    shutil.copy(image, latin)
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + os.fsencode(str(image)) + b"\r\n" + b"Pr\xfcfung.png\r\n")
    summary = score_to_parquet(served_folder / "part.dsmodel", [listing], tmp_path / "scores")
    assert summary["images"] == 2 and summary["failed"] == 0
    assert sorted(pq.read_table(tmp_path / "scores").column("path").to_pylist()) == sorted(
        [str(image), str(tmp_path / "Pr\\xfcfung.png")])


def test_a_toml_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """"not valid TOML: Invalid statement (at line 1, column 1)" was all a plan saved by Notepad got."""
    from defectscope.config_files import read_mapping

    (tmp_path / "plan.toml").write_bytes(b"\xef\xbb\xbf" + b'[[products]]\nname = "bottle"\ndata = "bottle"\n')
    assert read_mapping(tmp_path / "plan.toml", "products") == {"products": [{"name": "bottle", "data": "bottle"}]}
