"""Model versions: kept by content with their parents, promoted and rolled back atomically (also under load), from
the service and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from defectscope.errors import DefectscopeError
from defectscope.files import file_sha256
from defectscope.names import version_of
from defectscope.versions import STORE, NoEarlierVersion, PrunedVersion, UnknownVersion, VersionStore


def test_versions_are_kept_by_content_and_rolled_back_in_order(tmp_path: Path) -> None:
    served = tmp_path / "part.dsmodel"
    served.write_bytes(b"first")
    store, name = VersionStore.of(served)
    first = store.adopt(name)
    assert store.adopt(name) == first and len(store.history(name)["versions"]) == 1  # unchanged: nothing new
    served.write_bytes(b"second")  # replaced on disk (e.g. `update -o` before a reload)
    second = store.adopt(name, "reload")
    assert (second["parent"], store.history(name)["active"]) == (first["version"], second["version"])
    store.promote(name, first["version"])
    assert served.read_bytes() == b"first"
    assert store.rollback(name) == second["version"] and served.read_bytes() == b"second"
    assert store.rollback(name) == first["version"] and served.read_bytes() == b"first"
    assert [a["action"] for a in store.history(name)["activations"]] == ["served", "reload", "promote", "rollback",
                                                                         "rollback"]
    kept = tmp_path / STORE / name / f"{second['version']}.dsmodel"
    assert kept.read_bytes() == b"second" and second["version"] == version_of(file_sha256(kept))
    with pytest.raises(UnknownVersion, match="no version"):
        store.promote(name, "0" * 12)
    served.write_bytes(b"third")  # put there by hand, never recorded: a promote keeps it before replacing it
    store.promote(name, second["version"])
    third = version_of(hashlib.sha256(b"third").hexdigest())
    assert (tmp_path / STORE / name / f"{third}.dsmodel").read_bytes() == b"third"
    assert served.read_bytes() == b"second"
    lone = tmp_path / "lone.dsmodel"
    lone.write_bytes(b"only")
    with pytest.raises(NoEarlierVersion):
        VersionStore.of(lone)[0].rollback("lone")
    assert lone.read_bytes() == b"only"


def test_the_command_line_lists_promotes_and_rolls_back(tmp_path: Path, cli) -> None:
    served = tmp_path / "part.dsmodel"
    served.write_bytes(b"first")
    assert "no versions" in cli("versions", served).out
    store, _ = VersionStore.of(served)
    first = store.adopt("part")["version"]
    served.write_bytes(b"second")  # a new file in place, not yet kept: promote keeps it before replacing it
    assert cli("promote", served, first).code == 0 and served.read_bytes() == b"first"
    listed = cli("versions", served).out.splitlines()
    assert len(listed) == 2 and listed[0].startswith(f"* {first}") and listed[1].split()[2] == first  # the parent
    assert cli("rollback", served).code == 0 and served.read_bytes() == b"second"
    refused = cli("promote", served, "f" * 12)
    assert refused.code == 2 and "no version" in refused.err and served.read_bytes() == b"second"
    assert cli("versions", tmp_path / "m.dsdeploy").code == 2
    missing = cli("versions", tmp_path / "other.dsmodel")
    assert missing.code == 2 and "no model file" in missing.err and not (tmp_path / STORE / "other").exists()
    lone = tmp_path / "lone.dsmodel"  # never served: a refused promote or rollback keeps nothing of it
    lone.write_bytes(b"only")
    refused = cli("promote", lone, "f" * 12)
    assert refused.code == 2 and "no version 'ffffffffffff' (known: none)" in refused.err
    refused = cli("rollback", lone)
    assert refused.code == 2 and "no earlier active version" in refused.err
    assert not (tmp_path / STORE / "lone").exists() and lone.read_bytes() == b"only"
    own = version_of(file_sha256(lone))  # its own version is known: promoting it keeps it, and changes no byte
    assert cli("promote", lone, own).code == 0 and lone.read_bytes() == b"only"
    assert (tmp_path / STORE / "lone" / f"{own}.dsmodel").read_bytes() == b"only"


def test_a_kept_version_changed_since_is_never_promoted(tmp_path: Path, cli) -> None:
    """A kept file damaged (or edited) after it was kept was copied over the served file, and said active."""
    served = tmp_path / "part.dsmodel"
    served.write_bytes(b"first")
    store, _ = VersionStore.of(served)
    first = store.adopt("part")["version"]
    served.write_bytes(b"second")
    second = store.adopt("part", "reload")["version"]
    kept = tmp_path / STORE / "part" / f"{first}.dsmodel"
    kept.write_bytes(b"fir5t")  # one byte off, as a disk or a hand might leave it
    history = (tmp_path / STORE / "part" / "history.json").read_text()
    for refused in (cli("promote", served, first), cli("rollback", served)):
        assert refused.code == 2 and "no longer holds that version" in refused.err and "nothing was changed" in refused.err
    assert served.read_bytes() == b"second" and (tmp_path / STORE / "part" / "history.json").read_text() == history
    kept.unlink()
    assert "is missing from the store" in cli("promote", served, first).err and served.read_bytes() == b"second"
    served.write_bytes(b"first")  # the version's content comes back: kept again, whole
    assert store.adopt("part")["version"] == first and kept.read_bytes() == b"first"
    assert cli("promote", served, second).code == 0 and cli("rollback", served).code == 0 and served.read_bytes() == b"first"


@pytest.mark.parametrize("damaged", ['[]', '{"versions": 5}', 'null', '{"active": "x"}',
                                     '{"active": null, "versions": [{"version": 1}], "activations": []}'])
def test_a_damaged_history_is_one_line(tmp_path: Path, cli, damaged: str) -> None:
    served = tmp_path / "part.dsmodel"
    served.write_bytes(b"first")
    VersionStore.of(served)[0].adopt("part")
    (tmp_path / STORE / "part" / "history.json").write_text(damaged)  # edited by hand, or half restored
    for command in (["versions", served], ["rollback", served], ["promote", served, "0" * 12],
                    ["versions", served, "--keep", "1"]):
        refused = cli(*command)
        assert refused.code == 2 and "history" in refused.err and "is damaged" in refused.err, refused.err
        assert "Traceback" not in refused.err and served.read_bytes() == b"first"


def test_pruning_keeps_the_versions_active_most_recently_and_every_entry(tmp_path: Path, cli) -> None:
    served = tmp_path / "part.dsmodel"
    served.write_bytes(b"v0")
    store, name = VersionStore.of(served)
    made = [store.adopt(name)["version"]]
    for i in range(1, 4):
        served.write_bytes(f"v{i}".encode())
        made.append(store.adopt(name, "reload")["version"])
    store.promote(name, made[1])  # active order, oldest first: v0, v2, v3, v1
    folder = tmp_path / STORE / name
    assert store.prune(name, 2) == [made[2], made[0]]  # kept: v1 (active) and v3 (active just before it)
    assert sorted(path.name for path in folder.glob("*.dsmodel")) == sorted(f"{v}.dsmodel" for v in (made[1], made[3]))
    history = store.history(name)
    assert [("pruned" in entry) for entry in history["versions"]] == [True, False, True, False]  # every entry stays
    with pytest.raises(PrunedVersion, match="pruned"):
        store.promote(name, made[0])
    assert served.read_bytes() == b"v1" and store.rollback(name) == made[3] and served.read_bytes() == b"v3"
    assert store.prune(name, 1) == [made[1]] and store.prune(name, 1) == []
    with pytest.raises(PrunedVersion):
        store.rollback(name)  # the version active before v3 was v1, whose file is gone: refused, not skipped
    assert served.read_bytes() == b"v3"
    refused = cli("promote", served, made[2])
    assert refused.code == 2 and "was pruned" in refused.err and served.read_bytes() == b"v3"
    served.write_bytes(b"v0")  # a pruned version's content comes back: kept again, and can be made active
    store.adopt(name, "reload")
    assert (folder / f"{made[0]}.dsmodel").read_bytes() == b"v0" and "pruned" not in store.history(name)["versions"][0]
    outside = tmp_path / "mine.dsmodel"  # a damaged history naming a path: nothing outside the store is removed
    outside.write_bytes(b"not the store's")
    kept_history = (folder / "history.json").read_text()
    history = json.loads(kept_history)
    history["versions"][3]["version"] = "../../mine"  # v3: kept, not active, so next in line to be pruned
    (folder / "history.json").write_text(json.dumps(history))
    damaged = cli("versions", served, "--keep", "1")
    assert damaged.code == 2 and "which is no version" in damaged.err and outside.read_bytes() == b"not the store's"
    (folder / "history.json").write_text(kept_history)
    listed = cli("versions", served, "--keep", "1")
    said, *rows = listed.out.splitlines()
    assert listed.code == 0 and said == f"part: pruned 1 version file(s): {made[3]}"
    assert sum("(file pruned" in row for row in rows) == 3 and rows[0].startswith(f"* {made[0]}")
    refused = cli("versions", served, "--keep", "0")
    assert refused.code == 2 and "keep must be at least 1" in refused.err
    lone = tmp_path / "lone.dsmodel"  # never served: nothing to prune, and no store made for it
    lone.write_bytes(b"only")
    assert cli("versions", lone, "--keep", "1").code == 0 and not (tmp_path / STORE / "lone").exists()


def test_promote_and_rollback_under_load_drop_no_request(served_folder: Path, demo_root: Path, tmp_path: Path) -> None:
    import uvicorn

    from defectscope import load_dataset
    from defectscope.service.app import create_app
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import load_served

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(served_folder / "part.dsmodel", folder / "part.dsmodel")
    app = create_app(load_served([folder], ServiceConfig(), demo_root), ServiceConfig(), demo_root)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/models/part"
    image = next(s.path for s in load_dataset(demo_root).test if s.label == 0).read_bytes()
    try:
        with httpx.Client(timeout=60) as client:
            good = [i["id"] for i in client.get(f"{url}/labelled").json()["images"] if i["label"] == 0][:2]
            taught = client.post(f"{url}/teach", json={"images": good, "name": "part", "overwrite": True})
            assert taught.status_code == 201, taught.text
        versions = [v["version"] for v in httpx.get(f"{url}/versions").json()["versions"]]
        answers: list[tuple[int, str]] = []
        failures: list[Exception] = []
        stop = threading.Event()

        def inspect() -> None:  # one client of 16: requests until the swaps are done
            try:
                with httpx.Client(timeout=60) as client:
                    while not stop.is_set():
                        response = client.post(f"{url}/inspect", files=[("files", ("a.png", image, "image/png"))])
                        answers.append((response.status_code, response.json().get("model_version", "")))
            except Exception as exc:  # a dropped connection or a timeout: counted, not lost with the thread
                failures.append(exc)

        clients = [threading.Thread(target=inspect) for _ in range(16)]
        for thread in clients:
            thread.start()
        swaps = []
        with httpx.Client(timeout=60) as client:
            for _ in range(3):
                swaps.append(client.post(f"{url}/rollback").status_code)
                swaps.append(client.post(f"{url}/promote", json={"version": versions[1]}).status_code)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
        kept = folder / STORE / "part" / f"{versions[0]}.dsmodel"
        whole = kept.read_bytes()
        kept.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # damaged since it was kept: never served
        damaged = httpx.post(f"{url}/promote", json={"version": versions[0]}, timeout=60)
        assert damaged.status_code == 410 and "no longer holds that version" in damaged.json()["detail"]
        assert VersionStore.of(folder / "part.dsmodel")[0].prune("part", 1) == [versions[0]]
        gone = httpx.post(f"{url}/promote", json={"version": versions[0]}, timeout=60)
        assert gone.status_code == 410 and "pruned" in gone.json()["detail"]
        listed = httpx.get(f"{url}/versions", timeout=60).json()["versions"]
        assert [v["pruned"] is not None for v in listed] == [True, False]
    finally:
        server.should_exit = True
    assert swaps == [200] * 6 and not failures
    assert answers and {code for code, _ in answers} == {200}
    assert {version for _, version in answers} == set(versions)  # both were served while the swaps went on
    assert version_of(file_sha256(folder / "part.dsmodel")) == versions[1]


def test_writing_over_a_model_keeps_the_file_it_replaces(served_folder: Path, demo_root: Path, tmp_path: Path,
                                                        cli) -> None:
    """`calibrate` and `update` written in place keep the model they replace (a rollback brings it back), any write
    over a model that has versions keeps the replaced one too, and a copy written elsewhere starts no store."""
    model = tmp_path / "part.dsmodel"
    shutil.copyfile(served_folder / "part.dsmodel", model)
    original = file_sha256(model)
    assert cli("calibrate", model, "--false-alarm-rate", "0.05", "-o", tmp_path / "copy.dsmodel").code == 0
    assert not (tmp_path / STORE).exists()  # a new file beside it: nothing replaced, nothing kept
    assert cli("calibrate", model, "--false-alarm-rate", "0.05", "-o", model).code == 0
    calibrated = file_sha256(model)
    good = sorted((demo_root / "test" / "good").iterdir())[:2]
    assert cli("update", model, "--good", good[0], "--good", good[1], "-o", model).code == 0
    store, name = VersionStore.of(model)
    history = store.history(name)
    made = [(entry["version"], entry["parent"], entry["action"]) for entry in history["versions"]]
    first, second, third = version_of(original), version_of(calibrated), version_of(file_sha256(model))
    assert made == [(first, None, "found"), (second, first, "calibrate"), (third, second, "update")]
    assert history["active"] == third and cli("versions", model).out.splitlines()[-1].startswith(f"* {third}")
    assert cli("rollback", model).code == 0 and file_sha256(model) == calibrated
    assert cli("promote", model, first).code == 0 and file_sha256(model) == original
    copy = tmp_path / "copy.dsmodel"  # a copy over a model with versions: its parent names the file it came from
    VersionStore.of(copy)[0].adopt("copy")
    assert cli("calibrate", model, "--false-alarm-rate", "0.1", "-o", copy).code == 0
    made = VersionStore.of(copy)[0].history("copy")["versions"][-1]
    assert (made["action"], made["parent"]) == ("calibrate", f"part@{first}")

    from defectscope.pipeline import fit_model  # a fit over a model that has versions keeps it too
    fit_model(demo_root, "patchcore", {"image_size": 128, "crop": None, "coreset_ratio": 0.25}, model)
    history = store.history(name)
    assert history["versions"][-1]["action"] == "fit" and history["versions"][-1]["parent"] == first
    assert history["active"] == version_of(file_sha256(model))
    loose = tmp_path / "loose" / "part.dsmodel"  # no versions, not its own source: written over as before
    loose.parent.mkdir()
    shutil.copyfile(served_folder / "part.dsmodel", loose)
    fit_model(demo_root, "patchcore", {"image_size": 128, "crop": None, "coreset_ratio": 0.25}, loose)
    assert not (loose.parent / STORE).exists()

    model.write_bytes(model.read_bytes() + b" ")  # replaced by something else: no version is shown as the file's
    listed = cli("versions", model)
    assert "* " not in listed.out and f"holds {version_of(file_sha256(model))}, not the active version" in listed.out


def test_the_service_says_which_version_it_judges_with_when_the_disk_changed(served_folder: Path, demo_root: Path,
                                                                             tmp_path: Path, cli) -> None:
    from fastapi.testclient import TestClient

    from defectscope.service.app import create_app
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import load_served

    folder = tmp_path / "models"
    shutil.copytree(served_folder, folder)
    settings = ServiceConfig.from_dict({})
    with TestClient(create_app(load_served([folder], settings, demo_root), settings, demo_root)) as client:
        first = client.get("/v1/models/part/versions").json()
        assert first["served"] == first["active"]
        model = folder / "part.dsmodel"
        assert cli("-q", "calibrate", model, "--false-alarm-rate", "0.05", "-o", model).code == 0  # on disk, not served
        changed = client.get("/v1/models/part/versions").json()
        assert changed["active"] == version_of(file_sha256(model)) and changed["served"] == first["served"] != changed["active"]
        assert client.post("/v1/models/part/reload").status_code == 200
        reloaded = client.get("/v1/models/part/versions").json()
        assert reloaded["served"] == reloaded["active"] == changed["active"]
        kept = model.read_bytes()
        model.write_bytes(b"not a model")  # replaced on disk by something that cannot be served
        refused = client.post("/v1/models/part/reload")
        assert refused.status_code == 400 and "the served model is unchanged" in refused.json()["detail"]
        assert client.get("/v1/models/part/versions").json() == reloaded  # it became no version, and nothing active
        model.write_bytes(kept)
        assert cli("-q", "calibrate", model, "--false-alarm-rate", "0.2", "-o", model).code == 0  # not served again
        on_disk = model.read_bytes()
        goods = [i["id"] for i in client.get("/v1/models/part/labelled").json()["images"] if i["label"] == 0][:1]
        for path, body in (("threshold", {"threshold": 30.0, "name": "part", "overwrite": True}),
                           ("threshold", {"threshold": 30.0, "name": "strict"}),
                           ("teach", {"images": goods, "name": "part", "overwrite": True})):
            # a change made from the served version, written onto the newer file on disk, mixed the two
            answer = client.post(f"/v1/models/part/{path}", json=body)
            assert answer.status_code == 409 and "reload the model first" in answer.json()["detail"], answer.text
        assert model.read_bytes() == on_disk and not (folder / "strict.dsmodel").exists()


@pytest.mark.parametrize("change", ["calibrate", "update"])
def test_a_model_written_meanwhile_is_never_overwritten_by_a_change_read_before(served_folder: Path, demo_root: Path,
                                                                                 tmp_path: Path, monkeypatch,
                                                                                 change: str) -> None:
    """`calibrate` or `update` in place while another command writes the same file: the other write was lost (or a
    threshold read from the old model was written onto the new one), each reported as success."""
    from defectscope import pipeline

    model, other = tmp_path / "part.dsmodel", tmp_path / "other.dsmodel"
    shutil.copyfile(served_folder / "part.dsmodel", model)
    assert pipeline.recalibrate(model, other, false_alarm_rate=0.2).threshold > 0
    written_meanwhile = other.read_bytes()
    hook = "with_map_level" if change == "calibrate" else "_defect_like"
    original = getattr(pipeline, hook)

    def meanwhile(*args, **kwargs):
        model.write_bytes(written_meanwhile)  # another process writes the file after this change read it
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, hook, meanwhile)
    with pytest.raises(DefectscopeError, match="since calibrate read it|since update read it"):
        if change == "calibrate":
            pipeline.recalibrate(model, model, false_alarm_rate=0.05)
        else:
            pipeline.update_model(model, sorted((demo_root / "test" / "good").iterdir())[:1], model)
    assert model.read_bytes() == written_meanwhile
    store, name = VersionStore.of(model)
    assert change not in [entry["action"] for entry in store.history(name)["versions"]]


RECORDER = """
import sys
from pathlib import Path
from defectscope.versions import VersionStore

