"""The inspection service: every endpoint, every error code, dynamic batching, and the OpenAPI contract."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectscope import load_dataset
from defectscope.artifacts import load_model, set_threshold
from defectscope.data.decode import read_image
from defectscope.service.app import create_app
from defectscope.service.batching import Batcher
from defectscope.errors import SettingsError
from defectscope.service.config import ServiceConfig
from defectscope.service.models import load_served
from defectscope.calibration import Calibration


@pytest.fixture(scope="module")
def model_folder(served_folder: Path) -> Path:
    return served_folder


def make_client(folder: Path, labelled: Path | None = None, **config) -> TestClient:
    settings = ServiceConfig.from_dict(config)
    served = load_served([folder], settings, labelled)
    return TestClient(create_app(served, settings, labelled))


@pytest.fixture(scope="module")
def client(model_folder: Path, demo_root: Path) -> TestClient:
    with make_client(model_folder, demo_root) as client:
        yield client


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def samples(demo_root: Path, label: int, count: int) -> list[Path]:
    return [s.path for s in load_dataset(demo_root).test if s.label == label][:count]


def test_health_models_and_manifest(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["part"] and models[0]["detector"] == "patchcore"
    assert models[0]["labelled_images"] == 34
    manifest = client.get("/v1/models/part").json()
    assert manifest["detector"] == "patchcore" and manifest["calibration"]["threshold"] == models[0]["threshold"]
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and "no model named" in missing.json()["detail"]


def test_inspect_matches_the_library_with_heatmaps_and_regions(client: TestClient, model_folder: Path, demo_root: Path) -> None:
    paths = samples(demo_root, 0, 2) + samples(demo_root, 1, 3)
    body = client.post("/v1/models/part/inspect?heatmap=true&regions=true", files=upload(*paths)).json()
    expected = load_model(model_folder / "part.dsmodel").predict(paths)
    scores = np.array([r["score"] for r in body["results"]])
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5)
    assert [r["verdict"] for r in body["results"]] == expected.verdicts
    assert [r["name"] for r in body["results"]] == [p.name for p in paths]
    for result, path in zip(body["results"], paths):
        heat = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
        assert heat.size == Image.open(path).size
        assert result["normalized"] == pytest.approx(result["score"] / body["threshold"])
        for region in result["regions"]:
            x, y, w, h = region["box"]
            assert 0 <= x and 0 <= y and x + w <= heat.size[0] and y + h <= heat.size[1] and region["score"] >= 1.0
    flagged = [r for r in body["results"] if r["verdict"] == "defective"]
    # regions come from the smoothed map, the verdict from the largest patch distance: a flagged part whose smoothed
    # map stays under the threshold shows no region, but a good one never shows any
    assert any(r["regions"] for r in flagged) and not any(r["regions"] for r in body["results"] if r["verdict"] == "good")


def test_regions_come_from_the_maps_own_level_and_only_on_parts_judged_defective(model_folder: Path, demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    """A map level below every pixel: a part judged defective is one region, a part judged good still none."""
    model = load_model(model_folder / "part.dsmodel")
    (tmp_path / "served").mkdir()
    set_threshold(model_folder / "part.dsmodel", replace(model.calibration, map_threshold=1e-9),
                  tmp_path / "served" / "part.dsmodel")
    paths = samples(demo_root, 0, 2) + samples(demo_root, 1, 3)
    with make_client(tmp_path / "served") as client:
        body = client.post("/v1/models/part/inspect?regions=true", files=upload(*paths)).json()
    judged = {r["verdict"]: r for r in body["results"]}
    assert set(judged) == {"good", "defective"} and judged["good"]["regions"] == []
    region = judged["defective"]["regions"]
    assert len(region) == 1 and region[0]["area"] == judged["defective"]["height"] * judged["defective"]["width"]


def test_bad_uploads_get_clear_json_errors(client: TestClient, demo_root: Path, tmp_path: Path, monkeypatch) -> None:
    text = tmp_path / "looks.png"
    text.write_text("this is not an image")
    response = client.post("/v1/models/part/inspect", files=upload(text))
    assert response.status_code == 415 and "looks.png" in response.json()["detail"]
    good = samples(demo_root, 0, 1)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:200])  # a PNG header, then nothing
    response = client.post("/v1/models/part/inspect", files=upload(broken))
    assert response.status_code == 400 and "broken.png" in response.json()["detail"]
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "1000")
    response = client.post("/v1/models/part/inspect", files=upload(good))
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    monkeypatch.delenv("DEFECTSCOPE_MAX_PIXELS")
    assert client.post("/v1/models/part/inspect").status_code == 422
    assert client.post("/v1/models/nope/inspect", files=upload(good)).status_code == 404


def test_size_and_count_limits(model_folder: Path, demo_root: Path) -> None:
    good = samples(demo_root, 0, 3)
    with make_client(model_folder, max_upload_mb=0.001, max_files=2) as small:
        too_big = small.post("/v1/models/part/inspect", files=upload(good[0]))
        assert too_big.status_code == 413 and "larger than" in too_big.json()["detail"]
    with make_client(model_folder, max_files=2) as few:
        assert few.post("/v1/models/part/inspect", files=upload(*good)).status_code == 413
    with make_client(model_folder, max_request_mb=0.01) as strict:  # refused from Content-Length, before parsing
        big = strict.post("/v1/models/part/inspect", files=[("files", ("big.png", b"0" * 3_000_000, "image/png"))])
        assert big.status_code == 413 and "request body" in big.json()["detail"]

        def chunks():  # no Content-Length: refused as soon as the stream passes the limit
            yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            for _ in range(40):
                yield b"0" * 100_000

        streamed = strict.post("/v1/models/part/inspect", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413


def test_full_queue_answers_503_with_retry_after(model_folder: Path, demo_root: Path) -> None:
    with make_client(model_folder, max_queue=1) as client:
        response = client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 0, 2)))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 0, 1))).status_code == 200


def test_token_guards_the_api_and_metrics(model_folder: Path) -> None:
    with make_client(model_folder, token="s3cret") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


@pytest.mark.parametrize("given", [{"token": ""}, {"operator_token": ""}, {"token": "two words"},
                                   {"token": "s\u00e9cret"}, {"operator_token": "tab\there"}])
def test_a_token_no_client_can_send_is_refused(given: dict) -> None:
    """An empty token (an unset variable) passed the start and then answered 401 to every caller, whatever it sent."""
    with pytest.raises(SettingsError, match=f"field '{next(iter(given))}'"):
        ServiceConfig.from_dict(given)


def test_serve_with_an_empty_token_says_so_and_writes_nothing(served_folder: Path, tmp_path: Path, cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.service import listener

    monkeypatch.setattr(listener, "serve_on", lambda *_args: None)  # a server that was let start returns at once
    result = cli("serve", served_folder / "part.dsmodel", "--token", "", "--audit", tmp_path / "audit.sqlite", "--port", 0)
    assert result.code == 2 and result.err.startswith("error: field 'token' is empty") and not any(tmp_path.iterdir())


def test_metrics_count_requests_images_and_errors(client: TestClient, demo_root: Path) -> None:
    client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 1, 2)))
    client.get("/v1/models/nope")
    text = client.get("/metrics").text
    assert 'defectscope_requests_total{route="/v1/models/{name}/inspect",status="200"}' in text
    assert 'defectscope_images_scored_total{model="part",verdict="defective"}' in text
    assert 'defectscope_errors_total{status="404"}' in text
    assert "defectscope_request_seconds_bucket" in text and 'defectscope_queue_depth{model="part"} 0.0' in text


def test_metrics_count_verdicts_a_dispatch_target_did_not_take(model_folder: Path, demo_root: Path) -> None:
    from defectscope.line.dispatch import Dispatcher

    class Refusing:
        name = "webhook"

        def send(self, message: dict) -> None:
            raise ConnectionError("webhook is down")

    reports: list[str] = []
    dispatch = Dispatcher([Refusing()], reports.append)
    settings = ServiceConfig.from_dict({})
    with TestClient(create_app(load_served([model_folder], settings), settings, dispatch=dispatch)) as client:
        client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 1, 2)))
        dispatch.flush()
        assert "defectscope_verdicts_undelivered 2.0" in client.get("/metrics").text
    assert len(reports) == 2 and all("not delivered: webhook is down" in r for r in reports)


def test_a_full_disk_is_a_507_naming_what_could_not_be_written(model_folder: Path, demo_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit database on a full disk was a 500 (its rollback failed over SQLite's own), and kept images a 400 once
    a write named its file: a client told its request was bad would not send it again."""
    import errno
    import os

    from defectscope import files
    from defectscope.line.audit import AuditLog
    from defectscope.line.retention import ImageKeeper

    audit = AuditLog(tmp_path / "audit.sqlite")
    settings = ServiceConfig.from_dict({})
    with TestClient(create_app(load_served([model_folder], settings), settings, audit=audit)) as client:
        pages = audit._db.execute("PRAGMA page_count").fetchone()[0]
        audit._db.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow: SQLite's "disk is full"
        answers = [client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 1, 1))) for _ in range(40)]
        full = [a for a in answers if a.status_code != 200]
        assert full and {a.status_code for a in full} == {507}
        assert full[0].json()["detail"].startswith(f"cannot write the audit database {tmp_path / 'audit.sqlite'}")
    keeper = ImageKeeper(tmp_path / "kept", frozenset({"good", "defective"}), 1 << 30)

    def full_disk(_handle: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with TestClient(create_app(load_served([model_folder], settings), settings, audit=AuditLog(tmp_path / "a2.sqlite"),
                               keeper=keeper)) as client:
        monkeypatch.setattr(files.os, "fsync", full_disk)
        kept = client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 1, 1)))
        assert kept.status_code == 507 and "No space left on device" in kept.json()["detail"]


