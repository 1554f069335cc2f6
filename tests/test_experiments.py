"""Experiment configs, the runner (skip, redo, re-run on change) and the comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defectscope.classify.report import classification_metrics
from defectscope.errors import DefectscopeError
from defectscope.experiments.config import load_experiment
from defectscope.experiments.runner import run_experiment
from defectscope.experiments.table import build_table, csv_text, load_results, markdown

CONFIG = """
name: tiny
metric: image_auroc
attempts:
  - {name: ae, model: autoencoder, epochs: 2, lr: 1e-3, image_size: 64}
  - {name: ae-sgd, base: ae, optimizer: sgd, lr: 0.01}
  - {name: knn, model: knn, image_size: 64, crop: null}
  - {name: clf, model: classifier, epochs: 2, folds: 2, freeze: 32, image_size: 64}
  - {name: seg, model: segmenter, epochs: 2, folds: 2, image_size: 64, crop: null, freeze: 16, good_train: 4}
"""


def _write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_inheritance_and_toml(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, CONFIG))
    sgd = experiment.attempts[1]
    assert sgd.model == "autoencoder" and sgd.settings == {"epochs": 2, "lr": 0.01, "image_size": 64, "optimizer": "sgd"}
    assert experiment.baseline == "ae"
    toml = _write(tmp_path, '[[attempts]]\nname = "a"\nmodel = "knn"\n\n[[attempts]]\nname = "b"\nbase = "a"\nimage_size = 256\n', "t.toml")
    assert [a.settings for a in load_experiment(toml).attempts] == [{}, {"image_size": 256}]


@pytest.mark.parametrize("attempts,message", [
    ("- {name: a, model: resnet_magic}", "attempt 'a': unknown model 'resnet_magic'"),
    ("- {name: a, model: autoencoder, epochs: -3}", "attempt 'a': epochs must be"),
    ("- {name: a, model: autoencoder, lr: fast}", "attempt 'a': field 'lr' must be float"),
    ("- {name: a, epochs: 3}", "attempt 'a': missing field 'model'"),
    ("- {name: a, model: knn, colour: red}", "attempt 'a': unknown field"),
    ("- {name: a, base: zz, model: knn}", "attempt 'a': field 'base' names unknown attempt 'zz'"),
    ("- {name: a, model: classifier, loss: hinge}", "attempt 'a': field 'loss' must be one of"),
    ("- {model: knn}", "attempt #1 needs a 'name'"),
])
def test_config_errors_name_attempt_and_field(tmp_path: Path, attempts: str, message: str) -> None:
    with pytest.raises(DefectscopeError, match=message):
        load_experiment(_write(tmp_path, "attempts:\n  " + attempts + "\n"))


def test_unreadable_configs(tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match="does not exist"):
        load_experiment(tmp_path / "none.yaml")
    with pytest.raises(DefectscopeError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "attempts: [unclosed"))
    with pytest.raises(DefectscopeError, match="non-empty list"):
        load_experiment(_write(tmp_path, "name: x\n"))


def test_runner_skips_redoes_and_tables_from_results(demo_root: Path, tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, CONFIG))
    out = tmp_path / "run"
    said: list[str] = []
    results = run_experiment(experiment, demo_root, out, say=said.append)
    assert [r["attempt"] for r in results] == ["ae", "ae-sgd", "knn", "clf", "seg"]
    assert 0 <= results[-1]["summary"]["pixel_auroc"] <= 1 and results[-1]["summary"]["aupro"] is not None
    for name in ("ae", "ae-sgd", "knn"):
        assert (out / name / "model.dsmodel").is_file() and (out / name / "result.json").is_file()
    assert (out / "ae" / "losses.png").is_file() and (out / "clf" / "confusion.png").is_file()
    report = (out / "clf" / "report.md").read_text()
    assert "imbalance 6.25" in report and "| defective |" in report and "Confusion matrix" in report
    stamps = {name: (out / name / "result.json").stat().st_mtime_ns for name in ("ae", "ae-sgd", "knn", "clf", "seg")}

    said.clear()
    run_experiment(experiment, demo_root, out, say=said.append)
    assert sum("skipped" in line for line in said) == 5
    assert all((out / n / "result.json").stat().st_mtime_ns == t for n, t in stamps.items())

    run_experiment(experiment, demo_root, out, redo=True, only=["knn"], say=said.append)
    assert (out / "knn" / "result.json").stat().st_mtime_ns != stamps["knn"]
    assert (out / "ae" / "result.json").stat().st_mtime_ns == stamps["ae"]

    changed = load_experiment(_write(tmp_path, CONFIG.replace("optimizer: sgd, lr: 0.01", "optimizer: sgd, lr: 0.02")))
    said.clear()
    run_experiment(changed, demo_root, out, say=said.append)
    assert any("ae-sgd: settings or data changed" in line for line in said)
    assert (out / "ae" / "result.json").stat().st_mtime_ns == stamps["ae"]

    # the table is computed from the result files: edit one and the table follows
    result_path = out / "knn" / "result.json"
    knn = json.loads(result_path.read_text())
    knn["summary"]["image_auroc"] = 0.987654
    result_path.write_text(json.dumps(knn))
    table = build_table(*load_results(out))
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["rows"]}
    assert rows["knn"]["image AUROC"] == "0.988" and table["best"] == "knn"
    assert "model=knn" in table["verdict"] and "changes from baseline ae" in table["verdict"]
    assert rows["ae-sgd"]["changes vs baseline"] == "lr=0.02, optimizer=sgd"
    assert rows["ae"]["changes vs baseline"] == "(baseline)" and rows["ae-sgd"]["optimizer"] == "sgd"
    ae = json.loads((out / "ae" / "result.json").read_text())
    assert rows["ae"]["train loss"] == f"{ae['train_loss']:.3f}" and rows["ae"]["test loss"] == f"{ae['test_loss']:.3f}"
    clf = json.loads((out / "clf" / "result.json").read_text())
    spread = clf["spread"]["balanced_accuracy"]
    assert rows["clf"]["balanced acc."] == f"{clf['summary']['balanced_accuracy']:.3f} ± {spread['std']:.3f}"
    assert "| knn | knn |" in markdown(table) and csv_text(table).splitlines()[0].startswith("attempt,model")
    assert "imbalance 6.25" in markdown(table)

    # the classifier's reported metrics are recomputed from its saved held-out predictions
    predictions = json.loads((out / "clf" / "predictions.json").read_text())
    recomputed = classification_metrics(predictions["records"], predictions["classes"])
    assert recomputed == clf["metrics"]


def test_a_result_counts_only_for_the_data_it_was_made_from(demo_root: Path, tmp_path: Path) -> None:
    import shutil

    import cv2

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    experiment = load_experiment(_write(tmp_path, "name: two\nmetric: image_auroc\nattempts:\n"
                                                  "  - {name: knn, model: knn, image_size: 64, crop: null}\n"
                                                  "  - {name: pca, model: pca, image_size: 64, crop: null}\n"))
    out, said = tmp_path / "run", []
    run_experiment(experiment, data, out, say=said.append)
    moved = tmp_path / "moved"
    data.rename(moved)  # the same images elsewhere: the same data
    said.clear()
    run_experiment(experiment, moved, out, say=said.append)
    assert sum("finished earlier, skipped" in line for line in said) == 2
    image = moved / "train" / "good" / "000.png"
    cv2.imwrite(str(image), 255 - cv2.imread(str(image)))  # one training image edited: every result is from other data
    said.clear()
    run_experiment(experiment, moved, out, only=["knn"], say=said.append)
    assert any("knn: settings or data changed" in line for line in said)
    assert any("pca: its earlier result is from other settings or data; left out" in line for line in said)
    table = build_table(*load_results(out))
    assert [row[0] for row in table["rows"]] == ["knn"] and "Left out, made from other settings or data: pca" in table["verdict"]
    said.clear()
    run_experiment(experiment, moved, out, say=said.append)
    assert any("pca: settings or data changed" in line for line in said)
    assert [row[0] for row in build_table(*load_results(out))["rows"]] == ["knn", "pca"]


def test_an_attempt_another_run_is_running_is_left_to_it(demo_root: Path, tmp_path: Path) -> None:
    import fcntl

    experiment = load_experiment(_write(tmp_path, "name: two\nattempts:\n"
                                                  "  - {name: knn, model: knn, image_size: 64, crop: null}\n"
                                                  "  - {name: pca, model: pca, image_size: 64, crop: null}\n"))
    out = tmp_path / "run"
    run_experiment(experiment, demo_root, out, say=lambda _text: None)
    finished = {name: (out / name / "result.json").stat().st_mtime_ns for name in ("knn", "pca")}
    said: list[str] = []
    with open(out / ".knn.lock", "a") as held:  # as a second terminal's run holds it while it runs knn
        fcntl.flock(held, fcntl.LOCK_EX)
        results = run_experiment(experiment, demo_root, out, redo=True, say=said.append)
    assert any("knn: another run of this experiment is running it now" in line for line in said)
    assert [r["attempt"] for r in results] == ["pca"] and (out / "knn" / "model.dsmodel").is_file()
    assert (out / "knn" / "result.json").stat().st_mtime_ns == finished["knn"]  # its files untouched
    assert (out / "pca" / "result.json").stat().st_mtime_ns != finished["pca"]


def test_report_needs_an_experiment_folder(tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match="not an experiment folder"):
        load_results(tmp_path)


def test_only_unknown_attempt(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match="no attempt named zz"):
        run_experiment(load_experiment(_write(tmp_path, CONFIG)), demo_root, tmp_path / "o", only=["zz"])


@pytest.mark.parametrize("name", ["attempts-autoencoder", "attempts-classifier", "attempts-longtail", "attempts-supervised"])
def test_shipped_configs_are_valid(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the data is still found relative to the config file
    experiment = load_experiment(repository / "configs" / f"{name}.yaml")
    assert Path(experiment.data).resolve() == (repository.parent / "shared" / "datasets" / "mvtec_ad" / "bottle").resolve()
    assert len(experiment.attempts) >= 4
    if name == "attempts-longtail":
        losses = {a.settings.get("loss") for a in experiment.attempts}
        assert {"ce", "weighted_ce", "focal", "balanced_softmax", "logit_adjusted", "bcl"} <= losses
        assert {a.settings.get("shots") for a in experiment.attempts} == {None, 2, 5}
