"""The web page in a real browser (Playwright driving the system Chromium, headless).

Runs wherever a Chromium is installed (Debian: apt-get install chromium); CI installs it and sets
DEFECTSCOPE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from defectscope import load_dataset
from defectscope.service.app import create_app
from defectscope.service.config import ServiceConfig
from defectscope.service.models import load_served

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
if CHROMIUM is None and os.environ.get("DEFECTSCOPE_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium installed (apt-get install chromium) - the browser tests need one", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_root: Path, served_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    from defectscope.line.audit import AuditLog
    from defectscope.line.retention import ImageKeeper

    kept = tmp_path_factory.mktemp("kept")
    app = create_app(load_served([served_folder], labelled=demo_root), ServiceConfig(), demo_root,
                     AuditLog(kept / "audit.sqlite"), keeper=ImageKeeper(kept / "images", frozenset({"defective"}), 1 << 30))
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    yield {"url": f"http://127.0.0.1:{port}", "app": app}
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    assert CHROMIUM, "DEFECTSCOPE_REQUIRE_BROWSER=1 but no Chromium is installed"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(server["url"] + "/")
        page.wait_for_selector("#model option", state="attached")
        yield page
        browser.close()


def _not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.std() > 5, f"{path} looks blank"


def test_inspect_shows_verdicts_and_the_heatmap(page, demo_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(demo_root)
    files = [str(s.path) for s in dataset.test if s.label == 1][:2] + [str(s.path) for s in dataset.test if s.label == 0][:1]
    page.set_input_files("#files", files)
    page.wait_for_selector("#gallery .tile >> nth=2")
    badges = page.locator("#gallery .badge").all_inner_texts()
    assert len(badges) == 3 and "defective" in badges
    assert page.locator("#detail-heat").get_attribute("src").startswith("data:image/png;base64,")
    page.locator("#opacity").fill("0.9")
    assert page.locator("#detail-heat").evaluate("e => e.style.opacity") == "0.9"
    page.screenshot(path=tmp_path / "inspect.png", full_page=True)
    _not_blank(tmp_path / "inspect.png")


def test_threshold_slider_counts_match_python(page, server, tmp_path: Path) -> None:
    page.click("nav button[data-tab=threshold]")
    page.wait_for_selector("#tp:not(:empty)")
    records = server["app"].state.models["part"].labelled.records
    scores = np.array([r["score"] for r in records])
    labels = np.array([r["label"] for r in records])
    threshold = float(np.sort(scores)[20])
    page.locator("#slider").evaluate("(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", threshold)
    shown = float(page.locator("#slider").input_value())  # the browser may round the slider value
    flagged = scores >= shown
    expected = {"tp": (flagged & (labels == 1)).sum(), "fp": (flagged & (labels == 0)).sum(),
                "fn": (~flagged & (labels == 1)).sum(), "tn": (~flagged & (labels == 0)).sum()}
    for key, value in expected.items():
        assert int(page.locator(f"#{key}").inner_text()) == int(value), key
    assert float(page.locator("#recall").inner_text()) == pytest.approx(expected["tp"] / (labels == 1).sum(), abs=1e-3)
    histogram = page.locator("#histogram text").all_text_contents()  # axes with titles and ticks, and a legend
    for text in ("anomaly score (labelled images)", "images", "good", "defective", "threshold"):
        assert text in histogram, (text, histogram)
    ticks = [float(histogram[i]) for i in range(3)]  # the score axis: lowest, middle, highest score
    assert ticks == pytest.approx([scores.min(), (scores.min() + scores.max()) / 2, scores.max()], rel=5e-3)
    assert page.locator("#histogram rect.good").count() and page.locator("#histogram rect.defective").count()
    assert {"false-alarm rate", "recall"} <= set(page.locator("#roc text").all_text_contents())
    far, recall = expected["fp"] / (labels == 0).sum(), expected["tp"] / (labels == 1).sum()
    point = page.locator("#roc circle.operating")  # the slider's threshold on the ROC curve, in plot coordinates
    cx, cy = float(point.get_attribute("cx")), float(point.get_attribute("cy"))
    assert (cx - 40) / (240 - 56) == pytest.approx(far, abs=1e-6) and (240 - 34 - cy) / (240 - 56) == pytest.approx(recall, abs=1e-6)
    page.screenshot(path=tmp_path / "threshold.png", full_page=True)
    _not_blank(tmp_path / "threshold.png")
    page.locator("#slider").evaluate("e => { e.value = e.max; e.dispatchEvent(new Event('input')); }")
    assert int(page.locator("#tp").inner_text()) + int(page.locator("#fp").inner_text()) == 0  # above every score
    assert page.locator("#precision").inner_text().startswith("n/a")  # it said 1.000: a share of nothing


def test_uploads_with_one_name_keep_their_own_pictures(page, demo_root: Path) -> None:
    good = demo_root / "test" / "good" / "000.png"
    defect = next(p for p in sorted((demo_root / "test").glob("*/000.png")) if p.parent.name != "good")
    page.click("nav button[data-tab=inspect]")
    page.set_input_files("#files", [str(good), str(defect)])  # both are named 000.png
    page.wait_for_function("document.querySelectorAll('#gallery .tile').length === 2")
    shown = page.locator("#gallery .tile").evaluate_all(
        "tiles => Promise.all(tiles.map(async t => [t.querySelector('div + div').textContent, "
        "(await (await fetch(t.querySelector('img').src)).blob()).size]))")
    by_score = sorted((float(text.split()[-1]), size) for text, size in shown)
    assert [size for _, size in by_score] == [good.stat().st_size, defect.stat().st_size]  # the higher score: the defect


def test_a_photo_with_an_exif_turn_is_shown_as_the_model_saw_it(page, demo_root: Path, tmp_path: Path) -> None:
    """The browser turned a JPEG by its EXIF orientation while the heatmap and the regions lay over it in the pixels
    the model scored (unturned): on a phone's photo they were stretched across the wrong places."""
    from PIL import Image

    stored = Image.open(demo_root / "test" / "good" / "000.png").convert("RGB").resize((200, 100))
    exif = stored.getexif()
    exif[0x0112] = 6  # "turn 90 degrees to show": stored 200 x 100, shown 100 x 200 by a browser that honours it
    stored.save(tmp_path / "phone.jpg", "JPEG", quality=95, exif=exif)
    page.click("nav button[data-tab=inspect]")
    page.set_input_files("#files", [str(tmp_path / "phone.jpg")])
    page.wait_for_function("document.querySelector('#detail-text').textContent.startsWith('phone.jpg')")
    page.wait_for_function("document.querySelector('#detail-image').complete")
    shown = page.locator("#detail-image").evaluate("e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height]")
    assert shown[1] / shown[0] == pytest.approx(100 / 200, rel=0.02)  # the scored pixels' shape, under the heatmap
    page.screenshot(path=tmp_path / "turned.png", full_page=True)
    _not_blank(tmp_path / "turned.png")


