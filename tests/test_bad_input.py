"""Hostile and broken input, generated on the fly: every case fails closed with one clear line, loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors_bytes

from defectscope.artifacts import load_model, model_info, save_model
from defectscope.data.decode import read_image
from defectscope.data.layout import load_dataset
from defectscope.data.synthetic import make_demo_dataset
from defectscope.detectors import create_detector
from defectscope.prediction import Prediction
from defectscope.errors import DefectscopeError
from defectscope.experiments.config import load_experiment
from defectscope.experiments.runner import run_experiment
from defectscope.files import MARKER, read_regular, write_atomic
from defectscope.manifests import file_bytes
from defectscope.settings import MAX_SEED, derived_seed

SMALL = {"image_size": 64, "crop": None}


def user_copy(source: Path, target: Path) -> Path:
    """A copy of a generated dataset as a user's own folder (without the mark of a folder defectscope made)."""
    shutil.copytree(source, target)
    (target / MARKER).unlink()
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below a folder with its bytes: to prove nothing was written or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming what is wrong, no traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height pixels (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))
    return path


def rewrite_manifest(source: Path, target: Path, edit, tensors: dict | None = None, digest: bool = True) -> Path:
    """A copy of a model file with its manifest edited (and optionally other tensors); with `digest`, the manifest's
    digest is written anew, as a tool that knows the format would (without it: a hand edit)."""
    data = source.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    manifest = json.loads(header["__metadata__"]["defectscope"])
    edit(manifest)
    if tensors is None:
        from safetensors.torch import load
        tensors = load(data)
    text = json.dumps(manifest)
    metadata = {"defectscope": text, **({"defectscope.sha256": hashlib.sha256(text.encode()).hexdigest()} if digest else {})}
    target.write_bytes(save_tensors_bytes(tensors, metadata=metadata))
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("bad") / "part", size=64, train=12, test_good=4, per_defect=3, seed=5)


@pytest.fixture(scope="module")
def knn_model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = create_detector("knn", **SMALL)
    detector.fit([s.path for s in load_dataset(data).train])
    return save_model(detector, tmp_path_factory.mktemp("models") / "knn.dsmodel")


@pytest.fixture(scope="module")
def padim_model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = create_detector("padim", **SMALL)
    detector.fit([s.path for s in load_dataset(data).train])
    return save_model(detector, tmp_path_factory.mktemp("models") / "padim.dsmodel")


# 1. NaN fails closed ---------------------------------------------------------------------------