folder, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store, name = VersionStore.of(folder / "part.dsmodel")
for i in range(count):
    source = folder / "sources" / f"{tag}-{i}.bin"
    source.write_bytes(f"{tag} {i}".encode())
    store.record(name, source, "test")
"""


def test_two_processes_changing_one_store_lose_no_version(tmp_path: Path) -> None:
    """The service and the command line may record versions of one model at once: each change reads, changes and
    writes the history, one process at a time (before: the history kept one process's entries and lost the other's)."""
    import subprocess
    import sys

    (tmp_path / "part.dsmodel").write_bytes(b"served")
    (tmp_path / "sources").mkdir()
    recorders = [subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path), tag, "60"]) for tag in ("a", "b")]
    assert [recorder.wait(timeout=300) for recorder in recorders] == [0, 0]
    history = VersionStore.of(tmp_path / "part.dsmodel")[0].history("part")
    assert len(history["versions"]) == 120 and len({v["version"] for v in history["versions"]}) == 120


def test_a_refused_start_keeps_no_versions(served_folder: Path, tmp_path: Path) -> None:
    """A folder the service refuses to serve (one damaged model file among good ones) is left as it was."""
    from defectscope.errors import DefectscopeError
    from defectscope.service.models import load_served

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(served_folder / "part.dsmodel", folder / "a.dsmodel")
    (folder / "b.dsmodel").write_bytes((served_folder / "part.dsmodel").read_bytes()[:1000])  # sorted after a
    with pytest.raises(DefectscopeError, match="b.dsmodel"):
        load_served([folder])
    assert sorted(p.name for p in folder.iterdir()) == ["a.dsmodel", "b.dsmodel"]  # no store started for a


def test_a_model_is_recorded_under_the_file_that_was_loaded(served_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """The service and the hot folder hashed the model file after loading it: a file replaced meanwhile put every
    verdict under the version of a model that never judged it."""
    from defectscope import predictor as contract
    from defectscope.errors import ModelChanged
    from defectscope.pipeline import recalibrate
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import serve_model

    model, other = tmp_path / "part.dsmodel", tmp_path / "other.dsmodel"
    shutil.copyfile(served_folder / "part.dsmodel", model)
    recalibrate(model, other, false_alarm_rate=0.2)
    load, replacements = contract.load_predictor, [other.read_bytes()]

    def replaced_while_loading(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        if replacements:
            Path(path).write_bytes(replacements.pop())  # another command writes the file during this load
        return loaded

    monkeypatch.setattr(contract, "load_predictor", replaced_while_loading)
    served = serve_model(model, "part", ServiceConfig.from_dict({}))
    assert served.sha256 == file_sha256(other) == hashlib.sha256(model.read_bytes()).hexdigest()
    assert served.detector.calibration.threshold == pytest.approx(load_model_threshold(other))
    assert served.manifest["calibration"]["threshold"] == served.detector.calibration.threshold
    first = (served_folder / "part.dsmodel").read_bytes()
    replacements.extend([other.read_bytes(), first] * 3)  # a writer that never stops: each load sees a new file
    with pytest.raises(ModelChanged, match="changed 3 times while it was loaded"):
        contract.load_identified(model)
    monkeypatch.setattr(contract, "load_predictor", load)
    loaded, digest, _ = contract.load_identified(model)
    assert contract.model_files(model, loaded, digest)[model.name] == model.read_bytes()
    model.write_bytes(other.read_bytes() if model.read_bytes() != other.read_bytes() else first)
    with pytest.raises(ModelChanged, match="replaced after it was loaded"):  # what a Ray job would send its actors
        contract.model_files(model, loaded, digest)


def load_model_threshold(path: Path) -> float:
    from defectscope.model_header import model_info

    return model_info(path)["calibration"]["threshold"]