def test_the_history_tab_lists_audited_verdicts_with_kept_images(page, server, demo_root: Path, tmp_path: Path) -> None:
    import httpx

    test = load_dataset(demo_root).test
    sent = [s.path for s in test if s.label == 1][:2] + [s.path for s in test if s.label == 0][:1]
    inspected = httpx.post(f"{server['url']}/v1/models/part/inspect", timeout=60,
                           files=[("files", (p.name, p.read_bytes(), "image/png")) for p in sent])
    assert {r["verdict"] for r in inspected.json()["results"]} == {"defective", "good"}
    page.click("nav button[data-tab=history]")
    page.wait_for_selector("#history-table tbody tr")
    rows = page.locator("#history-table tbody tr").all_inner_texts()
    assert any("defective" in row for row in rows) and any("good" in row for row in rows)
    page.wait_for_function("[...document.querySelectorAll('#history-table img.kept')].some(i => i.naturalWidth > 0)")
    page.wait_for_function(  # the heatmap behind the verdict, laid over the kept image
        "[...document.querySelectorAll('#history-table img.heat')].some(i => !i.hidden && i.naturalWidth > 0)")
    kept_rows = page.locator("#history-table tbody tr:has(img.kept)").all_inner_texts()
    assert kept_rows and all("defective" in row for row in kept_rows)  # only the chosen verdict's images are kept
    page.screenshot(path=tmp_path / "history.png", full_page=True)  # kept images under their heatmaps
    _not_blank(tmp_path / "history.png")
    page.select_option("#history-verdict", "good")
    page.wait_for_function("[...document.querySelectorAll('#history-table tbody tr')].every(r => r.className === 'good')")
    page.select_option("#history-verdict", "")


