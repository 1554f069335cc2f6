"""Exported models: the torch-free runtime gives the PyTorch model's scores, maps and verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_arrays

from defectscope import load_dataset
from defectscope.artifacts import load_model, save_model
from defectscope.data import batches
from defectscope.deployment import export_model
from defectscope.detectors.base import create_detector
from defectscope.errors import DefectscopeError
from defectscope.predictor import check_predictor
from defectscope.manifests import file_bytes, header_metadata
from defectscope.runtime import DeployedModel, memory_digest, read_deployment

pytest.importorskip("onnxruntime")

NO_TORCH = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "scipy", "sklearn", "cv2"):
            raise ImportError(f"{name} must not be imported by the runtime")
sys.meta_path.insert(0, Refuse())
"""


@pytest.fixture(scope="module")
def test_images(demo_root: Path) -> list[Path]:
    return [s.path for s in load_dataset(demo_root).test]


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Model files of small models fitted on the demo data: PatchCore (with and without the global view), PaDiM, the
    k-NN baseline, a convolutional autoencoder, and the segmenter (from the test images' masks)."""
    folder = tmp_path_factory.mktemp("models")
    dataset = load_dataset(demo_root)
    paths = {}
    for name, settings in {"patchcore": {"image_size": 128, "crop": 112, "coreset_ratio": 0.25, "global_view": "off"},
                           "patchcore-global": {"image_size": 128, "crop": 112, "coreset_ratio": 0.25, "global_view": "on"},
                           "padim": {"image_size": 128, "crop": 112}, "knn": {"image_size": 128, "crop": None},
                           "autoencoder": {"image_size": 64, "crop": None, "epochs": 25}}.items():
        detector = create_detector(name.split("-")[0], **settings)
        detector.fit([s.path for s in dataset.train])
        paths[name] = save_model(detector, folder / f"{name}.dsmodel")
    segmenter = create_detector("segmenter", image_size=128, crop=None, epochs=30, lr=3e-3)
    segmenter.fit_masks(list(dataset.test))
    paths["segmenter"] = save_model(segmenter, folder / "segmenter.dsmodel")
    return paths


def _assert_same(expected, got) -> None:
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4)
    assert got.verdicts == expected.verdicts
    if expected.maps is None:
        assert got.maps is None
        return
    for want, have in zip(expected.maps, got.maps):
        assert have.shape == want.shape
        assert np.abs(have - want).max() <= 1e-3 * (want.max() - want.min())


@pytest.mark.parametrize("name, file_format", [("patchcore", "onnx"), ("padim", "onnx"), ("knn", "onnx"),
                                               ("autoencoder", "onnx"), ("segmenter", "onnx"), ("patchcore", "openvino"),
                                               ("patchcore-global", "onnx"), ("patchcore-global", "openvino")])
def test_export_predicts_what_the_model_predicts(fitted, test_images, tmp_path: Path, name: str, file_format: str) -> None:
    if file_format == "openvino":
        pytest.importorskip("openvino")
    written = export_model(fitted[name], tmp_path / f"{name}.dsdeploy", file_format)
    assert [p.name for p in written][:2] == [f"{name}.dsdeploy", f"{name}.{'onnx' if file_format == 'onnx' else 'xml'}"]
    model, deployed = load_model(fitted[name]), DeployedModel(written[0], threads=2)
    expected = model.predict(test_images)
    assert 0 < sum(v == "defective" for v in expected.verdicts) < len(test_images)  # both verdicts occur
    _assert_same(expected, deployed.predict(test_images))
    check_predictor(deployed, test_images[:3])
    if file_format == "openvino":  # compiled for one image a run: a static shape runs faster than a dynamic batch
        assert deployed.engine.chunk == 1 and all(put.get_partial_shape().is_static for put in deployed.engine.model.inputs)
    batch_of_one = deployed.predict(test_images[:1])  # the batch dimension is dynamic
    np.testing.assert_allclose(batch_of_one.scores, expected.scores[:1], rtol=1e-4)


