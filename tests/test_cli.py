"""The command line: help, summary, fit/predict/evaluate, demo, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.errors import DefectscopeError

runner = CliRunner()
COMMANDS = ("data", "backbones", "fit", "predict", "evaluate", "info", "demo", "experiment")


def test_help_lists_every_command_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(f" {command} " in result.output for command in COMMANDS)
    assert "0.1.0" in runner.invoke(app, ["--version"]).output


def test_help_shows_flags_as_flags_and_every_default() -> None:
    wide = {"COLUMNS": "200"}
    shown = runner.invoke(app, ["predict", "--help"], env=wide).output
    assert "predict [OPTIONS] MODEL INPUTS..." in shown and "<bool>" not in shown and "{" not in shown
    fitting = " ".join(runner.invoke(app, ["fit", "--help"], env=wide).output.split())
    for default in ("[default: patchcore]", "[default: (0.1)]", "[default: (0.01)]", "[default: (chosen per product)]"):
        assert default in fitting, default


def test_help_and_info_answer_without_loading_pytorch(served_folder: Path, tmp_path: Path) -> None:
    """`--help`, an argument typo, `info` and `audit drift` load only the command line and the model file's header
    (not torch)."""
    from defectscope.line.audit import AuditLog

    AuditLog(tmp_path / "audit.sqlite").close()
    probe = ("import sys\nfrom defectscope.cli import main\nsys.argv = ['defectscope'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)")
    model = str(served_folder / "part.dsmodel")
    for arguments in (["--help"], ["fit", "--no-such-option"], ["info", model],
                      ["audit", "drift", str(tmp_path / "audit.sqlite"), model]):
        run = subprocess.run([sys.executable, "-c", probe, *arguments], capture_output=True, text=True, timeout=120)
        assert run.stderr.strip().splitlines()[-1] in ("NO-TORCH 0", "NO-TORCH 2"), (arguments, run.stderr[-500:])


def test_a_model_file_predicts_without_scikit_learn_scipy_stats_or_torchvision(served_folder: Path, demo_root: Path
                                                                               ) -> None:
    """A PatchCore file loaded to predict (as `watch` and `serve` do after a restart) imports only what it runs: the
    other models' modules and the fit-time libraries (about 2 s of imports) are left out."""
    probe = ("import importlib.abc, sys\nclass Refuse(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path, target=None):\n"
             "        if name.split('.')[0] in ('sklearn', 'torchvision') or name == 'scipy.stats':\n"
             "            raise ImportError(name + ' must not be imported to predict')\n"
             "sys.meta_path.insert(0, Refuse())\n"
             "from pathlib import Path\nfrom defectscope.predictor import load_predictor\n"
             "model = load_predictor(Path(sys.argv[1]))\n"
             "print(model.predict([sys.argv[2]]).verdicts[0], model.calibration.describe())\n")
    image = next((demo_root / "test" / "good").iterdir())
    run = subprocess.run([sys.executable, "-c", probe, str(served_folder / "part.dsmodel"), str(image)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-800:]
    assert run.stdout.split()[0] in ("good", "defective") and "threshold" in run.stdout


def test_the_registry_names_the_module_of_every_model() -> None:
    """`MODULES` (which module to import for a model name) agrees with what each module registers."""
    import importlib
    import pkgutil

    import defectscope.detectors
    from defectscope.detectors.base import DETECTORS, MODULES

    for module in pkgutil.iter_modules(defectscope.detectors.__path__):
        importlib.import_module(f"defectscope.detectors.{module.name}")
    assert {name: cls.__module__.rsplit(".", 1)[1] for name, cls in DETECTORS.items()} == MODULES


def test_the_command_line_names_every_model() -> None:
    from defectscope.detectors import all_detectors, good_only_models
    from defectscope.names import GOOD_ONLY_MODELS, MASK_MODELS

    assert list(GOOD_ONLY_MODELS) == good_only_models()
    assert sorted(MASK_MODELS) == sorted(name for name, cls in all_detectors().items() if cls.kind != "good_only")


def test_summary_json(demo_root: Path) -> None:
    result = runner.invoke(app, ["data", "summary", str(demo_root), "--json"])
    summary = json.loads(result.output)
    assert summary["defect_classes"]["names"] == ["broken", "contamination", "scratch"]
    assert summary["splits"]["test"]["per_class"] == {"good": 10, "broken": 8, "contamination": 8, "scratch": 8}


def test_summary_table_on_bottle(bottle: Path) -> None:
    result = runner.invoke(app, ["data", "summary", str(bottle)])
    assert result.exit_code == 0
    output = " ".join(result.output.split())
    for text in ("292 images", "3 defect classes", "broken_large", "292 x 900x900 RGB (3 ch)", "masks: 63"):
        assert text in output


def test_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-c", "from defectscope.cli import main; main()", "data", "summary",
                              str(tmp_path / "missing")], capture_output=True, text=True)
    assert process.returncode == 2
    assert "does not exist" in process.stderr and "Traceback" not in process.stderr


