"""End to end: ``streamlit run`` on 127.0.0.1, driven by Debian's Chromium through Playwright.

Chromium comes from Debian's packages (``make browser``, which ``make test`` runs first); a
browser download at test time is impossible without internet. The page serves the fine-tuned
champion and the fracture detector registered beside it (:func:`tests.test_app.trained_page_for`).
The screenshot of the result lands in ``outputs/app/screenshot.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.servers import free_port
from tests.test_app import APP, TrainedPage, contrast, trained_page_for

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)

CHROMIUM = Path("/usr/bin/chromium")
# This machine (and CI) has no internet: without these Chromium waits on update, sync and
# QUIC connections that never answer. --no-sandbox because tests run as root in containers.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "outputs" / "app" / "screenshot.png"
pytestmark = pytest.mark.integration
#: The page's upload limit, as `streamlit run` reads it from app/.streamlit/config.toml.
UPLOAD_MB = tomllib.loads((APP / ".streamlit" / "config.toml").read_text())["server"]["maxUploadSize"]
RESULT_TIMEOUT_MS = 180_000  # first upload: the server loads the model from the registry


@pytest.fixture(scope="module")
def trained_page(tmp_path_factory: pytest.TempPathFactory) -> TrainedPage:
    return trained_page_for(tmp_path_factory)


@pytest.fixture(scope="module")
def page_url(trained_page: TrainedPage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``streamlit run`` from app/ (so app/.streamlit/config.toml applies) on a free loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained_page.registry.uri,
        "FRACTURE_MODEL_NAME": trained_page.registry.name,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FRACTURE_MODEL_ALIAS", None)
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
             "--server.address", "127.0.0.1", "--server.port", str(port)],
            cwd=APP, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit run exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer on {url} within 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"streamlit log: {log_path}")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(
            f"Debian's Chromium is not installed at {CHROMIUM}; install it with `make browser` "
            "(as root it runs `apt-get install -y chromium`)"
        )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def metric_value(page: object, label: str) -> object:
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")


def colourful_share(png: bytes) -> float:
    """Share of pixels with clear colour (X-rays are grey; the heat map adds colour)."""
    import io

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def box_colour_share(png: bytes) -> float:
    """Share of pixels in the detector's box colour (fracture.explain.BOX_COLOUR, pure green)."""
    import io

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return float(((rgb[..., 1] > 200) & (rgb[..., 0] < 90) & (rgb[..., 2] < 150)).mean())