def test_verdicts_a_dispatch_target_missed_are_sent_again_by_the_service_and_after_its_restart(
        model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    from defectscope.line.audit import AuditLog
    from defectscope.line.dispatch import Dispatcher

    class Webhook:
        name = "webhook"
        up = False

        def __init__(self) -> None:
            self.messages: list[dict] = []

        def send(self, message: dict) -> None:
            if not Webhook.up:
                raise ConnectionError("webhook is down")
            self.messages.append(message)

    class Broker(Webhook):
        name = "mqtt"

        def send(self, message: dict) -> None:
            self.messages.append(message)

    settings = ServiceConfig.from_dict({"redeliver_s": 0.2})
    first, broker = Webhook(), Broker()
    audit = AuditLog(tmp_path / "audit.sqlite")
    app = create_app(load_served([model_folder], settings), settings, audit=audit, dispatch=Dispatcher([first, broker]))
    with TestClient(app) as client:
        answer = client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 1, 2))).json()
        ids = sorted(result["audit_id"] for result in answer["results"])
        Webhook.up = True  # back while the service runs: it gets what it missed without a restart
        deadline = time.monotonic() + 10
        while sorted({m["id"] for m in first.messages}) != ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted({m["id"] for m in first.messages}) == ids
        assert all(message == audit.get(message["id"]) for message in first.messages)
        Webhook.up = False
        client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 0, 1)))  # missed, then a stop
    Webhook.up, second, broker_again = True, Webhook(), Broker()
    audit = AuditLog(tmp_path / "audit.sqlite")
    app = create_app(load_served([model_folder], settings), settings, audit=audit,
                     dispatch=Dispatcher([second, broker_again]))
    with TestClient(app):
        deadline = time.monotonic() + 10
        while not second.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [m["id"] for m in second.messages] == [max(ids) + 1]  # the one missed before the stop, once
    assert sorted(m["id"] for m in broker.messages) == [*ids, max(ids) + 1] and broker_again.messages == []  # no repeat


