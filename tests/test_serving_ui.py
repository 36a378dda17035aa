"""The web page in a real headless browser: Debian's chromium (apt; `make test` installs it) driven by
Playwright through `executable_path` (never `playwright install`). Upload an image, see the model's label."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tasks import registry
from tests.test_serving import make_registry, start

pytestmark = pytest.mark.slow

def png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (64, 48), level).save(buf, "PNG")
    return buf.getvalue()


def test_upload_images_in_the_page_and_see_the_models_labels(browser, tmp_path):
    reg = make_registry(tmp_path / "registry", tmp_path)
    server = start(reg, "--poll-s", "0.1")
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model-version').textContent === 'v0001'")
        assert page.text_content("#model-classes") == "bright, dark"
        assert "uint8 RGB 32x32" in page.text_content("#model-input")
        # this toy model was exported without an embedding: the page says it is not monitored for drift, and why
        assert "not monitored: model.onnx has no 'embedding' output" in page.text_content("#drift-status")
        page.set_input_files("#files", files=[
            {"name": "white.png", "mimeType": "image/png", "buffer": png(250)},
            {"name": "black.png", "mimeType": "image/png", "buffer": png(5)},
            {"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"},
        ])
        white = page.wait_for_selector('.result[data-filename="white.png"][data-label]')
        black = page.wait_for_selector('.result[data-filename="black.png"][data-label]')
        broken = page.wait_for_selector('.result[data-filename="broken.png"][data-error]')
        assert white.get_attribute("data-label") == "bright" and black.get_attribute("data-label") == "dark"
        assert white.get_attribute("data-version") == "v0001"
        assert "upload broken.png: cannot decode" in broken.text_content()
        assert "%" in white.text_content()  # the top-k probabilities are shown

        registry.promote(reg, "2")  # a hot swap shows up in the page without a reload
        page.wait_for_function("document.getElementById('model-version').textContent === 'v0002'", timeout=30_000)
        page.set_input_files("#files", files=[{"name": "grey.png", "mimeType": "image/png", "buffer": png(100)}])
        grey = page.wait_for_selector('.result[data-filename="grey.png"][data-label]')
        assert grey.get_attribute("data-label") == "bright" and grey.get_attribute("data-version") == "v0002"
        page.screenshot(path=str(tmp_path / "page.png"))
    finally:
        page.close()
        server.stop()
        server.cleanup()


def test_the_page_shows_the_drift_state_and_an_alarm(browser, tmp_path):
    """A model exported with its drift reference: the page shows the window and the last test, then the alarm."""
    import httpx

    from tasks import drift
    from tests.test_drift import images, monitored_model

    reg = tmp_path / "registry"
    registry.register(reg, {"model.onnx": monitored_model(tmp_path / "m"),
                            drift.REFERENCE_FILE: tmp_path / "m" / drift.REFERENCE_FILE}, {})
    registry.promote(reg, "1")
    server = start(reg, "--poll-s", "0", "--drift-window", "20", "--drift-every", "10")
    page = browser.new_page()

    def send(batch) -> None:
        for x in batch:
            buf = io.BytesIO()
            Image.fromarray(x[0]).save(buf, "PNG")
            assert httpx.post(server.url + "/api/predict", files={"files": ("x.png", buf.getvalue())}).status_code == 200

    try:
        send(images(20, seed=40))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('drift-status').textContent === 'no drift detected'")
        assert "20/20 images, a test every 10" in page.text_content("#drift-window")
        assert "p-values: embedding" in page.text_content("#drift-last")
        assert ", image " in page.text_content("#drift-last")  # the image statistics detector's p-value
        send(images(40, seed=41, noise=70.0))
        page.wait_for_function("document.getElementById('drift-status').textContent === 'DRIFT DETECTED'",
                               timeout=30_000)
        assert page.text_content("#drift-alarms").startswith("1 (last: ")
    finally:
        page.close()
        server.stop()
        server.cleanup()
