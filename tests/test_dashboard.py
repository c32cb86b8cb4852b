"""The dashboard in a real headless browser (Debian's chromium through Playwright): it loads with
no network beyond the gateway, and its queue depth follows jobs as they are enqueued behind a busy
worker. Saves a screenshot in the test's temporary directory; with `UPDATE_DOCS=1`, also as
docs/dashboard.png (so a plain test run leaves the checkout clean)."""

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Gateway
from tests.test_operations import (
    HEARTBEAT,
    Requests,
    assert_cancelled,
    busy_job,
    cancel_running_job,
    running_job,
    scrape,
    script,
    wait_for,
)

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright never downloads a browser here
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


def test_dashboard_shows_queue_depth_change_live(start_gateway: Any, tmp_path: Path) -> None:
    chromium = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if chromium is None:
        pytest.skip("no browser: install Debian's chromium (apt-get install chromium) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", JOBS_PER_WORKER="1", **HEARTBEAT)
    wait_for(lambda: scrape(gateway)["gateway_workers_alive"] == 1, 20, "the worker's first heartbeat")

    outside_requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.on(
                "request",
                lambda r: None if r.url.startswith(gateway.url) else outside_requests.append(r.url),
            )
            page.goto(f"{gateway.url}/dashboard?every=0.25")
            page.wait_for_function("document.getElementById('workers-alive').textContent === '1'")
            assert page.text_content("#queue-depth") == "0"

            requests = Requests(gateway)
            requests.send(busy_job())
            page.wait_for_function("document.getElementById('running').textContent === '1 / 1'")
            for n in range(3):
                requests.send(script(text=f"queued {n}"))
            page.wait_for_function(
                "document.getElementById('queue-depth').textContent === '3'", timeout=20_000
            )
            page.wait_for_timeout(1500)  # a little history on the chart
            worker_row = page.text_content("#workers") or ""
            assert f"{gateway.workers[0].pid}" in worker_row
            assert "1/1" in worker_row
            depths = page.evaluate("samples.map((s) => s.depth)")
            assert depths[0] == 0
            assert depths[-1] == 3
            assert len(page.get_attribute("#depth-line", "points").split()) == len(depths)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
            if os.environ.get("UPDATE_DOCS") == "1":
                shutil.copyfile(tmp_path / "dashboard.png", ROOT / "docs" / "dashboard.png")

            cancel_running_job(gateway, running_job(gateway))
            busy, *queued = requests.join()
            assert_cancelled(busy)
            assert [r.status_code for r in queued] == [200] * 3
            page.wait_for_function("document.getElementById('queue-depth').textContent === '0'")
            page.wait_for_function("document.getElementById('running').textContent === '0 / 1'")
        finally:
            browser.close()
    assert outside_requests == []  # self-contained: nothing fetched from anywhere else
