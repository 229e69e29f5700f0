"""The demo page (`capdiff demo`) in a real headless browser: Debian's Chromium driven by Playwright.

The page is served on a free localhost port for the session's trained smoke checkpoint. Where Chromium or
Playwright cannot start the tests skip, saying why; under CI (`CI=true`, after .ci/install-browser) they fail.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from tests.helpers import skip_or_fail

# Gradio's queue builds its local event statistics with pandas options that pandas 3 deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:DeprecationWarning"),
]

CHROMIUM = Path("/usr/bin/chromium")
# Playwright passes --headless, --no-sandbox (no Chromium sandbox as root) and a fresh --user-data-dir itself;
# these keep Chromium from reaching for the network on its own (updates, sync, field trials) on a machine
# that has none.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # one caption or a 2-step generation takes a second or two; a loaded CI machine, more


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo page for the trained checkpoint, served in this process (2 DDIM steps by default)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads and outputs
        try:
            from capdiff.demo import launch
        except ImportError as err:
            skip_or_fail(f"gradio is not installed ({err}): make install (EXTRAS with demo)")
        from capdiff.pipeline import Pipeline

        page = launch(
            Pipeline.from_checkpoint(trained_checkpoint, device="cpu"), port=free_port(), block=False, steps=2
        )
        try:
            yield page.local_url
        finally:
            page.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as err:
        skip_or_fail(f"playwright is not installed ({err}): make install (EXTRAS with dev)")
    if not CHROMIUM.is_file():
        skip_or_fail(f"no Chromium at {CHROMIUM}: run .ci/install-browser (apt-get install chromium, as root)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Error as err:
            skip_or_fail(f"Chromium cannot start here: {str(err).strip().splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, demo_url: str):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlsplit(request.url).netloc))  # "" for data: and blob:
    page.goto(demo_url)
    yield page
    page.close()
    # Everything the page loads comes from the demo server: no fonts, scripts or analytics from elsewhere.
    assert hosts <= {urlsplit(demo_url).netloc, ""}, hosts


def image_size(page, selector: str) -> tuple[int, int]:
    """The natural size of the first image under `selector`, once it has loaded (0×0 when it fails to)."""
    image = page.locator(f"{selector} img").first
    image.wait_for()
    page.wait_for_function("image => image.complete", arg=image.element_handle())
    return tuple(image.evaluate("image => [image.naturalWidth, image.naturalHeight]"))


def test_the_caption_tab_captions_an_uploaded_image(page, tmp_path: Path) -> None:
    upload = tmp_path / "red.png"
    Image.new("RGB", (48, 40), (220, 30, 30)).save(upload)
    page.locator("#caption-image input[type=file]").set_input_files(upload)
    page.locator("#caption-image img").wait_for()  # the upload is shown before it is captioned
    page.click("#caption-run")
    page.wait_for_function("document.querySelector('#caption-text textarea').value.trim().length > 0")
    assert page.input_value("#caption-text textarea").strip()


def test_the_generate_tab_shows_the_generated_images(page) -> None:
    page.get_by_role("tab", name="Generate").click()
    page.fill("#generate-prompt textarea", "a large red circle in the center on a white background")
    page.click("#generate-run")
    assert image_size(page, "#generate-gallery") == (32, 32)  # the smoke model's size, loaded from the server
    assert page.locator("#generate-gallery img").count() == 4  # the "Images" slider's default


def test_the_edit_tab_shows_the_edited_image(page, tmp_path: Path) -> None:
    upload = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (30, 30, 220)).save(upload)
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-image input[type=file]").set_input_files(upload)
    page.fill("#edit-prompt textarea", "a small green square in the top left on a white background")
    page.get_by_label("SDEdit", exact=True).check()
    page.click("#edit-run")
    assert image_size(page, "#edit-result") == (32, 32)