def test_fractured_xray_shows_fractured_with_probability_heat_map_and_boxes(browser, page_url, trained_page, tmp_path):
    held = trained_page.held_out
    # A held-out fractured X-ray both registered champions call fractured: the classifier, and the
    # detector with at least one box at its threshold.
    both = held[(held["fractured"] == 1) & (held["label"] == "fractured") & (held["boxes"] != "[]")]
    assert len(both), held[["fractured", "label", "fracture_probability", "fracture_score"]]
    fractured = both.sort_values("fracture_probability").iloc[-1]
    xray = Path(fractured["path"])
    registry, detector = trained_page.registry, trained_page.detector
    n_boxes = len(json.loads(fractured["boxes"]))

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(page_url)
        expect = sync_api.expect
        expect(page.get_by_role("heading", name="Bone fracture classification")).to_be_visible(timeout=60_000)
        expect(page.get_by_text(f"Model {registry.name}, version {registry.version}, alias @champion")).to_be_visible(
            timeout=RESULT_TIMEOUT_MS
        )
        # The upload limit from app/.streamlit/config.toml, as the browser enforces it.
        expect(page.get_by_test_id("stFileUploaderDropzoneInstructions")).to_contain_text(f"{UPLOAD_MB}MB per file")

        # The answer is told to a screen reader by a polite live region, on the page before the upload
        # and filled by the result: the same element, as screen readers announce a region's change.
        region = page.locator('[role="status"][aria-live="polite"]')
        expect(region).to_have_count(1)
        expect(region).to_have_text("")
        region.evaluate("region => { region.dataset.beforeUpload = 'yes'; }")

        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(xray))
        expect(metric_value(page, "Predicted class")).to_have_text("Fractured", timeout=RESULT_TIMEOUT_MS)
        expect(metric_value(page, "Fracture probability")).to_have_text(f"{fractured['fracture_probability']:.3f}")
        expect(metric_value(page, "Threshold")).to_have_text(f"{registry.threshold:.3f}")
        said = (f"Predicted class: Fractured. Fracture probability {fractured['fracture_probability']:.3f}, "
                f"threshold {registry.threshold:.3f}.")
        expect(region).to_have_text(f"Upload 1, {xray.name}. {said}")
        assert region.evaluate("region => region.dataset.beforeUpload") == "yes", "the live region was replaced"
        assert region.evaluate("region => region.getBoundingClientRect().width") <= 1  # heard, not seen twice
        # The next X-ray under the same name (IM0001 from another study) and with the same answer: the
        # region's text changes all the same, so it is heard again.
        again = tmp_path / "next-study" / xray.name
        again.parent.mkdir()
        again.write_bytes(xray.read_bytes())
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(again))
        expect(region).to_have_text(f"Upload 2, {xray.name}. {said}", timeout=RESULT_TIMEOUT_MS)
        assert region.evaluate("region => region.dataset.beforeUpload") == "yes", "the live region was replaced"
        assert float(fractured["fracture_probability"]) >= registry.threshold

        original = page.get_by_test_id("stImage").filter(has_text=xray.name)
        heat_map = page.get_by_test_id("stImage").filter(has_text="Grad-CAM heat map for 'Fractured'")
        expect(heat_map.locator("img")).to_be_visible()
        assert heat_map.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
        assert colourful_share(heat_map.locator("img").screenshot()) > 0.02
        assert colourful_share(original.locator("img").screenshot()) < 0.005
        # The detector's boxes with their scores, beside the heat map.
        boxes = page.get_by_test_id("stImage").filter(
            has_text=f"Fracture detector v{detector.version}: {n_boxes} box{'es' if n_boxes > 1 else ''} scored at "
            f"least {detector.threshold:.3f} (highest {fractured['fracture_score']:.3f})"
        )
        expect(boxes.locator("img")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        assert boxes.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
        assert box_colour_share(boxes.locator("img").screenshot()) > 0.002
        assert box_colour_share(heat_map.locator("img").screenshot()) < box_colour_share(boxes.locator("img").screenshot())
        expect(page.get_by_test_id("stSidebar")).to_contain_text("fracture-detector")
        expect(page.get_by_test_id("stException")).to_have_count(0)

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        print(f"screenshot: {SCREENSHOT}")
    finally:
        page.close()
    assert SCREENSHOT.stat().st_size > 10_000


#: What a caption's text looks like on the page: its colour, the opacity it is drawn with (its own
#: and its containers', up to the first with a background of its own) and that background.
SEEN_COLOURS = """caption => {
    const rgba = text => text.match(/[\\d.]+/g).map(Number);
    let alpha = 1, node = caption, background = [255, 255, 255];
    for (; node; node = node.parentElement) {
        const style = getComputedStyle(node);
        alpha *= Number(style.opacity);
        const [r, g, b, a = 1] = rgba(style.backgroundColor);
        if (a === 1) { background = [r, g, b]; break; }
    }
    const [r, g, b, a = 1] = rgba(getComputedStyle(caption).color);
    return {text: caption.innerText, colour: [r, g, b], alpha: alpha * a, background};
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_captions_meet_wcag_aa_contrast_in_the_light_and_the_dark_theme(browser, page_url, trained_page, scheme):
    """The images' captions say what the heat map's colours mean and what the detector found; Streamlit
    drew them at 60% opacity, 3.9:1 on its light theme's white, under WCAG AA's 4.5:1. Measured as
    the browser draws them, in the theme a reader's system asks for."""
    xray = Path(trained_page.held_out["path"].iloc[0])
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, color_scheme=scheme)
    try:
        page.goto(page_url)
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(xray))
        sync_api.expect(page.get_by_test_id("stImageCaption")).to_have_count(3, timeout=RESULT_TIMEOUT_MS)
        # The run over: Streamlit fades what a run has not redrawn yet ("stale") further.
        sync_api.expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
        sync_api.expect(page.locator('[data-stale="true"]')).to_have_count(0)
        seen = [page.get_by_test_id("stCaptionContainer").nth(i).evaluate(SEEN_COLOURS)
                for i in range(page.get_by_test_id("stCaptionContainer").count())]
    finally:
        page.close()
    assert len(seen) >= 3
    ratios = {c["text"][:40]: round(contrast(c["colour"], c["background"], c["alpha"]), 2) for c in seen}
    assert min(ratios.values()) >= 4.5, (scheme, ratios, seen[0])


def test_bad_uploads_get_a_message_and_the_page_keeps_working(browser, page_url, trained_page, tmp_path):
    held = trained_page.held_out
    good = Path(held[held["fractured"] == 0]["path"].iloc[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG\n" * 100)
    too_big = tmp_path / "too-big.png"
    too_big.write_bytes(b"\x89PNG" + bytes((UPLOAD_MB + 1) * 2**20))
    expect = sync_api.expect

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(page_url)
        uploader = page.get_by_test_id("stFileUploaderDropzoneInput")
        expect(uploader).to_be_attached(timeout=RESULT_TIMEOUT_MS)

        uploader.set_input_files(str(broken))
        message = page.get_by_test_id("stAlert").filter(has_text="broken.jpg is not an image file that can be read")
        expect(message).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        expect(page.get_by_test_id("stMetric")).to_have_count(0)

        # Over the configured limit: the browser refuses it before it reaches the server.
        uploader.set_input_files(str(too_big))
        expect(page.get_by_text(f"File must be {UPLOAD_MB}.0MB or smaller")).to_be_visible(timeout=30_000)

        uploader.set_input_files(str(good))
        label = held[held["path"] == str(good)]["label"].iloc[0]
        shown = {"fractured": "Fractured", "not_fractured": "Not fractured"}[label]
        expect(metric_value(page, "Predicted class")).to_have_text(shown, timeout=RESULT_TIMEOUT_MS)
        expect(page.get_by_test_id("stException")).to_have_count(0)
    finally:
        page.close()