def test_diverged_training_writes_no_model(data: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "ae.dsmodel"
    detector = create_detector("autoencoder", **SMALL, epochs=2, lr=1.0e6)
    with pytest.raises(DefectscopeError, match="not finite"):
        detector.fit([s.path for s in load_dataset(data).train])
    config = tmp_path / "diverge.yaml"
    config.write_text("name: diverge\nattempts:\n  - {name: ae, model: autoencoder, epochs: 2, lr: 1.0e+6, image_size: 64}\n")
    with pytest.raises(DefectscopeError, match="not finite"):
        run_experiment(load_experiment(config), data, tmp_path / "runs")
    assert not (tmp_path / "runs" / "ae").exists() and not out.exists()


def test_non_finite_scores_get_verdict_error_and_strict_json(knn_model: Path, padim_model: Path, data: Path, tmp_path: Path,
                                                             cli) -> None:
    assert Prediction(np.array([np.nan, np.inf, 0.5, 2.0]), None, 1.0).verdicts == ["error", "error", "good", "defective"]
    overflowing = load_model(knn_model)
    overflowing.learned["bank"] = torch.full_like(overflowing.learned["bank"], 3e38)  # finite, but distances overflow
    path = save_model(overflowing, tmp_path / "overflow.dsmodel")
    result = cli("-q", "predict", path, data / "test" / "good", "--json")
    assert result.code == 3
    rows = [json.loads(line) for line in result.out.splitlines()]  # strict parser: a bare NaN would fail here
    assert rows and all(r["verdict"] == "error" and r["score"] is None and "finite" in r["error"] for r in rows)
    assert "NaN" not in result.out and "Infinity" not in result.out
    one_line_error(cli("evaluate", path, data), "not a finite number")
    padim = load_model(padim_model)
    padim.mean[0, 0] = 3e38  # finite, but the map overflows
    broken_maps = save_model(padim, tmp_path / "overflow-padim.dsmodel")
    one_line_error(cli("export", "labels", data, "--from-model", broken_maps, "-o", tmp_path / "labels"), "not finite")
    assert not (tmp_path / "labels").exists()


def test_model_files_with_non_finite_values_are_refused(knn_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load
    tensors = load(knn_model.read_bytes())
    tensors["bank"][0, 0] = float("nan")
    nan_tensor = rewrite_manifest(knn_model, tmp_path / "nan.dsmodel", lambda m: None, tensors)
    with pytest.raises(DefectscopeError, match="not finite"):
        load_model(nan_tensor)

    def nan_threshold(manifest: dict) -> None:
        manifest["calibration"]["threshold"] = float("nan")
    with pytest.raises(DefectscopeError, match="threshold"):
        load_model(rewrite_manifest(knn_model, tmp_path / "nan-threshold.dsmodel", nan_threshold))
    detector = load_model(knn_model)
    detector.learned["bank"][0, 0] = float("inf")
    with pytest.raises(DefectscopeError, match="not finite"):
        save_model(detector, tmp_path / "inf.dsmodel")
    assert not (tmp_path / "inf.dsmodel").exists()


# 2, 3. Commands overwrite nothing that is not theirs, and check outputs before any work -------

@pytest.mark.parametrize("model", ["segmenter", "detector"])
def test_mask_models_refuse_defects_without_a_region_to_learn(data: Path, tmp_path: Path, cli, model: str) -> None:
    """A defective image without a mask, or whose mask marks nothing, was learned as background by a mask model."""
    copy = user_copy(data, tmp_path / "mine")
    mask = sorted((copy / "ground_truth" / "broken").iterdir())[0]
    cv2.imwrite(str(mask), np.zeros((64, 64), np.uint8))
    one_line_error(cli("fit", copy, "--model", model, "-o", tmp_path / "m.dsmodel"), mask.name, "background")
    shutil.rmtree(copy / "ground_truth" / "broken")  # a whole type without masks: a warning when the data is read
    one_line_error(cli("fit", copy, "--model", model, "-o", tmp_path / "m.dsmodel"), "have no mask", "background")
    assert not (tmp_path / "m.dsmodel").exists()


def test_demo_data_never_replaces_a_dataset(data: Path, tmp_path: Path, cli) -> None:
    copy = user_copy(data, tmp_path / "mine")
    before = snapshot(copy)
    refused = cli("data", "demo", copy)
    one_line_error(refused, "not empty")
    assert "--force" not in refused.err  # `data demo` has no --force to offer
    assert snapshot(copy) == before
    assert cli("data", "demo", tmp_path / "new", "--size", "32").code == 0
    assert cli("data", "demo", tmp_path / "new", "--size", "32").code == 0  # its own demo folder: may be rewritten


def test_fit_refuses_bad_outputs_before_fitting(data: Path, knn_model: Path, tmp_path: Path, cli,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.detectors.base import Detector

    def no_fit(*_args, **_kwargs):
        raise AssertionError("fit ran before the output was checked")
    monkeypatch.setattr(Detector, "fit", no_fit)
    copy = user_copy(data, tmp_path / "mine")
    image = copy / "train" / "good" / "000.png"
    before = image.read_bytes()
    one_line_error(cli("fit", copy, "-o", image, "--model", "knn"), "000.png", "ends in .dsmodel")
    one_line_error(cli("fit", copy, "-o", image, "--model", "knn", "--force"), "000.png", "ends in .dsmodel")
    assert image.read_bytes() == before  # --force replaces a model file, never an image
    one_line_error(cli("calibrate", knn_model, "--false-alarm-rate", "0.05", "-o", image, "--force"),
                   "ends in .dsmodel")
    assert image.read_bytes() == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(cli("fit", copy, "-o", afile / "m.dsmodel", "--model", "knn"), "is a file")
    one_line_error(cli("fit", copy, "-o", tmp_path, "--model", "knn"), "is a folder")
    one_line_error(cli("fit", copy, "-o", tmp_path / "m.dsmodel", "--backbone", ""), "unknown backbone ''")  # was the default
    shutil.rmtree(copy / "ground_truth")  # a mask model learns from masks: without them it says so and writes nothing
    one_line_error(cli("fit", copy, "-o", tmp_path / "m.dsmodel", "--model", "segmenter"), "no defective test images with masks")
    assert not (tmp_path / "m.dsmodel").exists()


@pytest.mark.parametrize("seed", [MAX_SEED + 1, 10**20, -1])
def test_a_seed_beyond_every_random_source_is_refused(data: Path, tmp_path: Path, cli, seed: int) -> None:
    """faiss takes a signed 32-bit seed, NumPy no negative one: each was a traceback, after the fit had begun."""
    out = tmp_path / "out"
    one_line_error(cli("fit", data, "-o", out / "m.dsmodel", "--seed", str(seed)), "'seed'", str(MAX_SEED))
    one_line_error(cli("data", "demo", out, "--size", "32", "--seed", str(seed)), "'seed'", str(MAX_SEED))
    one_line_error(cli("export", "labels", data, "--format", "yolo", "-o", out, "--seed", str(seed)), "'seed'")
    assert not out.exists()


def test_the_largest_seed_is_the_largest_faiss_takes_and_derived_seeds_wrap() -> None:
    from defectscope.detectors.nearest import ClusteredBank

    bank = torch.randn(1000, 8)
    assert len(ClusteredBank.build(bank, MAX_SEED).offsets) > 2  # k-means ran with it
    with pytest.raises(OverflowError):
        ClusteredBank.build(bank, MAX_SEED + 1)
    assert derived_seed(MAX_SEED, 1) == 0 and derived_seed(5, 2) == 7


def raising(error: BaseException):
    """A stand-in for a function that raises `error`."""
    def fail(*_args, **_kwargs):
        raise error
    return fail


def test_running_out_of_memory_is_one_line(data: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's CPU allocator raises a RuntimeError (e.g. `fit --image-size 4096` under a memory limit): a traceback."""
    from defectscope import pipeline

    torch_says = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")
    for raised, said in ((RuntimeError(torch_says), "out of memory (one more block of 2.0 GiB)"), (MemoryError(), "out of memory:")):
        monkeypatch.setattr(pipeline, "fit_model", raising(raised))
        one_line_error(cli("fit", data, "-o", tmp_path / "m.dsmodel"), said, "--image-size")
    monkeypatch.setattr(pipeline, "fit_model", raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other failure is not dressed up as one
        cli("fit", data, "-o", tmp_path / "m.dsmodel")


def test_fit_replaces_a_model_file_but_not_other_files(data: Path, knn_model: Path, tmp_path: Path, cli) -> None:
    target = tmp_path / "m.dsmodel"
    shutil.copy(knn_model, target)
    result = cli("-q", "fit", data, "-o", target, "--model", "knn", "--image-size", "64", "--crop", "0")
    assert result.code == 0 and str(target) in result.out.replace("\n", "")
    assert str(target) in result.out.splitlines()[0]  # the path is printed whole, on the line it belongs to


def test_output_folders_must_be_new_empty_or_ours(knn_model: Path, padim_model: Path, data: Path, tmp_path: Path, cli) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_error(cli("evaluate", knn_model, data, "--out", mine), "not empty")
    one_line_error(cli("predict", padim_model, data / "test" / "good", "--heatmaps", mine), "not empty")
    assert snapshot(mine) == {"notes.txt": b"keep"}
    assert cli("-q", "evaluate", knn_model, data, "--out", tmp_path / "report").code == 0
    assert (tmp_path / "report" / MARKER).is_file()
    assert cli("-q", "evaluate", knn_model, data, "--out", tmp_path / "report").code == 0  # ours: rewritten
    assert cli("-q", "evaluate", knn_model, data, "--out", mine, "--force").code == 0
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_model_knows_the_images_it_learned_from(data: Path, tmp_path: Path, cli) -> None:
    from safetensors.numpy import load as load_arrays, save as save_arrays

    from defectscope.data.decode import TRAIN_DIGESTS, content_digests
    from defectscope.runtime import DeployedModel

    model = tmp_path / "m.dsmodel"
    assert cli("-q", "fit", data, "-o", model, "--model", "padim", "--image-size", "64", "--crop", "0",
               "--set", "keep_covariance=true").code == 0
    train = [s.path for s in load_dataset(data).train]
    learned = load_model(model).train_digests
    assert sorted(map(bytes, learned)) == sorted(map(bytes, content_digests(train)))
    leaky = user_copy(data, tmp_path / "leaky")
    for image in train[:3]:
        shutil.copy(image, leaky / "test" / "good" / f"train-{image.name}")
    evaluated = cli("-q", "evaluate", model, leaky)
    assert evaluated.code == 0 and "3 of the 16 test images are images this model learned from" in evaluated.out
    assert "learned from" not in cli("-q", "evaluate", model, data).out  # its own test split: nothing to say
    defects = [s.path for s in load_dataset(data).test if s.label]
    one_line_error(cli("calibrate", model, "--f1", "--good", train[0], "--good", leaky / "test" / "good" / "000.png",
                       "--defective", defects[0], "-o", tmp_path / "c.dsmodel"), "1 labelled image(s) are images this "
                   "model learned from", "000.png")
    assert not (tmp_path / "c.dsmodel").exists()
    relearned = cli("update", model, "--good", variant_source := leaky / "test" / "good" / f"train-{train[1].name}",
                    "-o", tmp_path / "again.dsmodel")  # a copy of a training image: its scores would flatter it
    assert relearned.code == 2 and "images this model learned from already" in relearned.err
    assert variant_source.name in relearned.err and not (tmp_path / "again.dsmodel").exists()
    variant = tmp_path / "new-good.png"
    cv2.imwrite(str(variant), cv2.imread(str(train[0]))[:, ::-1])
    assert cli("-q", "update", model, "--good", variant, "-o", tmp_path / "taught.dsmodel", "--accept-defect-like").code == 0
    assert len(load_model(tmp_path / "taught.dsmodel").train_digests) == len(train) + 1
    deployment = tmp_path / "m.dsdeploy"
    assert cli("-q", "export", "model", model, "-o", deployment).code == 0
    assert sorted(map(bytes, DeployedModel(deployment).train_digests)) == sorted(map(bytes, learned))
    assert "3 of the 16 test images are images this model learned from" in cli("-q", "evaluate", deployment, leaky).out
    data_bytes = deployment.read_bytes()
    manifest = json.loads(json.loads(data_bytes[8 : 8 + struct.unpack("<Q", data_bytes[:8])[0]])["__metadata__"]["defectscope"])
    arrays = load_arrays(data_bytes)
    arrays[TRAIN_DIGESTS] = arrays[TRAIN_DIGESTS][1:]  # one training image dropped from the record
    deployment.write_bytes(file_bytes(lambda metadata: save_arrays(arrays, metadata=metadata), manifest))
    with pytest.raises(DefectscopeError, match="training images' digests do not match"):  # written whole, digests anew
        DeployedModel(deployment)


def test_outputs_never_land_among_their_inputs(padim_model: Path, data: Path, tmp_path: Path, cli) -> None:
    copy = user_copy(data, tmp_path / "mine")
    before = snapshot(copy)
    one_line_error(cli("evaluate", padim_model, copy, "--out", copy / "test" / "good", "--force"),
                   "must not contain each other")  # its plots would be read as good test images
    one_line_error(cli("predict", padim_model, copy / "test", "--heatmaps", copy / "test" / "heat"),
                   "must not contain each other")  # folders are read recursively: the next run would score them
    one_line_error(cli("predict", padim_model, copy / "test" / "good" / "000.png", copy / "test" / "good" / "001.png",
                       "--heatmaps", copy / "test" / "good", "--force"), "must not contain each other")
    one_line_error(cli("demo", "--data", copy, "--out", copy / "demo", "--model", "knn"), "must not contain each other")
    assert snapshot(copy) == before


# 4. Names from config files never leave the output root --------------------------------------

@pytest.mark.parametrize("text,fragment", [
    ("name: ok\nattempts:\n  - {name: ../../x, model: knn}\n", "'../../x'"),
    ("name: /tmp/x\nattempts:\n  - {name: a, model: knn}\n", "'/tmp/x'"),
    ("name: ok\nattempts:\n  - {name: 'a/b', model: knn}\n", "'a/b'"),
    ("name: ..\nattempts:\n  - {name: a, model: knn}\n", "'..'"),
])
def test_traversal_names_are_refused(tmp_path: Path, cli, text: str, fragment: str) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(text)
    before = snapshot(tmp_path)
    one_line_error(cli("experiment", "run", config, "--data", tmp_path, "--out", tmp_path / "out"), fragment, "folder name")
    assert snapshot(tmp_path) == before


def test_a_forced_experiment_never_deletes_a_foreign_folder(data: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "mine"
    (out / "knn").mkdir(parents=True)
    (out / "knn" / "notes.txt").write_text("keep")
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nattempts:\n  - {name: knn, model: knn, image_size: 64, crop: null}\n")
    one_line_error(cli("-q", "experiment", "run", config, "--data", data, "--out", out, "--force"),
                   "is not an attempt folder written by defectscope")
    assert (out / "knn" / "notes.txt").read_text() == "keep"


def test_a_folder_defectscope_made_as_something_else_is_neither_replaced_nor_written_into(
        data: Path, knn_model: Path, tmp_path: Path, cli) -> None:
    dataset = tmp_path / "made"
    shutil.copytree(data, dataset)  # a demo dataset, marked as one
    before = snapshot(dataset)
    one_line_error(cli("export", "labels", data, "-o", dataset), "holds a demo dataset written by defectscope", "--force")
    one_line_error(cli("score", knn_model, data / "test" / "good", "--out", dataset), "holds a demo dataset")
    one_line_error(cli("evaluate", knn_model, data, "--out", dataset), "holds a demo dataset")
    assert snapshot(dataset) == before
    demo = tmp_path / "demo-output"
    assert cli("-q", "demo", "--data", data, "--out", demo, "--model", "knn").code == 0
    kept = snapshot(demo)
    one_line_error(cli("export", "labels", data, "-o", demo), "holds a demo output written by defectscope")
    assert snapshot(demo) == kept
    out = tmp_path / "experiment"
    out.mkdir()
    shutil.copytree(data, out / "knn")  # an attempt's name on a folder defectscope made as a dataset
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nattempts:\n  - {name: knn, model: knn, image_size: 64, crop: null}\n")
    one_line_error(cli("-q", "experiment", "run", config, "--data", data, "--out", out, "--force"),
                   "is not an attempt folder written by defectscope")
    assert snapshot(out / "knn") == before


# 5. Tiny inputs cannot claim unbounded memory -------------------------------------------------

def test_yaml_alias_bomb_is_refused(tmp_path: Path, cli) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 9)]
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(lines) + "\nattempts:\n  - {name: a, model: knn}\n")
    assert config.stat().st_size < 1000
    one_line_error(cli("experiment", "run", config, "--data", tmp_path), "aliases", "not allowed")


def test_a_file_is_read_into_a_buffer_of_its_size_not_of_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 1000)
    tracemalloc.start()
    try:
        assert read_regular(path, "file", 1 << 30) == b"x" * 1000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # not the 1 GB limit
    # a file that grew after its size was read is still read whole, and refused once above the limit
    real = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real(fd)[:6], 10, *real(fd)[7:])))
    assert read_regular(path, "file", 5000) == b"x" * 1000
    with pytest.raises(DefectscopeError, match="grew above the limit of 500 bytes"):
        read_regular(path, "file", 500)