def test_runtime_runs_without_torch_and_fails_closed(fitted, test_images, tmp_path: Path) -> None:
    """The slim install (no torch, no OpenCV: Pillow decodes) scores as the library does and fails closed."""
    out = export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    script = NO_TORCH + "from defectscope.runtime import main\nsys.exit(main(sys.argv[1:]))\n"
    run = subprocess.run([sys.executable, "-c", script, str(out), str(test_images[0]), str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr  # one image could not be scored
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    expected = load_model(fitted["patchcore"]).predict(test_images[:1])
    assert rows[0]["verdict"] == expected.verdicts[0]
    assert rows[0]["score"] == pytest.approx(float(expected.scores[0]), rel=1e-4)
    assert rows[1]["verdict"] == "error" and rows[1]["score"] is None
    for threads in ("-3", "0"):  # OpenVINO said "export the model again"; onnxruntime ran on its own choice
        refused = subprocess.run([sys.executable, "-c", script, str(out), str(test_images[0]), "--threads", threads],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.startswith("error: threads must be"), refused.stderr


def test_an_export_keeps_the_predictor_contract_without_torch_or_scipy(fitted, test_images, tmp_path: Path) -> None:
    """What the hot folder and the service use of an export (`load_predictor`, `predict`, `calibration`) runs on the
    slim install: a restarted line is ready in well under a second."""
    out = export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")[0]
    script = NO_TORCH + ("from pathlib import Path\nfrom defectscope.predictor import load_predictor\n"
                         "model = load_predictor(Path(sys.argv[1]))\n"
                         "print(model.predict([sys.argv[2]]).verdicts[0], model.calibration.describe())\n")
    run = subprocess.run([sys.executable, "-c", script, str(out), str(test_images[0])], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-800:]
    assert run.stdout.split()[0] == load_model(fitted["patchcore"]).predict(test_images[:1]).verdicts[0]
    assert "expected false-alarm rate" in run.stdout


def test_patchcore_export_searches_its_memory_with_the_library_search(fitted, test_images, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """PatchCore's export is two graphs with the library's pruned exact search between them: the deployment file holds
    the memory bank (not the graphs), the runtime searches it for the whole batch at once, and the graphs run on as many
    images at a time as the library's backbone passes (`images_per_pass`: their memory stays bounded)."""
    monkeypatch.setattr(batches, "PASS_PIXELS", 4 * 112 * 112 + 1)  # passes of 4 of these 112 x 112 frames
    onnx = pytest.importorskip("onnx")
    model = load_model(fitted["patchcore-global"])
    written = export_model(fitted["patchcore-global"], tmp_path / "part.dsdeploy")
    assert [p.name for p in written] == ["part.dsdeploy", "part.onnx", "part-scores.onnx"]
    rows = len(model.index.bank)
    for graph in written[1:]:  # no constant of the graphs has a dimension of the bank's rows
        assert all(rows not in init.dims for init in onnx.load(str(graph)).graph.initializer)
    deployed = DeployedModel(written[0], threads=2)
    np.testing.assert_array_equal(deployed.index.bank, model.index.bank.numpy())
    searches, runs = [], []
    search, run = deployed.index.search, deployed.engine.run
    deployed.index.search = lambda queries, workers=1: searches.append(len(queries)) or search(queries, workers)
    deployed.engine.run = lambda inputs: runs.append(len(inputs["image"])) or run(inputs)
    _assert_same(model.predict(test_images[:9]), deployed.predict(test_images[:9]))
    assert runs == [4, 4, 1] and searches == [9 * (112 // 16) ** 2]


def test_an_export_of_frames_that_take_a_backbone_pass_each_scores_any_batch(fitted, test_images, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A frame too large for two in one backbone pass: the export, traced on a batch of 2, still takes any batch."""
    monkeypatch.setattr(batches, "PASS_PIXELS", 112 * 112)  # one of these 112 x 112 frames a pass
    for name in ("patchcore-global", "knn"):
        written = export_model(fitted[name], tmp_path / f"{name}.dsdeploy")
        _assert_same(load_model(fitted[name]).predict(test_images[:3]), DeployedModel(written[0]).predict(test_images[:3]))


def test_patchcore_export_never_replaces_a_foreign_second_graph(fitted, tmp_path: Path) -> None:
    foreign = tmp_path / "part-scores.onnx"
    foreign.write_text("not ours")
    with pytest.raises(DefectscopeError, match="part-scores.onnx"):
        export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")
    assert foreign.read_text() == "not ours" and sorted(p.name for p in tmp_path.iterdir()) == ["part-scores.onnx"]
    written = export_model(fitted["knn"], tmp_path / "other.dsdeploy")  # one graph: a later PatchCore export there
    export_model(fitted["patchcore"], tmp_path / "other.dsdeploy")  # replaces it, and a knn export again removes the
    export_model(fitted["knn"], tmp_path / "other.dsdeploy")  # PatchCore's second graph, which was ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["part-scores.onnx", *(p.name for p in written)])


def test_an_export_name_too_long_for_its_graph_files_is_refused_before_any_work(fitted, tmp_path: Path) -> None:
    """A 254-byte deployment name is a valid file name, but its second graph's (NAME-scores.onnx) is not: the export
    failed with the file system's 'File name too long' on a file the user never named."""
    name = "f" * 245 + ".dsdeploy"
    with pytest.raises(DefectscopeError, match=r"graph files named after f+\.dsdeploy would pass .* at most 252 bytes"):
        export_model(fitted["patchcore"], tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    written = export_model(fitted["patchcore"], tmp_path / ("f" * 243 + ".dsdeploy"))  # 252 bytes: -scores.onnx fits
    assert len(written) == 3 and max(len(p.name.encode()) for p in written) == 255


def test_an_altered_memory_bank_is_refused(fitted, tmp_path: Path) -> None:
    out = export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")[0]
    data = bytearray(out.read_bytes())
    data[-16] ^= 1  # a bit of the tensors, past the header: the safetensors layout stays intact
    out.write_bytes(bytes(data))
    with pytest.raises(DefectscopeError, match="its tensors do not match the digest"):  # the file's own digest
        DeployedModel(out)
    manifest, memory = read_deployment(export_model(fitted["patchcore"], tmp_path / "again.dsdeploy")[0])
    memory["memory_bank"][0, 0] += 1  # written whole with another bank: the search's record of the bank refuses it
    (tmp_path / "again.dsdeploy").write_bytes(file_bytes(lambda metadata: save_arrays(memory, metadata=metadata), manifest))
    with pytest.raises(DefectscopeError, match="memory bank does not match"):
        DeployedModel(tmp_path / "again.dsdeploy")
    manifest, memory = read_deployment(export_model(fitted["patchcore"], tmp_path / "again.dsdeploy")[0])
    memory["memory_bank"][0, 0] = np.nan  # a bank that is not finite, recorded as such: refused all the same
    manifest["graph"]["search"]["sha256"] = memory_digest(memory)
    (tmp_path / "again.dsdeploy").write_bytes(save_arrays(memory, metadata=header_metadata(manifest)))
    with pytest.raises(DefectscopeError, match="not a finite"):
        DeployedModel(tmp_path / "again.dsdeploy")


def test_graph_that_does_not_match_is_refused(fitted, tmp_path: Path) -> None:
    out, graph = export_model(fitted["knn"], tmp_path / "knn.dsdeploy")
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(Exception, match="does not match"):
        DeployedModel(out)
    graph.unlink()
    with pytest.raises(Exception, match="is missing"):
        DeployedModel(out)


def test_cli_exports_and_predicts_with_the_export(fitted, test_images, tmp_path: Path, cli) -> None:
    out = tmp_path / "knn.dsdeploy"
    result = cli("export", "model", fitted["knn"], "-o", out)
    assert result.code == 0, result.err
    assert out.is_file() and out.with_suffix(".onnx").is_file()
    manifest_rows = cli("predict", out, *test_images[:4], "--json")
    assert manifest_rows.code == 0, manifest_rows.err
    verdicts = [json.loads(line)["verdict"] for line in manifest_rows.out.splitlines()]
    assert verdicts == load_model(fitted["knn"]).predict(test_images[:4]).verdicts
    again = cli("export", "model", fitted["knn"], "-o", out)  # an earlier export of ours is replaced
    assert again.code == 0, again.err
    script = NO_TORCH + "from defectscope.cli import main\nsys.argv = ['defectscope', 'info', sys.argv[1]]\nmain()\n"
    shown = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-800:]  # `info` reads a deployment file's manifest, without torch
    manifest = json.loads(shown.stdout)
    assert manifest["graph"]["engine"] == "onnxruntime" and manifest["model"]["detector"] == "knn"


def test_cli_export_refuses_to_replace_foreign_files(fitted, tmp_path: Path, cli) -> None:
    out = tmp_path / "notes.dsdeploy"
    out.write_text("my notes")
    assert cli("export", "model", fitted["knn"], "-o", out).code == 2
    assert out.read_text() == "my notes"
    graph = tmp_path / "other.onnx"
    graph.write_text("not ours")
    result = cli("export", "model", fitted["knn"], "-o", tmp_path / "other.dsdeploy")
    assert result.code == 2 and graph.read_text() == "not ours" and not (tmp_path / "other.dsdeploy").exists()
    assert cli("export", "model", fitted["knn"], "-o", tmp_path / "x.onnx").code == 2  # the output names the deployment file
    assert cli("export", "model", fitted["knn"], "-o", tmp_path / "y.dsdeploy", "--format", "tflite").code == 2


def test_the_drift_check_reads_an_exports_calibration_and_its_own_verdicts(fitted, tmp_path: Path) -> None:
    from defectscope.files import file_sha256
    from defectscope.line.drift import audited_drift
    from tests.test_drift import _audit, _scores_like

    out = export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")[0]
    calibration = load_model(fitted["patchcore"]).calibration
    _audit(tmp_path / "audit.sqlite", file_sha256(out), _scores_like(calibration, 100, 1.0), calibration.threshold)
    found = audited_drift(tmp_path / "audit.sqlite", out)
    assert found.drifted and found.parts == 100  # the export's verdicts, against the median its manifest carries
    assert audited_drift(tmp_path / "audit.sqlite", fitted["patchcore"]).parts == 0  # the model file's: none


def test_an_export_names_the_model_file_it_was_made_from(fitted, tmp_path: Path, monkeypatch) -> None:
    """The export hashed its source after loading it: a file replaced meanwhile was named as the source of a graph
    made from another model."""
    from defectscope import deployment

    model = tmp_path / "part.dsmodel"
    model.write_bytes(Path(fitted["knn"]).read_bytes())
    load = deployment.load_model

    def replaced_meanwhile(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes() + b" ")  # another command writes the file
        return loaded

    monkeypatch.setattr(deployment, "load_model", replaced_meanwhile)
    with pytest.raises(DefectscopeError, match="since export read it"):
        export_model(model, tmp_path / "part.dsdeploy", "onnx")
    assert not list(tmp_path.glob("part.ds*deploy*")) and not list(tmp_path.glob("*.onnx"))


def test_info_refuses_a_deployment_whose_graph_files_are_missing_or_altered(fitted, tmp_path: Path, cli) -> None:
    """`info` printed the manifest of a deployment whose graph file was gone, and exited 0: a bundle checked with it
    before it went to a line could not run there."""
    written = export_model(fitted["patchcore"], tmp_path / "part.dsdeploy")
    assert cli("info", written[0]).code == 0
    graph, scores = written[1], written[2]
    kept = graph.read_bytes()
    graph.unlink()
    missing = cli("info", written[0])
    assert missing.code == 2 and f"the graph file {graph.name} of" in missing.err and "is missing" in missing.err
    graph.write_bytes(scores.read_bytes())  # another graph under its name
    altered = cli("info", written[0])
    assert altered.code == 2 and "does not match" in altered.err
    graph.write_bytes(kept)
    assert cli("info", written[0]).code == 0
