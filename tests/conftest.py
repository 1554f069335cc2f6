"""Shared fixtures: a small generated dataset, the real bottle and tire categories when present."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest
import torch

from defectscope.data.synthetic import make_demo_dataset

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = DATASETS / "mvtec_ad" / "bottle"
TIRE = DATASETS / "mvtec_3d_ad_rgb" / "tire"

# `make test` runs the suite in two processes (pytest-xdist, a file per worker at a time): each takes its share of
# the cores, and so do the processes its tests start (the CLI, servers, Ray), which read OMP_NUM_THREADS
THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 good training images, 10 good and 24 defective test images, 128 px, with masks."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "part", size=128, seed=3)


@pytest.fixture(scope="session")
def served_folder(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding part.dsmodel: a small PatchCore fitted on the demo dataset, for the service's tests."""
    from defectscope import load_dataset
    from defectscope.artifacts import save_model
    from defectscope.detectors.base import create_detector

    folder = tmp_path_factory.mktemp("served")
    detector = create_detector("patchcore", image_size=128, crop=None, coreset_ratio=0.25)
    detector.fit([s.path for s in load_dataset(demo_root).train])
    save_model(detector, folder / "part.dsmodel")
    return folder


@pytest.fixture(scope="session")
def report_folder(demo_root: Path, served_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`evaluate --out` of the served PatchCore on the demo dataset."""
    from defectscope import load_dataset
    from defectscope.artifacts import load_model
    from defectscope.pipeline import evaluate_model

    out = tmp_path_factory.mktemp("evaluated") / "report"
    evaluate_model(load_model(served_folder / "part.dsmodel"), load_dataset(demo_root), out,
                   model_file=served_folder / "part.dsmodel")
    return out


@pytest.fixture(scope="session")
def bottle() -> Path:
    return _category(BOTTLE)


@pytest.fixture(scope="session")
def tire() -> Path:
    return _category(TIRE)


def _category(root: Path) -> Path:
    if not (root / "train" / "good").is_dir():
        pytest.skip(f"{root.name} not found at {root}")
    return root


class CliResult:
    """What one in-process run of the `defectscope` entry point did."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `defectscope ARGS...` through its real entry point (exit codes, one-line errors) and capture its output."""
    from defectscope.cli import main, state

    def run(*args: object) -> CliResult:
        monkeypatch.setattr("sys.argv", ["defectscope", *map(str, args)])
        state.update(quiet=False, debug=False)
        capsys.readouterr()
        handler = signal.getsignal(signal.SIGTERM)
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, handler)
            gc.unfreeze()  # `serve` freezes what it loaded (`process.freeze_loaded`): not the test run's objects
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def count_runs(monkeypatch: pytest.MonkeyPatch, module: object) -> list[tuple[int, ...]]:
    """The shapes of the frames every predictor that `module.load_predictor` loads from now on scores."""
    runs, loaded = [], module.load_predictor

    def counted(*args, **options):
        predictor = loaded(*args, **options)
        score = predictor.score_frames
        predictor.score_frames = lambda frames: runs.append(frames.shape) or score(frames)
        return predictor

    monkeypatch.setattr(module, "load_predictor", counted)
    return runs
