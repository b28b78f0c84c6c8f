"""t2vz-app in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright; no browser download)
opens the page, generates on the toy model, checks that the video plays and the seed shown is the one asked, that
the "How it was made" section is there, collapsed, and opens on the generation's trace sheet, that `python -m t2vz`
with the command line the page shows gives the same frames and trace sheet, that a bad value is shown as the
command line's one-line error, that a screenshot of the page is not blank, and that an uploaded picture is kept in
the run folder the command line names.

Skipped only where no `chromium` executable exists (.ci/run installs it). T2VZ_APP_SCREENSHOT=PATH also saves the
screenshot there (docs/images/app.png is made so)."""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser here: install Debian's chromium "
                                "(apt-get install chromium; .ci/run does) to drive the app in a browser")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 180_000  # a toy generation takes seconds; the first one also loads the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app started as a user starts it (`python -m t2vz.app`), on a free port; yields (url, outputs)."""
    pytest.importorskip("gradio")
    root = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                "2")}
    proc = subprocess.Popen([sys.executable, "-m", "t2vz.app", "--port", str(port), "--outputs", str(root / "out"),
                             "--models", str(root / "models")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if url in line:
                break
            assert line or proc.poll() is None, f"the app exited with {proc.poll()}"
        else:
            pytest.fail("the app did not start within 120 s")
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app[0])
        yield page
        browser.close()


def status_after_generate(page, progress: bool = False) -> str:
    """Press Generate and wait for the status line of this generation (it is cleared first); with `progress`, also
    for the progress bar to show a DDIM phase and its steps on the way."""
    status = page.locator("#generate-status textarea")
    page.evaluate("() => { const s = document.querySelector('#generate-status textarea'); s.value = ''; }")
    page.locator("#generate-generate").click()
    if progress:
        page.wait_for_function("() => /DDIM \\(.*\\d+\\/\\d+ steps/s.test(document.body.innerText)")
    page.wait_for_function("() => document.querySelector('#generate-status textarea').value.startsWith('t2vz:')")
    return status.input_value()


def test_generate_in_the_browser_then_reproduce_and_error(app, page, tmp_path):
    page.locator("#generate-prompt textarea").fill("a red circle on grass")
    page.locator("#generate-seed input").fill("5")
    page.locator("#generate-video-num_frames input").fill("4")
    page.get_by_text("Advanced options").first.click()
    page.locator("#generate-sampler-num_inference_steps input").fill("20")
    page.locator("#generate-method-direction-1 input").fill("0")
    status = status_after_generate(page, progress=True)  # the bar follows the DDIM steps
    assert status.startswith("t2vz: wrote video.mp4"), status

    # the video element has a source the browser can play: its metadata loaded, 4 frames at 4 fps, 64 px wide
    page.wait_for_function("() => { const v = document.querySelector('#generate-output video');"
                           " return v && v.src && v.readyState >= 1; }")
    duration, width, error = page.evaluate("() => { const v = document.querySelector('#generate-output video');"
                                           " return [v.duration, v.videoWidth, v.error]; }")
    assert error is None and width == 64 and duration == pytest.approx(1.0, abs=0.3)
    assert page.locator("#generate-seed-used textarea").input_value() == "5"
    command = page.locator("#generate-command textarea").input_value()
    assert command.startswith("t2vz ") and "seed=5" in shlex.split(command)
    assert "trace=true" in shlex.split(command)  # "Show how it was made" starts on for the toy model

    shot = tmp_path / "app.png"
    # a frame of the video decoded (HAVE_CURRENT_DATA), so the player is not still empty when the shot is taken:
    # metadata alone (readyState 1, above) once left the player blank in the screenshot
    page.wait_for_function("() => document.querySelector('#generate-output video').readyState >= 2")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=False)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the screenshot is blank"
    if os.environ.get("T2VZ_APP_SCREENSHOT"):
        Image.open(shot).convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(
            os.environ["T2VZ_APP_SCREENSHOT"], optimize=True)

    # "How it was made": shown after the generation, collapsed (the video stays first), and opened it holds the
    # generation's trace sheet
    run_dir = Path(status.rsplit(" to ", 1)[1])
    section = page.locator("#generate-trace-section")
    assert section.is_visible() and not page.locator("#generate-trace-sheet img").is_visible()
    section.get_by_text("How it was made").first.click()
    page.wait_for_function("() => { const i = document.querySelector('#generate-trace-sheet img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    size = page.evaluate("() => { const i = document.querySelector('#generate-trace-sheet img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert tuple(size) == Image.open(run_dir / "trace.png").size

    # the command line the page shows gives the same frames (the contact sheet holds every frame, lossless) and the
    # same trace sheet
    out = subprocess.run([sys.executable, "-m", "t2vz", *shlex.split(command)[1:], f"hydra.run.dir={tmp_path}/cli"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("video_sheet.png", "trace.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(run_dir / name)),
                                      np.asarray(Image.open(tmp_path / "cli" / name)))

    # a height that is not a multiple of 8: the command line's one-line message, in the page
    page.locator("#generate-video-height textarea, #generate-video-height input").first.fill("36")
    error = status_after_generate(page)
    assert error.startswith("t2vz: error: video.height=36 must be a positive multiple of 8"), error
    assert "\n" not in error and "Traceback" not in page.content()


def test_image_to_video_in_the_browser(app, page, tmp_path):
    """An uploaded picture: the run folder keeps it as image.png, the command line shown names that file, and
    frame 1 of the video is close to it."""
    import json

    from t2vz.toyworld.world import render, sample_scene

    picture = render(sample_scene(np.random.default_rng(0), background="grass", things=[("red", "circle")]))
    Image.fromarray(picture).save(tmp_path / "scene.png")
    page.locator("#generate-prompt textarea").fill("a red circle on grass")
    page.locator("#generate-video-num_frames input").fill("3")
    height = page.locator("#generate-video-height textarea, #generate-video-height input").first
    if not height.is_visible():
        page.get_by_text("Advanced options").first.click()
    height.fill("")  # the earlier test's bad height, if it ran
    page.locator("#generate-sampler-num_inference_steps input").fill("10")
    page.locator("#generate-image input[type=file]").set_input_files(str(tmp_path / "scene.png"))
    status = status_after_generate(page)
    assert status.startswith("t2vz: wrote video.mp4"), status
    run_dir = Path(status.rsplit(" to ", 1)[1])
    command = shlex.split(page.locator("#generate-command textarea").input_value())
    assert f"image={(run_dir / 'image.png').resolve()}" in command, command
    np.testing.assert_array_equal(np.asarray(Image.open(run_dir / "image.png")), picture)
    assert json.loads((run_dir / "run.json").read_text())["first_frame_error"] < 12