def test_concurrent_requests_share_batches(model_folder: Path, demo_root: Path) -> None:
    detector = load_model(model_folder / "part.dsmodel")
    images = [read_image(p) for p in samples(demo_root, 0, 4) + samples(demo_root, 1, 4)]
    batcher = Batcher(detector, max_batch=32, wait_ms=200, max_queue=64)

    async def together() -> list:
        return await asyncio.gather(*(batcher.predict([image]) for image in images))

    results = asyncio.run(together())
    batcher.close()
    assert batcher.batches == 1  # eight requests, one model call
    alone = detector.predict(images)
    np.testing.assert_allclose([r.scores[0] for r in results], alone.scores, rtol=1e-5)
    np.testing.assert_allclose(results[5].maps[0], alone.maps[5], rtol=1e-4, atol=1e-5)


def test_closing_a_batcher_answers_every_waiting_request(model_folder: Path, demo_root: Path) -> None:
    from defectscope.service.batching import QueueFull

    batcher = Batcher(load_model(model_folder / "part.dsmodel"), max_batch=32, wait_ms=500, max_queue=64)
    image = read_image(samples(demo_root, 0, 1)[0])

    async def close_while_waiting() -> list:
        waiting = [asyncio.ensure_future(batcher.predict([image])) for _ in range(3)]
        await asyncio.sleep(0.05)
        batcher.close()
        return await asyncio.gather(*waiting, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(close_while_waiting(), 30))
    assert len(outcomes) == 3 and all(isinstance(o, QueueFull) for o in outcomes)