def test_model_card_and_review_pages_render(page, tmp_path: Path) -> None:
    page.click("nav button[data-tab=card]")
    page.wait_for_selector("#card-summary dt")
    assert "patchcore" in page.locator("#card-summary").inner_text()
    card = dict(zip(page.locator("#card-summary dt").all_inner_texts(), page.locator("#card-summary dd").all_inner_texts()))
    assert card["rotations"] == "off"  # fitted without a frame search: no probe judged the turns, and the card says so
    assert card["drift"].startswith("drift not judged yet") and "needs 20" in card["drift"]  # a few audited parts so far
    page.wait_for_selector("#versions tbody tr.active")  # the version history, the served file active
    assert "served" in page.locator("#versions tbody tr.active").inner_text()
    page.screenshot(path=tmp_path / "card.png", full_page=True)
    _not_blank(tmp_path / "card.png")
    active = page.locator("#versions tbody tr.active code").inner_text()
    pruned = {"version": "0123456789ab", "sha256": "0" * 64, "parent": None, "action": "served",
              "time": "2026-01-01T00:00:00", "pruned": "2026-02-01T00:00:00"}
    history = {"model": "m", "active": active, "served": active, "activations": [],
               "versions": [pruned, {**pruned, "version": active, "pruned": None, "parent": "0123456789ab"}]}
    page.route("**/versions", lambda route: route.fulfill(json=history))  # a history with a pruned version
    risen = "drift: of the last 500 parts, 88% of the 480 passed score above the training goods' median"
    page.route("**/drift", lambda route: route.fulfill(json={"message": risen, "drifted": True}))
    page.click("nav button[data-tab=inspect]")
    page.click("nav button[data-tab=card]")
    page.wait_for_function("document.querySelector('#versions tbody').innerText.includes('file pruned')")
    assert risen in page.locator("#card-summary").inner_text()  # the card says what the check found
    page.unroute("**/drift")
    assert page.locator("#versions tbody tr:not(.active) .promote").count() == 0  # nothing to make active
    page.locator("#versions").screenshot(path=tmp_path / "pruned.png")
    _not_blank(tmp_path / "pruned.png")
    page.unroute("**/versions")
    older = {**pruned, "version": "00000000beef", "pruned": None}  # promoted on disk; the service serves the older
    page.route("**/versions", lambda route: route.fulfill(json={**history, "served": "00000000beef",
                                                                "versions": [older, *history["versions"]]}))
    page.click("nav button[data-tab=inspect]")
    page.click("nav button[data-tab=card]")
    page.wait_for_function("document.querySelector('#versions-note').innerText.includes('still judges with')")
    assert "served until a reload" in page.locator("#versions tbody").inner_text()
    page.locator("#versions").screenshot(path=tmp_path / "behind.png")
    _not_blank(tmp_path / "behind.png")
    page.unroute("**/versions")
    page.click("nav button[data-tab=review]")
    page.wait_for_selector("#review-list .tile")
    page.wait_for_function("[...document.querySelectorAll('#review-list img')].every(i => i.complete && i.naturalWidth > 0)")
    tiles, boxes = page.locator("#review-list .tile"), page.locator("#review-list input[type=checkbox]")
    defects = page.locator("#review-list .labelled-defect")  # a labelled defect is never offered "mark as good"
    assert defects.count() > 0 and boxes.count() + defects.count() == tiles.count()
    for i in range(tiles.count()):
        tile = tiles.nth(i)
        assert (tile.locator("input[type=checkbox]").count() == 1) != (tile.locator(".labelled-defect").count() == 1)
    page.screenshot(path=tmp_path / "review.png", full_page=True)
    _not_blank(tmp_path / "review.png")


def test_the_evaluation_report_renders_offline(page, report_folder: Path, tmp_path: Path) -> None:
    requests: list[str] = []
    context = page.context.browser.new_context()  # the module's browser (one Playwright per process)
    report = context.new_page()
    try:
        report.on("request", lambda request: requests.append(request.url))
        report.goto((report_folder / "report.html").as_uri())
        report.wait_for_load_state("load")
        images = report.eval_on_selector_all("img", "nodes => nodes.map(n => [n.complete, n.naturalWidth])")
        headers = report.eval_on_selector_all("th", "nodes => nodes.map(n => n.textContent)")
        report.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    finally:
        context.close()
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []  # no external request
    assert len(images) >= 3 and all(complete and width > 0 for complete, width in images)  # every image renders
    assert {"judged good", "judged defective"} <= set(headers)  # the confusion matrix


def test_the_page_hides_what_an_operator_may_not_do(page, server) -> None:
    app = server["app"]
    open_config = app.state.config
    app.state.config = ServiceConfig.from_dict({"token": "engineer-secret", "operator_token": "operator-secret"})
    context = page.context.browser.new_context()  # the module's browser (one Playwright per process)
    shown = {}
    try:
        for token in ("operator-secret", "engineer-secret"):
            view = context.new_page()
            view.goto(server["url"] + "/")
            view.evaluate(f"sessionStorage.setItem('token', '{token}')")
            view.reload()
            view.wait_for_selector("#model option", state="attached")
            view.click("nav button[data-tab=threshold]")
            view.wait_for_function("document.querySelector('#save-threshold').closest('.engineer').hidden !== undefined")
            view.wait_for_timeout(300)
            shown[token] = (view.is_visible("#save-threshold"), view.is_visible("#slider"))
            view.click("nav button[data-tab=card]")
            view.wait_for_selector("#versions tbody tr.active")
            shown[token] += (view.is_visible("#rollback"),)  # promote and roll back are the engineer's too
            view.close()
    finally:
        context.close()
        app.state.config = open_config
    assert shown == {"operator-secret": (False, True, False), "engineer-secret": (True, True, True)}