def test_off_a_terminal_the_bars_leave_no_lines(served_folder: Path, demo_root: Path, cli) -> None:
    """Progress bars draw on a terminal only: stderr captured to a log gets no empty line per bar."""
    result = cli("predict", served_folder / "part.dsmodel", demo_root / "test" / "broken", "--json")
    assert result.code == 0 and len(result.out.splitlines()) == 8
    assert result.err == ""


def test_fit_predict_evaluate(demo_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.dsmodel"
    fit = runner.invoke(app, ["-q", "fit", str(demo_root), "-o", str(model), "--model", "padim", "--image-size", "128", "--crop", "0"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(runner.invoke(app, ["info", str(model)]).output)["detector"] == "padim"
    predicted = runner.invoke(app, ["-q", "predict", str(model), str(demo_root / "test" / "broken"), "--json",
                                    "--heatmaps", str(tmp_path / "heat")])
    rows = [json.loads(line) for line in predicted.output.splitlines()]
    assert len(rows) == 8 and all(Path(r["heatmap"]).is_file() for r in rows)
    assert sum(r["verdict"] == "defective" for r in rows) >= 6
    out = tmp_path / "report"
    before = model.read_bytes()
    evaluated = runner.invoke(app, ["-q", "evaluate", str(model), str(demo_root), "--out", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert model.read_bytes() == before  # evaluate only reads; `calibrate` is the one way to set a threshold
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics["per_defect"]) == {"broken", "contamination", "scratch"}
    assert all((out / name).is_file() for name in ("report.html", "report.md", "predictions.csv", "curves.png", "gallery.png"))
    defective = [arg for kind in ("broken", "contamination", "scratch") for arg in ("--defective", str(demo_root / "test" / kind))]
    calibrated = runner.invoke(app, ["-q", "calibrate", str(model), "-o", str(model), "--f1", "--good",
                                     str(demo_root / "test" / "good"), *defective])
    assert calibrated.exit_code == 0, calibrated.output
    info = json.loads(runner.invoke(app, ["info", str(model)]).output)
    assert info["calibration"]["method"] == "f1"


def test_fit_reaches_every_config_field_by_set_and_config(demo_root: Path, tmp_path: Path, cli) -> None:
    fields = tmp_path / "fields.yaml"
    fields.write_text("image_size: 96\ncrop: null\nfeature_dim: 50\nkeep_covariance: true\n")
    model = tmp_path / "m.dsmodel"
    fit = runner.invoke(app, ["-q", "fit", str(demo_root), "-o", str(model), "--model", "padim", "--config", str(fields),
                              "--set", "feature_dim=40", "--set", "regularization=0.5"])
    assert fit.exit_code == 0, fit.output
    config = json.loads(runner.invoke(app, ["info", str(model)]).output)["config"]
    assert (config["image_size"], config["crop"], config["feature_dim"], config["regularization"], config["keep_covariance"]) \
        == (96, None, 40, 0.5, True)  # --set wins over the file
    for wrong, message in ((["--set", "feature_dimension=40"], "feature_dimension"), (["--set", "feature_dim"], "KEY=VALUE"),
                           (["--set", "feature_dim=many"], "feature_dim")):
        refused = cli("fit", demo_root, "-o", tmp_path / "x.dsmodel", "--model", "padim", *wrong)
        assert refused.code == 2 and message in refused.err and not (tmp_path / "x.dsmodel").exists()


def test_fit_trains_a_mask_model_where_masks_exist(demo_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "seg.dsmodel"
    fit = runner.invoke(app, ["fit", str(demo_root), "-o", str(model), "--model", "segmenter", "--image-size", "64",
                              "--crop", "0", "--set", "epochs=2", "--set", "good_train=8"])
    assert fit.exit_code == 0, fit.output
    assert "on 42 labelled images" in fit.output and "defects of the test split" in fit.output  # 34 test + 8 good
    info = json.loads(runner.invoke(app, ["info", str(model)]).output)
    assert info["detector"] == "segmenter" and info["train_summary"]["images"] == 42
    predicted = runner.invoke(app, ["-q", "predict", str(model), str(demo_root / "test" / "broken"), "--json"])
    assert predicted.exit_code == 0 and len(predicted.output.splitlines()) == 8
    evaluated = runner.invoke(app, ["-q", "evaluate", str(model), str(demo_root)])  # its own training images
    assert evaluated.exit_code == 0 and "34 of the 34 test images are images this model learned from" in evaluated.output


def test_fit_rejects_coreset_for_other_models(demo_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["fit", str(demo_root), "-o", str(tmp_path / "m"), "--model", "knn", "--coreset", "0.1"])
    assert result.exit_code != 0 and "--coreset-ratio applies to --model patchcore only" in str(result.exception)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", "demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert "image AUROC" in report and "data: " in report and (tmp_path / "report" / "report.html").is_file()
    assert f"report: {tmp_path / 'report' / 'report.html'}" in result.output
    heatmaps = sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))
    assert heatmaps == ["broken_000.png", "contamination_000.png", "good_000.png", "scratch_000.png"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]
    assert metrics["image_auroc"] > 0.9


def test_torchvision_backbone_with_weights_file(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import torch
    import torchvision

    from defectscope import backbones

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.delenv(backbones.WEIGHTS_DIR_ENV, raising=False)
    weights = tmp_path / "resnet18-mine.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(backbones, "published_checkpoint", lambda name: backbones.Checkpoint(weights.name, digest[:8]))
    model = tmp_path / "r18.dsmodel"
    fit = runner.invoke(app, ["-q", "fit", str(demo_root), "-o", str(model), "--model", "knn", "--backbone", "resnet18",
                              "--weights", str(weights), "--image-size", "64", "--crop", "0"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(runner.invoke(app, ["info", str(model)]).output)["backbone"]["weights_sha256"] == digest
    image = str(demo_root / "test" / "good" / "000.png")
    assert runner.invoke(app, ["-q", "predict", str(model), image, "--json", "--weights", str(weights)]).exit_code == 0
    missing = runner.invoke(app, ["-q", "predict", str(model), image])
    assert missing.exit_code != 0 and "no weights for backbone 'resnet18'" in str(missing.exception)


def test_experiment_run_and_report(demo_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('name = "cli"\nmetric = "image_auroc"\n\n[[attempts]]\nname = "knn"\nmodel = "knn"\nimage_size = 64\ncrop = 64\n\n'
                      '[[attempts]]\nname = "pca"\nbase = "knn"\nmodel = "pca"\n')
    out = tmp_path / "out"
    missing = runner.invoke(app, ["experiment", "run", str(config), "--out", str(out)])
    assert isinstance(missing.exception, DefectscopeError) and "names no 'data'" in str(missing.exception)
    result = runner.invoke(app, ["-q", "experiment", "run", str(config), "--data", str(demo_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| knn | knn | (baseline) |" in result.output and "Best by image_auroc:" in result.output
    assert {p.name for p in out.iterdir()} >= {"knn", "pca", "table.md", "table.csv", "table.json", "experiment.json"}
    (out / "table.md").unlink()
    report = runner.invoke(app, ["experiment", "report", str(out), "--metric", "accuracy"])
    assert report.exit_code == 0 and "Best by accuracy:" in report.output and (out / "table.md").is_file()
    typo = runner.invoke(app, ["experiment", "report", str(out), "--metric", "image_aucroc"])  # ranked nothing, said so
    assert isinstance(typo.exception, DefectscopeError) and "--metric must be one of" in str(typo.exception)


def test_every_output_is_o_and_out() -> None:
    import typer

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, (*prefix, name))
            else:
                yield (*prefix, name), command

    writers = 0
    for path, command in commands(typer.main.get_command(app)):
        for parameter in command.params:
            names = set(parameter.opts)
            if names & {"--out", "--output"}:
                writers += 1
                assert {"-o", "--out"} <= names, f"{' '.join(path)}: {sorted(names)}"
    assert writers >= 8