def test_labelled_scores_images_and_heatmaps(client: TestClient) -> None:
    labelled = client.get("/v1/models/part/labelled").json()
    assert len(labelled["images"]) == 34 and {i["label"] for i in labelled["images"]} == {0, 1}
    assert "path" not in labelled["images"][0]  # server paths never leave the server
    image = client.get("/v1/models/part/labelled/0/image")
    heat = client.get("/v1/models/part/labelled/0/heatmap")
    assert image.headers["content-type"] == heat.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == Image.open(io.BytesIO(heat.content)).size
    assert client.get("/v1/models/part/labelled/999/image").status_code == 404


def test_save_threshold_writes_and_serves_a_new_model(model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    with make_client(folder, demo_root) as client:
        labelled = client.get("/v1/models/part/labelled").json()
        threshold = sorted(i["score"] for i in labelled["images"])[10]
        response = client.post("/v1/models/part/threshold", json={"threshold": threshold, "name": "strict"})
        assert response.status_code == 201, response.text
        assert load_model(folder / "strict.dsmodel").calibration.threshold == pytest.approx(threshold)
        assert "strict" in [m["name"] for m in client.get("/v1/models").json()["models"]]
        again = client.post("/v1/models/part/threshold", json={"threshold": threshold * 2, "name": "strict"})
        assert again.status_code == 409 and load_model(folder / "strict.dsmodel").calibration.threshold == pytest.approx(threshold)
        confirmed = client.post("/v1/models/part/threshold", json={"threshold": threshold * 2, "name": "strict", "overwrite": True})
        assert confirmed.status_code == 201
        assert load_model(folder / "strict.dsmodel").calibration.threshold == pytest.approx(threshold * 2)
        (folder / "notes.dsmodel").write_text("someone's notes")
        refused = client.post("/v1/models/part/threshold", json={"threshold": threshold, "name": "notes", "overwrite": True})
        assert refused.status_code == 409 and (folder / "notes.dsmodel").read_text() == "someone's notes"
        for bad in ("../escape", "a/b", "", ".hidden"):
            assert client.post("/v1/models/part/threshold", json={"threshold": 1.0, "name": bad}).status_code == 422
        assert not (tmp_path / "escape.dsmodel").exists()
        assert client.post("/v1/models/part/threshold", json={"threshold": -1, "name": "x"}).status_code == 422


def test_two_requests_for_one_new_name_make_one_model_and_a_409(model_folder: Path, demo_root: Path,
                                                                tmp_path: Path) -> None:
    """Both found the name free, both wrote, and both answered 201 naming the second's file: the first request's
    model had been replaced without its consent, and its answer described a model it did not make."""
    import httpx

    from defectscope.files import file_sha256

    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    app = create_app(load_served([folder], labelled=demo_root), ServiceConfig(), demo_root)

    async def both() -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.post("/v1/models/part/threshold", json={"threshold": t, "name": "new"})
                                          for t in (20.0, 30.0)))

    answers = asyncio.run(both())
    assert sorted(a.status_code for a in answers) == [201, 409]
    written = next(a for a in answers if a.status_code == 201).json()["model"]
    assert written["sha256"] == file_sha256(folder / "new.dsmodel")
    assert "confirm to replace it" in next(a for a in answers if a.status_code == 409).text