def test_pixel_limit_from_the_header(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 50000, 50000)
    assert bomb.stat().st_size < 100
    with pytest.raises(DefectscopeError, match=r"bomb\.png is above the limit of 50,000,000 pixels"):
        read_image(bomb)
    medium = png_header_only(tmp_path / "medium.png", 10000, 8000)  # 80 MP: below Pillow's own limit, above ours
    with pytest.raises(DefectscopeError, match=r"medium\.png is 10000x8000 = 80,000,000 pixels, above the limit"):
        read_image(medium)
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's protection stays on for the rest of the process
    dataset = tmp_path / "set"
    (dataset / "good").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(dataset / "good" / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
    shutil.copy(bomb, dataset / "good" / "big.png")
    one_line_error(cli("data", "summary", dataset), "big.png", "above the limit")  # summary and fit agree
    one_line_error(cli("fit", dataset, "-o", tmp_path / "m.dsmodel", "--model", "knn"), "big.png", "above the limit")
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "50")
    with pytest.raises(DefectscopeError, match="above the limit of 50"):
        read_image(dataset / "good" / "0.png")


# 6. One bad image does not stop a batch --------------------------------------------------------

def test_every_readable_image_is_scored(knn_model: Path, data: Path, tmp_path: Path, cli,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good = data / "test" / "good" / "000.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = cli("-q", "predict", knn_model, good, broken, text, data / "test" / "broken" / "000.png", "--json")
    assert result.code == 3 and "2 of 4 image(s) could not be scored" in result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["verdict"] == "error" for r in rows] == [False, True, True, False]
    assert "truncated" in rows[1]["error"] or "corrupt" in rows[1]["error"]
    assert rows[0]["score"] is not None and rows[3]["score"] is not None
    from defectscope.cli import console
    monkeypatch.setattr(console, "width", 250)  # the table folds a long path: room for the temporary folder's whole
    table = cli("-q", "predict", knn_model, good, broken)
    assert table.code == 3 and "broken.png" in table.out and "error" in table.out


