"""The web UI of `meteor serve` in a real browser: headless Chromium from Debian's `chromium` package,
driven by Playwright with that system browser (nothing is downloaded). It opens /ui, uploads an
image, asks, and sees the answer and the kept-patch picture; then asks again at another K′.
The screenshot is saved in the test's folder (and copied to $METEOR_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from talk_helpers import data_url, meteor_server, noise_image, png_bytes, save_talkative_model

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions"]
"""Headless Chromium as root, and nothing that reaches for the (closed) network. Playwright gives
each launch a fresh user-data directory."""


def system_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium") if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser():
    path = system_chromium()
    if path is None:
        message = ("no system Chromium: install Debian's chromium package (apt-get install -y chromium, as "
                   ".ci/run does) to run the browser test")
        print(f"SKIPPED: {message}")
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_the_web_ui_answers_and_shows_the_kept_patches(browser, tmp_path):
    import httpx

    pytest.importorskip("gradio")
    model_dir = save_talkative_model(tmp_path / "tiny")
    image = noise_image(7, (168, 112))
    picture = tmp_path / "upload.png"
    image.save(picture)
    with meteor_server(model_dir, ["--model-name", "tiny", "--batch-window-ms", "5"]) as (base, _, log):
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        outside = []
        page.on("request", lambda request: outside.append(request.url)
                if not request.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        page.goto(f"{base}/ui/", wait_until="load", timeout=120_000)
        page.locator("#meteor-image input[type=file]").set_input_files(str(picture))
        page.wait_for_selector("#meteor-image img", timeout=60_000)
        length = page.locator("#meteor-max-tokens input[type=number]")
        length.fill("12")
        length.press("Enter")
        page.locator("#meteor-question textarea").fill("What is in the image?")
        page.locator("#meteor-send").click()
        page.wait_for_selector("#meteor-selection img", timeout=120_000)
        page.wait_for_function("document.querySelector('#meteor-stats').innerText.includes('visual tokens')",
                               timeout=60_000)
        stats = page.locator("#meteor-stats").inner_text()
        chat = page.locator("#meteor-chat").inner_text()
        loaded = page.evaluate("Array.from(document.querySelectorAll('#meteor-selection img, #meteor-chat img'))"
                               ".map(img => [img.complete, img.naturalWidth, img.naturalHeight])")
        shot = tmp_path / "meteor-ui.png"
        page.screenshot(path=str(shot), full_page=True)

        # the same question through the API: the UI answered with the model's greedy tokens
        api = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in the image?"},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]}]}).json()

        # a second question at K′ = 2 (the slider's number box)
        box = page.locator("#meteor-tokens-per-slice input[type=number]")
        box.fill("2")
        box.press("Enter")
        page.locator("#meteor-question textarea").fill("And the colours?")
        page.locator("#meteor-send").click()
        page.wait_for_function("document.querySelector('#meteor-stats').innerText.includes('K′=2 per view')",
                               timeout=120_000)
        second = page.locator("#meteor-stats").inner_text()
        page.screenshot(path=str(tmp_path / "meteor-ui-k2.png"), full_page=True)
        page.close()
        server_log = log.read_text()

    print(f"screenshots: {shot} and {tmp_path / 'meteor-ui-k2.png'}")
    if os.environ.get("METEOR_TEST_ARTIFACTS"):
        folder = Path(os.environ["METEOR_TEST_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / shot.name)
    assert shot.stat().st_size > 20_000
    assert "What is in the image?" in chat
    assert api["choices"][0]["message"]["content"].strip()
    assert loaded and all(done and width > 100 and height > 100 for done, width, height in loaded), loaded
    # 6 slices + global at K = 4; the answer's token count is the API's for the same request
    assert "28 visual tokens (K′=4 per view)" in stats
    assert re.search(rf"\b{api['usage']['completion_tokens']} answer tokens", stats), (stats, api["usage"])
    assert "14 visual tokens (K′=2 per view)" in second, second       # the same image, re-laid out at K′ = 2
    assert outside == [], outside                                    # nothing fetched from the internet
    assert "batch of 1" in server_log
