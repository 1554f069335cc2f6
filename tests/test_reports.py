"""The evaluation report a plant engineer forwards: one self-contained HTML file (and Markdown), every image's
verdict as CSV at the model's threshold, every mistake named with its overlay."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np

from defectscope import __version__, load_dataset
from defectscope.files import file_sha256
from defectscope.reports import confusion, prediction_table

COLUMNS = ["path", "true_class", "score", "normalized_score", "verdict", "correct", "heatmap"]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_predictions_csv_gives_every_verdict_at_the_models_threshold(report_folder: Path) -> None:
    metrics = json.loads((report_folder / "metrics.json").read_text())["metrics"]
    threshold = metrics["at_model_threshold"]["threshold"]
    rows = _rows(report_folder)
    assert list(rows[0]) == COLUMNS and len(rows) == metrics["images"]
    for row in rows:
        score = float(row["score"])
        assert row["verdict"] == ("defective" if score >= threshold else "good")
        assert abs(float(row["normalized_score"]) - score / threshold) <= 1e-4  # both columns are rounded to 4 places
        truth = "good" if row["true_class"] == "good" else "defective"
        assert row["correct"] == ("yes" if row["verdict"] == truth else "no")
        assert bool(row["heatmap"]) == (row["correct"] == "no")  # every mistake has its overlay, and only mistakes
        if row["heatmap"]:
            assert (report_folder / row["heatmap"]).is_file()
    decisions = metrics["at_model_threshold"]
    assert sum(r["correct"] == "no" and r["true_class"] == "good" for r in rows) == decisions["false_positives"]
    assert sum(r["correct"] == "no" and r["true_class"] != "good" for r in rows) == decisions["false_negatives"]


def test_the_report_names_every_mistake_and_holds_its_images(report_folder: Path) -> None:
    page = (report_folder / "report.html").read_text()
    rows = _rows(report_folder)
    assert "Verdicts at the threshold" in page and "judged defective" in page  # the confusion matrix
    for row in rows:
        if row["correct"] == "no":
            assert row["path"] in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)  # nothing external
    assert "recall" in page and "AUPRO" in page and "false-alarm rate" in page  # the glossary
    markdown = (report_folder / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (report_folder / link).is_file()
    assert (report_folder / "curves.png").is_file() and (report_folder / "histogram.png").is_file()


def test_the_report_says_which_model_data_and_software_made_it(report_folder: Path, served_folder: Path,
                                                                demo_root: Path) -> None:
    provenance = json.loads((report_folder / "metrics.json").read_text())["provenance"]
    digest = file_sha256(served_folder / "part.dsmodel")
    assert provenance["model_sha256"] == digest and provenance["model_version"] == digest[:12]
    assert provenance["model_file"] == str(served_folder / "part.dsmodel")
    listing = "".join(f"{sample.path.relative_to(demo_root).as_posix()}\t{file_sha256(sample.path)}\n"
                      for sample in sorted(load_dataset(demo_root).test, key=lambda s: s.path.relative_to(demo_root)))
    assert provenance["test_set_sha256"] == hashlib.sha256(listing.encode()).hexdigest()  # the test images, by content
    assert provenance["software"].startswith(f"defectscope {__version__}, torch ")
    assert provenance["evaluated_at"].endswith("+00:00") and "threshold" in provenance["operating_point"]
    for name in ("report.md", "report.html"):
        text = (report_folder / name).read_text()
        assert "Provenance" in text and digest in text and provenance["test_set_sha256"] in text


def test_a_report_written_again_leaves_nothing_of_the_earlier_one(report_folder: Path, demo_root: Path,
                                                                 tmp_path: Path) -> None:
    """A model without maps evaluated into the folder of a PatchCore report left its gallery and overlays beside the
    new report, as if they were the new model's."""
    from defectscope.detectors import create_detector
    from defectscope.pipeline import evaluate_model

    out = tmp_path / "report"
    shutil.copytree(report_folder, out)
    (out / "cases").mkdir(exist_ok=True)
    (out / "cases" / "earlier_001.png").write_bytes((out / "histogram.png").read_bytes())  # an overlay of before
    (out / "cases" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    assert (out / "gallery.png").is_file()
    dataset = load_dataset(demo_root)
    knn = create_detector("knn", image_size=64, crop=None)
    knn.fit([sample.path for sample in dataset.train])
    _, written = evaluate_model(knn, dataset, out)
    assert not (out / "gallery.png").exists() and not list((out / "cases").glob("*.png"))
    assert (out / "notes.txt").read_text() == (out / "cases" / "notes.txt").read_text() == "mine"
    left = {p.name for p in out.iterdir()} - {p.name for p in written} - {".defectscope-output"}
    assert left == {"notes.txt", "cases"}


def test_a_demo_run_again_keeps_no_overlays_of_the_earlier_model(demo_root: Path, report_folder: Path,
                                                                  tmp_path: Path) -> None:
    """`demo --model knn` into an earlier PatchCore demo kept that model's overlays beside the k-NN's report."""
    from defectscope.files import claim_folder
    from defectscope.pipeline import run_demo

    out = claim_folder(tmp_path / "demo-output", what="demo output")
    earlier = claim_folder(out / "heatmaps", what="heatmaps") / "broken.png"
    earlier.write_bytes((report_folder / "histogram.png").read_bytes())  # an overlay of the earlier demo's model
    (out / "heatmaps" / "notes.txt").write_text("mine")
    run_demo(out, demo_root, model="knn")
    assert not earlier.exists() and (out / "heatmaps" / "notes.txt").read_text() == "mine"


def test_the_report_names_the_model_file_as_it_was_evaluated(served_folder: Path, demo_root: Path, tmp_path: Path,
                                                             cli, monkeypatch) -> None:
    """The report hashed the model file once the evaluation was done: a file calibrated in place meanwhile was named
    as the model of metrics it never made."""
    from defectscope import evaluation
    from defectscope.pipeline import recalibrate

    model, other = tmp_path / "part.dsmodel", tmp_path / "other.dsmodel"
    shutil.copyfile(served_folder / "part.dsmodel", model)
    evaluated_as = file_sha256(model)
    recalibrate(model, other, false_alarm_rate=0.2)
    evaluate = evaluation.evaluate

    def replaced_meanwhile(*args, **kwargs):
        done = evaluate(*args, **kwargs)
        shutil.copyfile(other, model)  # another command writes the file while it is evaluated
        return done

    monkeypatch.setattr("defectscope.pipeline.evaluate", replaced_meanwhile)
    assert cli("evaluate", model, demo_root, "-o", tmp_path / "report").code == 0
    provenance = json.loads((tmp_path / "report" / "metrics.json").read_text())["provenance"]
    assert provenance["model_sha256"] == evaluated_as != file_sha256(model)


def test_a_score_that_is_not_a_number_is_an_error_never_right() -> None:
    records = [{"path": "a.png", "defect": "good", "label": 0, "score": 1.0},
               {"path": "b.png", "defect": "scratch", "label": 1, "score": float("nan")},
               {"path": "c.png", "defect": "scratch", "label": 1, "score": 3.0}]
    rows = prediction_table(records, 2.0)
    assert [r["verdict"] for r in rows] == ["good", "error", "defective"]
    assert [r["correct"] for r in rows] == [True, False, True]
    assert np.isclose(rows[2]["normalized_score"], 1.5)
    assert confusion(rows) == {"good": {"good": 1, "defective": 0, "error": 0},
                               "defective": {"good": 0, "defective": 1, "error": 1}}


def test_the_report_says_whether_the_stated_false_alarm_rate_holds_on_the_good_test_images(
        report_folder: Path, demo_root: Path, served_folder: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageOps

    from defectscope.artifacts import load_model
    from defectscope.pipeline import evaluate_model
    from defectscope.reports import metrics_markdown

    metrics = json.loads((report_folder / "metrics.json").read_text())["metrics"]
    check = metrics["at_model_threshold"]["stated_rate_check"]
    assert check["holds"] and check["images"] == metrics["good"] and check["flagged"] == metrics["at_model_threshold"]["false_positives"]
    assert "The stated rate holds here: " in (report_folder / "report.md").read_text()
    changed = tmp_path / "part"
    shutil.copytree(demo_root, changed)
    for path in (changed / "test" / "good").iterdir():  # the same parts under another light: every good one looks new
        ImageOps.invert(Image.open(path).convert("RGB")).save(path)
    evaluation = evaluate_model(load_model(served_folder / "part.dsmodel"), load_dataset(changed), tmp_path / "report")[0]
    check = evaluation.metrics["at_model_threshold"]["stated_rate_check"]
    assert not check["holds"] and check["p_value"] < 0.01 and check["bias_sd"] < -2 * check["bias_se"]
    assert "Warning: " in (tmp_path / "report" / "report.md").read_text()
    assert "warning: " in metrics_markdown(evaluation.metrics) and "the stated rate does not hold" in check["message"]
