"""Images kept for review: only the chosen verdicts, once per content, under a size cap (oldest first), found again
through the audit trail, also by the service."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectscope.artifacts import load_model, set_threshold
from defectscope.errors import InputError
from defectscope.line.retention import ImageKeeper


def test_only_chosen_verdicts_are_kept_once_under_the_cap(tmp_path: Path) -> None:
    keeper = ImageKeeper(tmp_path / "kept", frozenset({"defective", "error"}), max_bytes=250)
    images = [bytes([i]) * 100 for i in range(4)]
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    assert keeper.keep(images[0], digests[0], "good", "a.png") is None
    first = keeper.keep(images[1], digests[1], "defective", "b.PNG")
    assert first == tmp_path / "kept" / "defective" / f"{digests[1]}.png" and first.read_bytes() == images[1]
    assert keeper.keep(images[1], digests[1], "defective", "again.png") == first  # one file per content
    os.utime(first, ns=(1, 1))  # the oldest
    keeper.keep(images[2], digests[2], "error", "c.bmp")
    keeper.keep(images[3], digests[3], "defective", "d.exe")  # 300 bytes kept: the oldest goes
    assert not first.exists() and keeper.find(digests[1], "defective") is None
    assert keeper.find(digests[3], "defective").suffix == ".img" and keeper.find(digests[2], "error").is_file()
    assert keeper.find(digests[3], "good") is None
    again = ImageKeeper(tmp_path / "kept", frozenset({"defective"}), max_bytes=150)  # a restart counts what is there
    assert again.find(digests[2], "error") is None and again.find(digests[3], "defective") is not None
    with pytest.raises(InputError, match="verdicts"):
        ImageKeeper(tmp_path / "k2", frozenset({"scrap"}), 100)


def test_an_image_seen_again_is_kept_longest_and_a_changed_file_is_never_passed_off(tmp_path: Path) -> None:
    """The cap removes the image least recently seen, not the one first kept; a kept file removed on disk is written
    again when its image comes back, and one whose bytes changed is not read as the audited image."""
    keeper = ImageKeeper(tmp_path / "kept", frozenset({"defective"}), max_bytes=250)
    images = [bytes([i]) * 100 for i in range(3)]
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    first = keeper.keep(images[0], digests[0], "defective", "a.png")
    second = keeper.keep(images[1], digests[1], "defective", "b.png")
    os.utime(first, ns=(1, 1))
    os.utime(second, ns=(2, 2))
    keeper.keep(images[0], digests[0], "defective", "a-again.png")  # seen again: the latest evidence of a verdict
    os.utime(keeper.keep(images[2], digests[2], "defective", "c.png"), ns=(3, 3))
    assert first.is_file() and not second.exists() and keeper.find(digests[1], "defective") is None
    assert ImageKeeper(tmp_path / "kept", frozenset({"defective"}), max_bytes=100).find(digests[0], "defective") \
        == first  # a restart, which orders by time, keeps the image seen last too
    keeper = ImageKeeper(tmp_path / "kept", frozenset({"defective"}), max_bytes=250)
    first.unlink()  # removed by hand
    assert keeper.find(digests[0], "defective") is None and keeper.read(digests[0], "defective") is None
    assert keeper.keep(images[0], digests[0], "defective", "a.png") == first and first.read_bytes() == images[0]
    assert keeper.read(digests[0], "defective") == (first, images[0])
    first.write_bytes(bytes([9]) * 100)  # the same size, other bytes
    assert keeper.read(digests[0], "defective") is None and keeper.find(digests[0], "defective") is None
    assert keeper.keep(images[0], digests[0], "defective", "a.png") == first and first.read_bytes() == images[0]


def test_a_folder_with_other_files_loses_none_of_them(tmp_path: Path) -> None:
    theirs = [tmp_path / "photos" / "defective" / "holiday.png", tmp_path / "photos" / "good" / ("a" * 64 + ".txt")]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 500)
    keeper = ImageKeeper(tmp_path / "photos", frozenset({"defective"}), max_bytes=150)  # far below what is there
    data = b"y" * 100
    keeper.keep(data, hashlib.sha256(data).hexdigest(), "defective", "new.png")
    other = b"z" * 100
    keeper.keep(other, hashlib.sha256(other).hexdigest(), "defective", "newer.png")  # the cap prunes our own only
    assert all(path.read_bytes() == b"x" * 500 for path in theirs)
    assert keeper.find(hashlib.sha256(data).hexdigest(), "defective") is None


def test_the_service_keeps_defective_images_and_serves_them_by_audit_id(served_folder: Path, demo_root: Path,
                                                                       tmp_path: Path) -> None:
    """A kept image comes back by audit id with the heatmap behind its verdict (the inspect's own), while the version
    that judged it is served; once another version is served, its map is refused rather than passed off."""
    from fastapi.testclient import TestClient

    from defectscope import load_dataset
    from defectscope.line.audit import AuditLog
    from defectscope.service.app import create_app
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import load_served

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(served_folder / "part.dsmodel", folder / "part.dsmodel")
    keeper = ImageKeeper(tmp_path / "kept", frozenset({"defective"}), 1 << 30)
    app = create_app(load_served([folder]), ServiceConfig(), None, AuditLog(tmp_path / "audit.sqlite"), keeper=keeper)
    test = load_dataset(demo_root).test
    paths = [s.path for s in test if s.label == 1][:2] + [s.path for s in test if s.label == 0][:1]
    with TestClient(app) as client:
        results = client.post("/v1/models/part/inspect?heatmap=true", files=[("files", (p.name, p.read_bytes(), "image/png"))
                                                                 for p in paths]).json()["results"]
        page = client.get("/v1/audit").json()
        defective = [r for r in results if r["verdict"] == "defective"]
        assert defective and sorted(page["kept"]) == sorted(r["audit_id"] for r in defective)
        for result in results:
            image = client.get(f"/v1/audit/{result['audit_id']}/image")
            if result["verdict"] == "defective":
                assert image.status_code == 200 and image.content == paths[result["index"]].read_bytes()
                assert image.headers["content-type"] == "image/png"
                heat = client.get(f"/v1/audit/{result['audit_id']}/heatmap")
                assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
                assert same_colours(png_pixels(heat.content), png_pixels(base64.b64decode(result["heatmap_png"])))
            else:
                assert image.status_code == 404 and "not kept" in image.json()["detail"]
                assert client.get(f"/v1/audit/{result['audit_id']}/heatmap").status_code == 404
        assert client.get("/v1/audit/999999/image").status_code == 404
        assert client.get(f"/v1/audit/{2**63}/image").status_code == 422  # no id of SQLite's: refused by its bound
        calibration = load_model(folder / "part.dsmodel").calibration
        set_threshold(folder / "part.dsmodel", replace(calibration, threshold=calibration.threshold * 1.5), force=True)
        assert client.post("/v1/models/part/reload").status_code == 200  # another version of part is served now
        refused = client.get(f"/v1/audit/{defective[0]['audit_id']}/heatmap")
        assert refused.status_code == 409 and "was judged by version" in refused.json()["detail"]
        kept = keeper.find(hashlib.sha256(paths[defective[0]["index"]].read_bytes()).hexdigest(), "defective")
        kept.write_bytes(paths[-1].read_bytes())  # a good part's photo under its name
        for view in ("image", "heatmap"):  # neither the photo nor its map is passed off as the audited part's
            changed = client.get(f"/v1/audit/{defective[0]['audit_id']}/{view}")
            assert changed.status_code == 404 and "changed on disk" in changed.json()["detail"]
        assert defective[0]["audit_id"] not in client.get("/v1/audit").json()["kept"]


def png_pixels(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def same_colours(first: np.ndarray, second: np.ndarray) -> bool:
    """Two colourings of one map: an image scored alone and in a batch differ in the last bits of its scores, which
    moves a few pixels by a step of the colour scale, never more."""
    step = np.abs(first.astype(int) - second.astype(int))
    return first.shape == second.shape and step.max() <= 8 and (step.max(axis=-1) > 0).mean() < 0.01


def test_serve_refuses_kept_images_without_an_audit_trail(served_folder: Path, tmp_path: Path, cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.service import listener

    monkeypatch.setattr(listener, "serve_on", lambda *_args: None)  # a refusal that is not made returns 0
    refused = cli("serve", "--port", 0, served_folder / "part.dsmodel", "--no-audit", "--keep-images", tmp_path / "kept")
    assert refused.code == 2 and "audit trail" in refused.err and not (tmp_path / "kept").exists()
    for cap in ("nan", "inf", "0"):  # no size cap at all is no cap: refused before anything is written
        capless = cli("serve", "--port", 0, served_folder / "part.dsmodel", "--audit", tmp_path / "audit.sqlite", "--keep-images",
                      tmp_path / "kept", "--keep-images-mb", cap)
        assert capless.code == 2 and capless.err.startswith("error: field 'keep_images_mb' must be") and not (
            tmp_path / "audit.sqlite").exists() and not (tmp_path / "kept").exists()
    unknown = cli("serve", "--port", 0, served_folder / "part.dsmodel", "--audit", tmp_path / "audit.sqlite", "--keep-images",
                  tmp_path / "kept", "--keep-verdicts", "defective,scratched")
    assert unknown.code == 2 and "got scratched" in unknown.err
    for stray in (["--keep-verdicts", "good"], ["--keep-images-mb", "10"]):  # no --keep-images: they would do nothing
        ignored = cli("serve", "--port", 0, served_folder / "part.dsmodel", "--audit", tmp_path / "audit.sqlite", *stray)
        assert ignored.code == 2 and "apply with --keep-images only" in ignored.err
    topic = cli("serve", "--port", 0, served_folder / "part.dsmodel", "--audit", tmp_path / "audit.sqlite", "--mqtt-topic", "plant/a")
    assert topic.code == 2 and topic.err.strip() == "error: --mqtt-topic applies with --mqtt only"
    assert not (tmp_path / "audit.sqlite").exists() and not (tmp_path / "kept").exists()