def test_teach_learns_labelled_images_into_a_new_model(model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    with make_client(folder, demo_root) as client:
        goods = [i["id"] for i in client.get("/v1/models/part/labelled").json()["images"] if i["label"] == 0][:2]
        response = client.post("/v1/models/part/teach", json={"images": goods, "name": "taught"})
        assert response.status_code == 201, response.text
        assert response.json()["details"]["images"] == 2
        taught = load_model(folder / "taught.dsmodel")
        assert taught.train_summary["taught"][0]["parent_sha256"] == client.get("/v1/models").json()["models"][0]["sha256"]
        assert client.post("/v1/models/part/teach", json={"images": [9999], "name": "x"}).status_code == 404


def test_no_endpoint_takes_a_file_system_path(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    names = {p["name"] for ops in schema["paths"].values() for op in ops.values() for p in op.get("parameters", [])}
    bodies = {name for component in schema["components"]["schemas"].values() for name in component.get("properties", {})}
    assert not (names | bodies) & {"path", "paths", "file_path", "folder", "directory", "out", "output"}


def test_serve_command_starts_on_localhost_and_refuses_bad_input(model_folder: Path, demo_root: Path, tmp_path: Path,
                                                                 cli) -> None:
    """It serves on 127.0.0.1, an answered verdict is in the audit trail even after kill -9, and bad input is refused."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from defectscope.files import file_sha256
    from defectscope.line.audit import AuditLog

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit = tmp_path / "audit.sqlite"
    command = [str(Path(sys.executable).with_name("defectscope")), "serve", str(model_folder), "--port", str(port),
               "--audit", str(audit)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    image = samples(demo_root, 1, 1)[0]
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health == {"status": "ok", "models": 1, "version": health["version"]}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/part/inspect", files=upload(image), timeout=60).json()
    finally:
        server.send_signal(signal.SIGKILL)
        out, _ = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out and str(audit) in out
    record = AuditLog(audit).query()[0]  # written before the answer: kill -9 loses nothing answered
    assert record["id"] == answer["results"][0]["audit_id"] and record["verdict"] == answer["results"][0]["verdict"]
    assert record["model_sha256"] == answer["model_sha256"] == file_sha256(model_folder / "part.dsmodel")
    assert record["image_sha256"] == file_sha256(image) and record["role"] == "engineer" and record["source"] == "upload"
    exposed = cli("serve", "--port", 0, model_folder, "--host", "0.0.0.0", "--no-audit")
    assert exposed.code == 2 and "--insecure" in exposed.err  # beyond loopback without a token: refused
    missing = cli("serve", "--port", 0, tmp_path / "nothing.dsmodel")
    assert missing.code == 2 and "does not exist" in missing.err
    (tmp_path / "empty").mkdir()
    assert cli("serve", "--port", 0, tmp_path / "empty").code == 2
    with socket.socket() as taken:  # another program holds the port: said at once, before anything is written
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli("serve", model_folder, "--port", taken.getsockname()[1], "--audit", tmp_path / "busy.sqlite")
    assert busy.code == 2 and busy.err.startswith("error: cannot listen on 127.0.0.1:") and "serving" not in busy.out
    assert not (tmp_path / "busy.sqlite").exists()  # it printed "serving ...", then a traceback, exit 3
    beyond = cli("serve", model_folder, "--port", 70000, "--audit", tmp_path / "beyond.sqlite")
    assert beyond.code == 2 and "--port must be between 0 and 65535" in beyond.err
    assert not (tmp_path / "beyond.sqlite").exists()


def test_serve_keeps_the_loaded_libraries_from_the_collector_but_not_its_models(model_folder: Path, cli, monkeypatch
                                                                                 ) -> None:
    """A full collection skips what `serve` loaded before its models (a pause of 150-230 ms otherwise), and a model
    replaced later is still freed: it was loaded after the freeze."""
    import gc
    import weakref

    from defectscope.service import listener

    seen = {}

    def run(app, _listener) -> None:
        seen["frozen"] = gc.get_freeze_count()
        served = app.state.models.pop("part")  # replaced: nothing else holds it
        served.detector.served_as = served  # a cycle, as a served model's batcher, loop and futures make
        seen["model"] = weakref.ref(served.detector)
        del served
        gc.collect()
        seen["freed"] = seen["model"]() is None

    monkeypatch.setattr(listener, "serve_on", run)
    assert cli("serve", "--port", 0, model_folder, "--no-audit").code == 0
    assert seen["frozen"] > 10_000 and seen["freed"]  # the libraries (torch's, FastAPI's, NumPy's objects), not the model


def test_each_served_model_has_run_once_before_its_first_request(model_folder: Path, monkeypatch) -> None:
    """An engine sets itself up on its first run: it happens at loading (and reloading), not on the first part."""
    from conftest import count_runs
    from defectscope import predictor as predictors

    runs = count_runs(monkeypatch, predictors)
    served = load_served([model_folder], ServiceConfig())
    assert runs == [(1, 3, *served["part"].detector.preprocess.input_shape)] and served["part"].batcher.batches == 0


def test_a_replaced_model_is_collected_and_its_memory_given_back(model_folder: Path, tmp_path: Path, monkeypatch
                                                                 ) -> None:
    """Once a replaced model has answered its last request, it is collected and the freed heap goes back to the system
    (reloads kept it: the server's memory grew 0.87 -> 1.5 GB over 24 reloads of bottle's model)."""
    import weakref

    from defectscope.service import api

    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    released, give_back = [], api.release_memory
    with make_client(folder) as client:
        old = weakref.ref(client.app.state.models["part"].detector)
        monkeypatch.setattr(api, "release_memory", lambda: (give_back(), released.append(old() is None)))
        assert client.post("/v1/models/part/reload").status_code == 200
        deadline = time.monotonic() + 10
        while not released and time.monotonic() < deadline:
            time.sleep(0.05)
    assert released == [True]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def test_pixel_budgets_and_a_busy_queue_answer_before_decoding(model_folder: Path, demo_root: Path, monkeypatch) -> None:
    flat = [("files", (f"flat{i}.png", _png(1500, 1500), "image/png")) for i in range(3)]
    with make_client(model_folder, max_request_megapixels=4) as client:
        response = client.post("/v1/models/part/inspect", files=flat)
        assert response.status_code == 413 and "pixels together" in response.json()["detail"]
    from test_bad_input import png_header_only  # a 45-byte PNG claiming 50000 x 50000 pixels
    import tempfile
    with tempfile.TemporaryDirectory() as folder, make_client(model_folder) as client:
        header = png_header_only(Path(folder) / "huge.png", 50_000, 50_000).read_bytes()
        response = client.post("/v1/models/part/inspect", files=[("files", ("huge.png", header, "image/png"))])
        assert response.status_code == 413 and "limit" in response.json()["detail"]
    decoded = []
    monkeypatch.setattr("defectscope.service.api.decode", lambda data, name: decoded.append(name))
    with make_client(model_folder, max_queue_megapixels=3) as client:
        with client.app.state.models["part"].batcher.admit(1, 1_000_000):  # another request's images are waiting
            response = client.post("/v1/models/part/inspect", files=flat[:1])
        assert response.status_code == 503 and response.headers["retry-after"] == "1" and not decoded


def test_a_stalled_body_gets_408() -> None:
    from defectscope.service.app import BodyLimit
    sent = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def stalled():
        await asyncio.sleep(3600)

    async def collect(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"100")]}
    asyncio.run(asyncio.wait_for(BodyLimit(app, 1000, timeout=0.2)(scope, stalled, collect), 10))
    assert sent[0]["status"] == 408


def test_nan_in_a_request_is_a_422_not_a_500(client: TestClient) -> None:
    response = client.post("/v1/models/part/threshold", content=b'{"threshold": NaN, "name": "x"}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422


def test_teaching_refuses_labelled_defects_and_keeps_the_parent(model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    parent = (folder / "part.dsmodel").read_bytes()
    with make_client(folder, demo_root) as client:
        images = client.get("/v1/models/part/labelled").json()["images"]
        defects = [i["id"] for i in images if i["label"] == 1][:2]
        refused = client.post("/v1/models/part/teach", json={"images": defects, "name": "taught"})
        assert refused.status_code == 400 and "labelled defective" in refused.json()["detail"]
        assert not (folder / "taught.dsmodel").exists()
        goods = [i["id"] for i in images if i["label"] == 0][:2]
        response = client.post("/v1/models/part/teach", json={"images": goods, "name": "part", "overwrite": True})
        assert response.status_code == 201, response.text
        history = client.get("/v1/models/part/versions").json()  # the parent is kept as a version, ready for a rollback
        first, taught = history["versions"]
        assert (first["action"], taught["action"], taught["parent"], history["active"]) == (
            "served", "teach", first["version"], taught["version"])
        assert (folder / ".defectscope-versions" / "part" / f"{first['version']}.dsmodel").read_bytes() == parent
        manifest = client.get("/v1/models/part").json()
        assert manifest["train_summary"]["taught"][0]["taught_images"] == [images[i]["name"] for i in goods]
        assert str(demo_root) not in str(manifest)
        assert client.post("/v1/models/part/inspect", files=upload(*samples(demo_root, 0, 1))).status_code == 200


def test_a_replaced_model_finishes_what_it_admitted(model_folder: Path, demo_root: Path) -> None:
    from defectscope.service.batching import QueueFull

    batcher = Batcher(load_model(model_folder / "part.dsmodel"), max_batch=32, wait_ms=50, max_queue=64)
    image = read_image(samples(demo_root, 0, 1)[0])

    async def retire_while_admitted():
        with batcher.admit(1, image.size):
            batcher.retire()  # the swap: this request was admitted before it
            prediction = await batcher.predict([image], admitted=True)
        try:
            batcher.admit(1, 1).__enter__()
        except QueueFull as exc:
            return prediction, exc
        return prediction, None

    prediction, refused = asyncio.run(asyncio.wait_for(retire_while_admitted(), 30))
    assert np.isfinite(prediction.scores).all() and isinstance(refused, QueueFull)


def test_same_names_keep_their_own_results_and_docs_work_offline(client: TestClient, demo_root: Path) -> None:
    good, bad = samples(demo_root, 0, 1)[0], samples(demo_root, 1, 1)[0]
    files = [("files", ("000.png", good.read_bytes(), "image/png")), ("files", ("000.png", bad.read_bytes(), "image/png"))]
    results = client.post("/v1/models/part/inspect", files=files).json()["results"]
    assert [r["index"] for r in results] == [0, 1] and results[0]["score"] < results[1]["score"]
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    from defectscope.cli import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_a_new_model_never_takes_the_name_of_one_served_from_another_file(model_folder: Path, demo_root: Path,
                                                                         tmp_path: Path) -> None:
    from defectscope.deployment import export_model

    folder = tmp_path / "models"
    shutil.copytree(model_folder, folder)
    export_model(folder / "part.dsmodel", folder / "line.dsdeploy", "onnx")
    with make_client(folder, demo_root) as client:
        good = next(i for i, image in enumerate(client.get("/v1/models/part/labelled").json()["images"])
                    if image["label"] == 0)
        for action, body in (("threshold", {"threshold": 1.0, "name": "line"}), ("teach", {"images": [good], "name": "line"})):
            for overwrite in (False, True):
                refused = client.post(f"/v1/models/part/{action}", json={**body, "overwrite": overwrite})
                assert refused.status_code == 409 and "served from another file" in refused.json()["detail"]
        assert {m["name"]: m["engine"] for m in client.get("/v1/models").json()["models"]}["line"] == "onnxruntime"
    assert not (folder / "line.dsmodel").exists()
    assert sorted(load_served([folder])) == ["line", "part"]  # the folder still starts: no two files named line


def test_an_exported_model_is_served_like_its_model_file(model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    from defectscope.deployment import export_model

    line = tmp_path / "line"
    line.mkdir()
    export_model(model_folder / "part.dsmodel", line / "part-onnx.dsdeploy", "onnx")
    export_model(model_folder / "part.dsmodel", line / "part-openvino.dsdeploy", "openvino")
    paths = samples(demo_root, 0, 2) + samples(demo_root, 1, 3)
    expected = load_model(model_folder / "part.dsmodel").predict(paths)
    with make_client(line, demo_root) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert {name: m["engine"] for name, m in models.items()} == {"part-onnx": "onnxruntime", "part-openvino": "openvino"}
        for name in models:
            body = client.post(f"/v1/models/{name}/inspect?heatmap=true", files=upload(*paths)).json()
            np.testing.assert_allclose([r["score"] for r in body["results"]], expected.scores, rtol=1e-4)
            assert [r["verdict"] for r in body["results"]] == expected.verdicts
            for result, path in zip(body["results"], paths):
                assert Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"]))).size == Image.open(path).size
            assert len(client.get(f"/v1/models/{name}/labelled").json()["images"]) == 34
            assert client.get(f"/v1/models/{name}").json()["graph"]["engine"] == models[name]["engine"]
            for action, body in (("threshold", {"threshold": 1.0, "name": "moved"}), ("teach", {"images": [0], "name": "taught"})):
                refused = client.post(f"/v1/models/{name}/{action}", json=body)
                assert refused.status_code == 400 and "exported model" in refused.json()["detail"]
    assert sorted(p.suffix for p in line.iterdir()) == [".bin", ".bin", ".dsdeploy", ".dsdeploy", ".onnx", ".onnx", ".xml",
                                                        ".xml"]  # PatchCore's two graphs, for each engine



def test_roles_guard_every_write_and_every_verdict_is_audited(model_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    from defectscope.files import file_sha256
    from defectscope.line.audit import AuditLog

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(model_folder / "part.dsmodel", folder / "part.dsmodel")
    settings = ServiceConfig.from_dict({"token": "engineer-secret", "operator_token": "operator-secret"})
    audit = AuditLog(tmp_path / "audit.sqlite")
    app = create_app(load_served([folder], settings, demo_root), settings, demo_root, audit)
    engineer, operator = ({"Authorization": f"Bearer {token}"} for token in ("engineer-secret", "operator-secret"))
    writes = [("/v1/models/part/threshold", {"threshold": 1.0, "name": "moved"}),
              ("/v1/models/part/teach", {"images": [0], "name": "taught"}), ("/v1/models/part/reload", None),
              ("/v1/models/part/promote", {"version": "0" * 12}), ("/v1/models/part/rollback", None)]
    with TestClient(app) as client:
        assert client.get("/v1/whoami", headers=operator).json() == {"role": "operator"}
        assert client.get("/v1/whoami", headers=engineer).json() == {"role": "engineer"}
        for path, body in writes:
            assert client.post(path, json=body).status_code == 401
            refused = client.post(path, json=body, headers=operator)
            assert refused.status_code == 403 and "engineer" in refused.json()["detail"]
        paths = samples(demo_root, 0, 2) + samples(demo_root, 1, 2)
        answer = client.post("/v1/models/part/inspect", files=upload(*paths), headers=operator).json()
        assert answer["model_sha256"] == file_sha256(folder / "part.dsmodel") and answer["model_version"] == answer["model_sha256"][:12]
        page = client.get("/v1/audit", headers=operator, params={"limit": 3}).json()
        assert [r["id"] for r in page["records"]] == sorted((r["audit_id"] for r in answer["results"]), reverse=True)[:3]
        for record in client.get("/v1/audit", headers=operator).json()["records"]:
            result = answer["results"][[r["audit_id"] for r in answer["results"]].index(record["id"])]
            assert (record["verdict"], record["score"], record["role"], record["image_name"]) == \
                (result["verdict"], result["score"], "operator", result["name"])
            assert record["image_sha256"] == file_sha256(paths[result["index"]])
        defective = client.get("/v1/audit", headers=engineer, params={"verdict": "defective"}).json()["records"]
        assert {r["verdict"] for r in defective} <= {"defective"} and len(defective) == sum(
            r["verdict"] == "defective" for r in answer["results"])
        written = page["records"][0]["time"]  # the same instant in another zone's notation finds the same records
        elsewhere = datetime.fromisoformat(written).astimezone(timezone(timedelta(hours=-5))).isoformat()
        assert client.get("/v1/audit", headers=operator, params={"since": elsewhere}).json()["records"][-1]["time"] == written
        undated = client.get("/v1/audit", headers=operator, params={"since": "yesterday"})
        assert undated.status_code == 422 and undated.json()["detail"][0]["loc"] == ["query", "since"]
        # a model file replaced on disk is served after a reload, by the engineer
        set_threshold(folder / "part.dsmodel", Calibration(123.0, "manual", 123.0, 0.0, 0.0, 0))
        reloaded = client.post("/v1/models/part/reload", headers=engineer)
        assert reloaded.status_code == 200 and reloaded.json()["threshold"] == 123.0
        assert reloaded.json()["sha256"] == file_sha256(folder / "part.dsmodel") != answer["model_sha256"]
        again = client.post("/v1/models/part/inspect", files=upload(paths[0]), headers=engineer).json()
        assert again["threshold"] == 123.0 and again["model_sha256"] == reloaded.json()["sha256"]