def test_odd_images_and_names_are_scored(knn_model: Path, tmp_path: Path, cli) -> None:
    odd = tmp_path / "odd ü\nname"
    odd.mkdir()
    cv2.imwrite(str(odd / "gray16.png"), (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    cv2.imwrite(str(odd / "one.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(odd / "rgba.png"), np.zeros((20, 30, 4), np.uint8))
    from PIL import Image
    Image.new("P", (16, 16)).save(odd / "palette.png")
    Image.new("LA", (16, 16)).save(odd / "gray-alpha.png")
    Image.new("CMYK", (16, 16)).save(odd / "cmyk.jpg")
    shutil.copy(odd / "one.png", odd / "png-named.jpg")  # content, not the suffix, decides
    (odd / "loop.png").symlink_to(odd / "loop.png")
    (odd / "sub").mkdir()
    (odd / "sub" / "up").symlink_to(odd, target_is_directory=True)  # a folder loop
    result = cli("-q", "predict", knn_model, odd, "--json")
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.out.splitlines())}
    assert result.code == 3 and rows["loop.png"]["verdict"] == "error"
    for name in ("gray16.png", "one.png", "rgba.png", "palette.png", "gray-alpha.png", "cmyk.jpg", "png-named.jpg"):
        assert rows[name]["verdict"] in ("good", "defective"), rows[name]
    assert any("\n" in r["path"] for r in rows.values())


# 7. Exports never mix runs or damage their input ------------------------------------------------

def test_exports_are_written_whole_and_checked_for_leaks(data: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "labels"
    assert cli("-q", "export", "labels", data, "--format", "yolo", "-o", out, "--seed", "1").code == 0
    assert cli("-q", "export", "labels", data, "--format", "yolo", "-o", out, "--seed", "2").code == 0
    assert cli("export", "check", out).code == 0  # no stale files of the first run
    manifest = json.loads((out / "export.json").read_text())
    listed = {f"images/{r['subset']}/{r['name']}" for r in manifest["images"]}
    present = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert present == listed and not list(tmp_path.glob(".labels.*"))
    stray = out / "images" / "val" / manifest["images"][0]["name"]
    shutil.copy(data / "test" / "good" / "000.png", stray if not stray.exists() else out / "images" / "val" / "extra.png")
    report = cli("export", "check", out)
    assert report.code == 1 and ("unlisted file" in report.err or "leak" in report.err)
    manifest["images"].append({**manifest["images"][0], "subset": "val" if manifest["images"][0]["subset"] == "train" else "train"})
    (out / "export.json").write_text(json.dumps(manifest))
    assert "leak:" in cli("export", "check", out).err


def test_exports_refuse_foreign_folders_and_the_dataset(data: Path, tmp_path: Path, cli) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.yaml").write_text("my own")
    one_line_error(cli("export", "labels", data, "--format", "yolo", "-o", mine), "not empty",
                   "--force to replace it: everything in it is deleted")  # what --force does, said before it is used
    assert (mine / "data.yaml").read_text() == "my own"
    copy = user_copy(data, tmp_path / "copy")
    before = snapshot(copy)
    one_line_error(cli("export", "labels", copy, "-o", copy / "labels"), "must not contain each other")
    assert snapshot(copy) == before and load_dataset(copy)
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(cli("export", "labels", data, "-o", afile), "not a folder")
    one_line_error(cli("export", "labels", data, "-o", tmp_path / "x", "--val-fraction", "1.5"), "val_fraction")
    one_line_error(cli("export", "labels", data, "-o", tmp_path / "x", "--val-fraction", "0.99"),  # was a traceback
                   "leaves none for training")
    assert not (tmp_path / "x").exists()


def test_export_of_a_tiny_plain_dataset(tmp_path: Path, cli) -> None:
    root = tmp_path / "tiny"
    for folder, count in (("good", 3), ("dent", 1)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(root / folder / f"{i}.png"), np.full((16, 16, 3), 40 * i, np.uint8))
    (root / "masks" / "dent").mkdir(parents=True)
    cv2.imwrite(str(root / "masks" / "dent" / "0.png"), np.pad(np.full((4, 4), 255, np.uint8), 6))
    result = cli("-q", "export", "labels", root, "--format", "coco", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert cli("export", "check", tmp_path / "out").code == 0


# 8. Heatmaps never overwrite each other -----------------------------------------------------------

def test_heatmap_names_are_unique_and_point_to_their_image(padim_model: Path, knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    for folder, source in (("a", "broken"), ("b", "contamination")):
        (tmp_path / folder / "good").mkdir(parents=True)
        shutil.copy(data / "test" / source / "000.png", tmp_path / folder / "good" / "000.png")
    result = cli("-q", "predict", padim_model, tmp_path / "a" / "good" / "000.png", tmp_path / "b" / "good" / "000.png",
                 "--json", "--heatmaps", tmp_path / "hm")
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert result.code == 0 and len({r["heatmap"] for r in rows}) == 2
    assert {Path(r["heatmap"]).name for r in rows} == {"a_good_000.png", "b_good_000.png"}
    for row in rows:
        assert Path(row["heatmap"]).name.startswith(Path(row["path"]).parts[-3])
    one_line_error(cli("predict", knn_model, data / "test" / "good", "--heatmaps", tmp_path / "hm2"), "makes no maps")
    assert not (tmp_path / "hm2").exists()


# 9. Damaged models and configs are one clear line -----------------------------------------------

@pytest.mark.parametrize("case,fragment", [
    ("no config", "'config' is missing"),
    ("partial calibration", "calibration is incomplete"),
    ("missing tensor", "lacks tensor"),
    ("wrong tensor", "do not fit"),
    ("version string", "not a whole number"),
    ("truncated", "truncated"),
    ("random bytes", "not a defectscope model file"),
    ("one bit of a tensor", "its tensors do not match the digest"),  # loaded, and scored with the changed value
])
def test_damaged_model_files(knn_model: Path, tmp_path: Path, cli, case: str, fragment: str) -> None:
    from safetensors.torch import load
    target = tmp_path / "damaged.dsmodel"
    tensors = load(knn_model.read_bytes())
    if case == "no config":
        rewrite_manifest(knn_model, target, lambda m: m.pop("config"))
    elif case == "partial calibration":
        rewrite_manifest(knn_model, target, lambda m: m["calibration"].pop("good_std"))
    elif case == "missing tensor":
        rewrite_manifest(knn_model, target, lambda m: None, {k: v for k, v in tensors.items() if k != "bank"})
    elif case == "wrong tensor":
        rewrite_manifest(knn_model, target, lambda m: None, {**tensors, "bank": torch.zeros(3)})
    elif case == "version string":
        rewrite_manifest(knn_model, target, lambda m: m.update(format_version="1.0"))
    elif case == "truncated":
        target.write_bytes(knn_model.read_bytes()[:-100])
    elif case == "one bit of a tensor":
        data = bytearray(knn_model.read_bytes())
        data[-len(data) // 3] ^= 1  # among the memory's float32s: still a finite number, a little off
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(np.random.default_rng(0).bytes(5000))
    one_line_error(cli("predict", target, knn_model), fragment)
    if case in ("truncated", "random bytes", "version string", "one bit of a tensor"):
        one_line_error(cli("info", target), fragment)


def test_pickled_model_never_runs_its_code(tmp_path: Path, cli) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = tmp_path / "evil.dsmodel"
    evil.write_bytes(pickle.dumps(Payload()))
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    for path in (evil, tmp_path / "evil.pt"):
        one_line_error(cli("predict", path, path), "not a defectscope model file")
        one_line_error(cli("info", path), "not a defectscope model file")
    assert not marker.exists()


def test_info_on_a_folder(tmp_path: Path, cli) -> None:
    one_line_error(cli("info", tmp_path), "is a folder")


@pytest.mark.parametrize("attempt,fragment", [
    ("{name: a, model: knn, neighbours: -1}", "field 'neighbours' must be in [1, inf]"),
    ("{name: a, model: patchcore, coreset_ratio: 2}", "field 'coreset_ratio' must be in (0, 1]"),
    ("{name: a, model: padim, image_size: 64, crop: 96}", "field 'crop' must be in [16, 64]"),
    ("{name: a, model: patchcore, threshold_method: magic}", "field 'threshold_method' must be one of"),
    ("{name: a, model: pca, calibration_folds: 1}", "field 'calibration_folds' must be in [2, inf]"),
    ("{name: a, model: knn, threshold_param: 1.5}", "field 'threshold_param' must be in (0, 1)"),
    ("{name: a, model: autoencoder, lr: .nan}", "field 'lr' must be a finite number"),
    ("{name: a, model: classifier, dropout: 1.0}", "field 'dropout'"),
])
def test_config_values_are_checked_before_anything_runs(tmp_path: Path, cli, attempt: str, fragment: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"attempts:\n  - {attempt}\n")
    one_line_error(cli("experiment", "run", config, "--data", tmp_path / "nowhere"), "attempt 'a'", fragment)


def test_deep_inheritance_and_loops(tmp_path: Path) -> None:
    chain = ["  - {name: a0, model: knn}"] + [f"  - {{name: a{i}, base: a{i - 1}}}" for i in range(1, 1500)]
    config = tmp_path / "deep.yaml"
    config.write_text("attempts:\n" + "\n".join(chain) + "\n")
    experiment = load_experiment(config)
    assert len(experiment.attempts) == 1500 and experiment.attempts[-1].model == "knn"
    config.write_text("attempts:\n  - {name: a, base: b, model: knn}\n  - {name: b, base: a}\n")
    with pytest.raises(DefectscopeError, match="chain loops"):
        load_experiment(config)


# 10. A threshold on too few images says so --------------------------------------------------------

def test_weak_calibration_is_announced(tmp_path: Path, cli) -> None:
    data = make_demo_dataset(tmp_path / "ten", size=64, train=10, test_good=2, per_defect=1, seed=1)
    result = cli("-q", "fit", data, "-o", tmp_path / "m.dsmodel", "--model", "knn", "--image-size", "64", "--crop", "0")
    assert result.code == 0 and "warning:" in result.err and "at least 20" in result.err
    calibration = model_info(tmp_path / "m.dsmodel")["calibration"]
    assert calibration["good_count"] == 10 and "at least 20" in calibration["warning"]


# 11. Leftovers, library noise -------------------------------------------------------------------

def test_interrupted_writes_leave_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "model.dsmodel"
    (tmp_path / f".{target.name}.abc123.tmp").write_bytes(b"half a model")  # an earlier write killed mid-way
    write_atomic(target, b"whole")
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["model.dsmodel"]


def test_a_name_as_long_as_allowed_is_written_and_its_heatmap_named(tmp_path: Path, padim_model: Path, data: Path,
                                                                    cli) -> None:
    """A 248-byte output name failed with 'File name too long' ('.NAME.' plus mkstemp's part passed 255 bytes), and
    so did a heatmap named after a long image name; an interrupted write of such a name is still cleared."""
    from defectscope import files

    target = tmp_path / ("c" * 240 + ".dsmodel")
    write_atomic(target, b"half")
    stale = tmp_path / f"{files.temporary_prefix(target)}abc12345{files.TEMP_SUFFIX}"
    stale.write_bytes(b"half a model")  # an earlier write killed mid-way
    write_atomic(target, b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == [target.name]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((data / "test" / "good").iterdir()), images / ("é" * 120 + ".png"))  # 244 bytes
    assert cli("-q", "predict", padim_model, images, "--heatmaps", tmp_path / "heat").code == 0
    (heatmap,) = [p for p in (tmp_path / "heat").iterdir() if not p.name.startswith(".")]  # beside our marker
    assert len(os.fsencode(heatmap.name)) <= 255 and heatmap.name.startswith("images_éé") and heatmap.suffix == ".png"


def test_sigterm_during_a_fit_leaves_no_temporary_file(data: Path, tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from defectscope import files\n"
        "original = files.os.replace\n"
        "def slow_replace(a, b):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    original(a, b)\n"
        "files.os.replace = slow_replace\n"
        "from defectscope.cli import main\n"
        f"sys.argv = ['defectscope', '-q', 'fit', {str(data)!r}, '-o', {str(tmp_path / 'm.dsmodel')!r}, '--model', 'knn',"
        " '--image-size', '64', '--crop', '0']\n"
        "main()\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 128 + 15, process.stderr
    assert list(tmp_path.iterdir()) == []


def test_decoder_warnings_do_not_leak(tmp_path: Path) -> None:
    ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (tmp_path / "cut.png").write_bytes(cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()[:60])
    script = ("from defectscope.data.decode import read_image\n"
              f"for name in ('cut.jpg', 'cut.png'):\n"
              f"    try: read_image({str(tmp_path)!r} + '/' + name)\n"
              "    except Exception as e: print(type(e).__name__)\n")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "[ WARN" not in process.stderr and "libpng" not in process.stderr, process.stderr


# Round 2: the new commands, the runtime ------------------------------------------------------------

def test_export_replaces_only_files_it_wrote(knn_model: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    folder = tmp_path / "d"
    assert cli("export", "model", knn_model, "-o", folder / "knn.dsdeploy").code == 0
    (folder / "knn.xml").write_text("<mine/>")
    (folder / "knn.bin").write_bytes(b"mine")
    one_line_error(cli("export", "model", knn_model, "-o", folder / "knn.dsdeploy", "--format", "openvino"),
                   "not written by defectscope")
    assert (folder / "knn.xml").read_text() == "<mine/>" and (folder / "knn.bin").read_bytes() == b"mine"
    (folder / "knn.xml").unlink()
    (folder / "knn.bin").unlink()
    assert cli("export", "model", knn_model, "-o", folder / "knn.dsdeploy", "--format", "openvino").code == 0
    assert not (folder / "knn.onnx").exists()  # the earlier export's graph, replaced by this one's
    source = tmp_path / "m.onnx"
    source.write_bytes(knn_model.read_bytes())
    one_line_error(cli("export", "model", source, "-o", tmp_path / "m.dsdeploy"), "overwrite its source model")
    assert source.read_bytes() == knn_model.read_bytes()


def _deployment_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def test_every_file_of_a_deployment_is_hashed(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("openvino")
    from defectscope.runtime import DeployedModel, main as runtime_main
    out = tmp_path / "ov" / "knn.dsdeploy"
    assert cli("export", "model", knn_model, "-o", out, "--format", "openvino").code == 0
    weights = out.with_suffix(".bin")
    original = weights.read_bytes()
    values = np.frombuffer(original, np.float32).copy()
    values[-len(values) // 4 :] *= 0.5
    weights.write_bytes(values.tobytes())
    with pytest.raises(DefectscopeError, match="does not match"):
        DeployedModel(out)
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(DefectscopeError, match="does not match"):
        DeployedModel(out)
    weights.unlink()
    with pytest.raises(DefectscopeError, match="missing"):
        DeployedModel(out)
    weights.write_bytes(original)
    DeployedModel(out)
    header, rest = _deployment_header(out)
    edited = header["__metadata__"]["defectscope"].replace('"threshold": ', '"threshold": 1', 1)
    assert edited != header["__metadata__"]["defectscope"]
    header["__metadata__"]["defectscope"] = edited
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + rest)
    with pytest.raises(DefectscopeError, match="altered"):
        DeployedModel(out)
    assert runtime_main([str(out), str(data / "test" / "good")]) == 2


@pytest.mark.parametrize("field,value,fragment", [
    ("batch_size", 0, "batch size"), ("batch_size", "x", "batch size"), ("batch_size", 0.5, "batch size"),
    ("threshold", "1.5", "threshold"), ("files", "knn.onnx", "graph files"),
    ("files", [{"file": "../knn.onnx", "sha256": "0"}], "plain"),
])
def test_deployment_manifest_fields_are_checked(knn_model: Path, tmp_path: Path, field: str, value, fragment: str) -> None:
    pytest.importorskip("onnxruntime")
    from defectscope.deployment import export_model
    from defectscope.manifests import header_metadata
    from defectscope.runtime import DeployedModel
    out = tmp_path / "knn.dsdeploy"
    export_model(knn_model, out)
    header, rest = _deployment_header(out)
    manifest = json.loads(header["__metadata__"]["defectscope"])
    section = {"files": manifest["graph"], "batch_size": manifest["model"]["config"],
               "threshold": manifest["model"]["calibration"]}[field]
    section[field] = value
    header["__metadata__"] = header_metadata(manifest)  # a well-formed file with a bad value, not a hand edit
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + rest)
    with pytest.raises(DefectscopeError, match=fragment):
        DeployedModel(out)


def test_deep_manifests_and_bad_threshold_types_are_one_line_errors(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    deep = tmp_path / "deep.dsmodel"
    header = b'{"__metadata__": {"defectscope": "' + b"[" * 100_000 + b"]" * 100_000 + b'"}}'
    deep.write_bytes(struct.pack("<Q", len(header)) + header)
    one_line_error(cli("info", deep), "nested deeper")
    one_line_error(cli("predict", deep, data / "test" / "good"), "nested deeper")
    one_line_error(cli("fit", data, "-o", deep, "--model", "knn"), "not written by defectscope")
    assert deep.stat().st_size == len(header) + 8
    def string_threshold(manifest: dict) -> None:
        manifest["calibration"]["threshold"] = "20.5"
    one_line_error(cli("predict", rewrite_manifest(knn_model, tmp_path / "s.dsmodel", string_threshold), data), "threshold")
    one_line_error(cli("info", rewrite_manifest(knn_model, tmp_path / "edited.dsmodel", string_threshold, digest=False)),
                   "altered")


def _plan(tmp_path: Path, data: Path, products: str) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{model: knn, settings: {{image_size: 64, crop: null}}}}\nproducts:\n{products}")
    (tmp_path / "sub").mkdir(exist_ok=True)
    return plan


def test_fit_many_compares_resolved_paths(data: Path, tmp_path: Path, cli) -> None:
    plan = _plan(tmp_path, data, f"  - {{name: a, data: {data}, out: a.dsmodel}}\n"
                                 f"  - {{name: b, data: {data}, out: sub/../a.dsmodel}}\n")
    one_line_error(cli("fit-many", plan), "share the out")
    assert not (tmp_path / "a.dsmodel").exists()
    plan = _plan(tmp_path, data, f"  - {{name: a, data: {data}, out: {data}/train/a.dsmodel}}\n")
    one_line_error(cli("fit-many", plan), "inside the data folder")
    plan = _plan(tmp_path, data, f"  - {{name: a, data: {data}, out: a.png}}\n")
    one_line_error(cli("fit-many", plan), "ending in .dsmodel", "'a.png'")


def test_fit_many_checks_an_up_to_date_model_whole(data: Path, tmp_path: Path, cli) -> None:
    plan = _plan(tmp_path, data, f"  - {{name: one, data: {data}}}\n")
    assert cli("fit-many", plan).code == 0
    model = tmp_path / "models" / "one.dsmodel"
    assert "up to date" in cli("fit-many", plan).out
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    result = cli("fit-many", plan)
    assert result.code == 0 and "fitted" in result.out
    load_model(model)


def test_fit_many_says_an_input_error_failed_at_once(data: Path, tmp_path: Path, cli) -> None:
    plan = _plan(tmp_path, data, f"  - {{name: one, data: {data}}}\n  - {{name: gone, data: {tmp_path / 'gone'}}}\n")
    result = cli("fit-many", plan)
    assert result.code == 3  # the table (its cells wrapped to the terminal) names the missing folder
    assert "1 of 2 product(s) failed (an input error at once, any other failure after 2 retries)" in result.err


def test_calibrate_refuses_images_labelled_both_ways(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    goods = data / "test" / "good"
    one_line_error(cli("calibrate", knn_model, "--good", goods, "--defective", goods, "--f1", "-o", tmp_path / "c.dsmodel"),
                   "both as good and as defective")
    assert not (tmp_path / "c.dsmodel").exists()


def test_stated_rates_lie_inside_their_intervals() -> None:
    from defectscope.thresholds import calibrate, labelled_calibration
    labelled = labelled_calibration(np.array([1.0]), np.array([3.0, 4.0]), 2.0, "manual", 2.0, None)
    low, high = labelled.false_alarm_interval
    assert labelled.false_alarm_rate == 0.0 and low <= 0.0 <= high
    low, high = labelled.recall_interval
    assert labelled.recall == 1.0 and low <= 1.0 <= high
    for scores in (np.full(30, 20.18), 20.18 + np.arange(30) * 1e-9):
        flat = calibrate(scores, "false_alarm_rate", 0.01)
        low, high = flat.false_alarm_interval
        assert "spread" in flat.warning and low <= flat.false_alarm_rate <= high and flat.threshold > scores.max()


def test_undefined_precision_and_recall_are_not_zero() -> None:
    from defectscope.evaluation import _decisions
    from defectscope.reports import metrics_markdown
    decisions = _decisions(np.zeros(5), np.array([1.0, 2, 3, 4, 5]), 10.0)
    assert decisions["precision"] is None and decisions["recall"] is None and decisions["f1"] is None
    text = metrics_markdown({"images": 5, "per_defect": {}, "notes": [], "at_model_threshold": decisions})
    assert "precision n/a, recall n/a, F1 n/a" in text


def test_score_fails_loudly_and_leaves_no_job_for_a_bad_model(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("pyarrow")
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shutil.copy(next((data / "test" / "good").iterdir()), tmp_path / "in" / "fine.png")
    out = tmp_path / "scores"
    result = cli("score", knn_model, tmp_path / "in", "--out", out)
    assert result.code == 3 and "1 of 2 images could not be scored" in result.err
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing here\n")
    one_line_error(cli("score", knn_model, listing, "--out", tmp_path / "none"), "no images")
    bad_model = tmp_path / "bad.dsmodel"
    bad_model.write_bytes(b"not a model")
    one_line_error(cli("score", bad_model, tmp_path / "in", "--out", tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    for sizing in (["--workers", "4"], ["--threads", "1"]):  # they size Ray actors: without --ray they would do nothing
        one_line_error(cli("score", knn_model, tmp_path / "in", "--out", tmp_path / "refused", *sizing), "with --ray only")
    assert not (tmp_path / "refused").exists()
    assert cli("score", knn_model, tmp_path / "in", "--out", tmp_path / "refused").code == 3


def test_a_score_job_reads_only_its_part_files_and_scores_a_damaged_one_again(knn_model: Path, data: Path,
                                                                                tmp_path: Path, cli) -> None:
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "scores"
    assert cli("-q", "score", knn_model, data / "test" / "good", "--out", out).code == 0
    part = out / "part-000000.parquet"
    rows = pyarrow_parquet.read_table(part).to_pydict()
    (out / "notes.png").write_bytes(b"a file of the user's, not Parquet")
    part.write_bytes(b"damaged")
    result = cli("score", knn_model, data / "test" / "good", "--out", out)
    assert result.code == 0, result.err
    assert pyarrow_parquet.read_table(part).to_pydict() == rows
    assert (out / "notes.png").read_bytes() == b"a file of the user's, not Parquet"


def test_a_folder_in_use_by_a_score_job_is_refused_even_with_force(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("pyarrow")
    import fcntl
    out = tmp_path / "scores"
    assert cli("score", knn_model, data / "test" / "good", "--out", out).code == 0
    before = snapshot(out)
    with open(out / ".lock", "w") as held:  # a running job holds this lock
        fcntl.flock(held, fcntl.LOCK_EX)
        one_line_error(cli("score", knn_model, data / "test", "--out", out, "--force"), "another score job")
    assert snapshot(out) == before


def test_a_fifo_is_refused_without_waiting(knn_model: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    with pytest.raises(DefectscopeError, match="not a regular file"):
        read_image(fifo)
    command = [str(Path(sys.executable).with_name("defectscope")), "predict", str(knn_model), str(fifo), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # hung before: needed SIGKILL
    assert result.returncode == 3 and "not a regular file" in json.loads(result.stdout.splitlines()[0])["error"]
    other = tmp_path / "other.png"
    other.write_bytes(b"not scored: the FIFO is refused first")
    for labelled in (["--good", fifo, "--defective", other], ["--good", other, "--defective", fifo]):
        command = [str(Path(sys.executable).with_name("defectscope")), "calibrate", str(knn_model), "--f1",
                   *map(str, labelled), "-o", str(tmp_path / "out.dsmodel")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # hung before (its sha256)
        assert result.returncode == 2 and "not a regular file" in result.stderr
    assert not (tmp_path / "out.dsmodel").exists()


def test_a_folder_s_files_are_each_scored_or_named(knn_model: Path, data: Path, tmp_path: Path, cli) -> None:
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "line"
    folder.mkdir()
    shutil.copy(data / "test" / "good" / "000.png", folder / "part.png")
    os.mkfifo(folder / "pipe.png")  # named as an image: one error row, never dropped unseen
    shutil.copy(data / "test" / "good" / "001.png", folder / "part.gif")  # not named as an image we read: named
    (folder / "notes.txt").write_text("shift notes")
    predicted = cli("-q", "predict", knn_model, folder, "--json")
    rows = {Path(row["path"]).name: row for row in map(json.loads, predicted.out.splitlines())}
    assert predicted.code == 3 and set(rows) == {"part.png", "pipe.png"} and rows["pipe.png"]["verdict"] == "error"
    assert "skipped 2 file(s)" in predicted.err and "part.gif" in predicted.err and "notes.txt" in predicted.err
    scored = cli("-q", "score", knn_model, folder, "-o", tmp_path / "scores")
    table = pyarrow_parquet.read_table(tmp_path / "scores").to_pylist()
    assert scored.code == 3 and sorted(Path(row["path"]).name for row in table) == ["part.png", "pipe.png"]
    assert "skipped 2 file(s)" in scored.err and "part.gif" in scored.err


def test_a_ray_address_where_nothing_answers_is_said_at_once(knn_model: Path, data: Path, tmp_path: Path) -> None:
    import socket

    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    defectscope = str(Path(sys.executable).with_name("defectscope"))
    for command in (["score", knn_model, data / "test" / "good", "-o", tmp_path / "scores"],
                    ["fit", data, "-o", tmp_path / "m.dsmodel", "--image-size", "64", "--crop", "0"],
                    ["fit-many", _plan(tmp_path, data, f"  - {{name: one, data: {data}}}\n")]):
        result = subprocess.run([defectscope, "-q", *map(str, command), "--ray", address], capture_output=True,
                                text=True, timeout=120)  # Ray itself retried for minutes, logging all along
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"cannot connect to the Ray cluster at {address}: nothing answers there" in result.stderr
    assert not (tmp_path / "scores").exists() and not (tmp_path / "m.dsmodel").exists()
    assert not (tmp_path / "models").exists()


def test_image_files_are_bounded_before_they_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.data.decode import max_file_bytes
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "10000")
    sparse = png_header_only(tmp_path / "x.png", 50, 50)
    with open(sparse, "r+b") as handle:
        handle.truncate(max_file_bytes() + 1)  # sparse: no disk used, but reading it whole would take the memory
    with pytest.raises(DefectscopeError, match="above the limit"):
        read_image(sparse)
    bomb = png_header_only(tmp_path / "bomb.png", 1000, 1000)
    with pytest.raises(DefectscopeError, match="above the limit of 10,000"):
        read_image(bomb)


def test_file_names_that_are_not_utf8_are_evaluated_scored_and_reported(served_folder: Path, demo_root: Path,
                                                                        tmp_path: Path, cli) -> None:
    """Latin-1 names (a camera's, a Windows share's) crashed `evaluate` (the report's texts and the gallery's
    captions) and `score` (Parquet strings are UTF-8). Now such names are written with those bytes spelled \\xNN."""
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    for path in [*data.glob("test/*/*.png"), *data.glob("ground_truth/*/*.png")]:
        path.rename(path.with_name(os.fsdecode(b"\xfc" + os.fsencode(path.name))))
    model = served_folder / "part.dsmodel"
    evaluated = cli("evaluate", model, data, "-o", tmp_path / "report")
    assert evaluated.code == 0, evaluated.err
    shown = (tmp_path / "report" / "predictions.csv").read_text(encoding="utf-8")
    assert shown.count("/\\xfc") == len(list(data.glob("test/*/*.png"))) > 0
    assert (tmp_path / "report" / "gallery.png").is_file()
    scored = cli("score", model, data / "test" / "good", "-o", tmp_path / "scored")
    assert scored.code == 0, scored.err
    paths = pq.read_table(tmp_path / "scored").column("path").to_pylist()
    assert len(paths) == len(list(data.glob("test/good/*.png"))) and all("/\\xfc" in path for path in paths)


def test_the_service_answers_for_models_and_labelled_images_with_names_that_are_not_utf8(
        served_folder: Path, demo_root: Path, tmp_path: Path, cli) -> None:
    """A model taught a Latin-1-named image, and labelled images of such names: their manifest and scores were a 500."""
    from fastapi.testclient import TestClient

    from defectscope.service.app import create_app
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import load_served

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    for path in [*data.glob("test/*/*.png"), *data.glob("ground_truth/*/*.png")]:
        path.rename(path.with_name(os.fsdecode(b"\xfc" + os.fsencode(path.name))))
    (tmp_path / "models").mkdir()
    taught = cli("update", served_folder / "part.dsmodel", "--good", data / "test" / "good", "-o",
                 tmp_path / "models" / "part.dsmodel")
    assert taught.code == 0, taught.err
    app = create_app(load_served([tmp_path / "models"], labelled=data), ServiceConfig(), data)
    with TestClient(app) as client:
        manifest = client.get("/v1/models/part")
        assert manifest.status_code == 200 and "\\xfc" in json.dumps(manifest.json()["train_summary"]["taught"])
        labelled = client.get("/v1/models/part/labelled")
        assert labelled.status_code == 200 and all(i["name"].startswith("\\xfc") for i in labelled.json()["images"])


def test_a_write_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch, cli,
                                                                      served_folder: Path) -> None:
    """"No space left on device" alone, with no file named, was all `fit -o` said on a full disk."""
    import errno

    from defectscope import files

    def full_disk(_handle: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full_disk)
    (tmp_path / "model.dsmodel").write_bytes(b"kept as it was")
    with pytest.raises(DefectscopeError, match=r"cannot write .*model.dsmodel: No space left on device"):
        write_atomic(tmp_path / "model.dsmodel", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["model.dsmodel"] and (tmp_path / "model.dsmodel").read_bytes() == (
        b"kept as it was")
    refused = cli("calibrate", served_folder / "part.dsmodel", "--false-alarm-rate", "0.05", "-o", tmp_path / "new.dsmodel")
    assert refused.code == 2 and refused.err.startswith(f"error: cannot write {tmp_path / 'new.dsmodel'}: No space")
    assert not (tmp_path / "new.dsmodel").exists()
