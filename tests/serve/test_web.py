"""The web page at ``/`` in headless Chromium (Debian's package, driven by Playwright): type a
prompt, see the job's progress move, and the page's video element plays the result."""

from __future__ import annotations

import shutil

import pytest

from vidloom.serve.app import ServeSettings, create_app

from .test_api import Server

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is needed for the browser test: `make test` installs Debian's chromium package"
    return path


@pytest.fixture(scope="module")
def page_server(tiny_generator, tmp_path_factory):
    s = Server(create_app(tiny_generator, ServeSettings(model_name="tiny-wan",
                                                        data_dir=tmp_path_factory.mktemp("web"), poll_after_ms=50)))
    yield s
    s.stop()


def test_submit_watch_progress_and_play(page_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_server.url + "/")
            # the page fills it from its own fetch of /v1/models: waited for (read at once, a busy
            # machine answered after the read)
            expect(page.locator("#model")).to_have_text("tiny-wan")
            page.fill("#prompt", "a red circle moving left")
            page.fill("#size", "48x32")
            page.fill("#steps", "400")  # long enough to watch the progress move (the page polls every 0.5 s)
            page.click("#submit")
            job = page.locator("article.job").first
            job.wait_for(timeout=30_000)
            page.wait_for_function("() => document.querySelector('article.job progress').value > 0 && "
                                   "document.querySelector('article.job progress').value < 100", timeout=60_000)
            page.wait_for_function("() => document.querySelector('article.job .status').textContent === 'completed'",
                                   timeout=120_000)
            video = job.locator("video")
            video.wait_for(timeout=30_000)
            page.wait_for_function("() => { const v = document.querySelector('article.job video');"
                                   " return v && v.readyState >= 2 && v.duration > 0 && v.videoWidth === 48; }",
                                   timeout=30_000)
            page.wait_for_function("() => document.querySelector('article.job video').currentTime > 0", timeout=30_000)
            assert job.locator("a[download]").get_attribute("download").endswith(".mp4")
            # a bad request shows its reason in the page
            page.fill("#size", "47x32")
            page.click("#submit")
            page.wait_for_function("() => document.querySelector('#error').textContent.includes('width')",
                                   timeout=30_000)
        finally:
            browser.close()
