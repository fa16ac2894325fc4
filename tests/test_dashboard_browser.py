"""The dashboard in real headless Chromium (Debian's package) driven by Playwright, against a real service.

The page loads from a running ``multibroker serve``, shows an account and a position after a signal, and updates
live after a second signal without a reload (a marker set on ``window`` survives); the test saves a screenshot.
The schedule file is left out of the rules so the test does not depend on the time of day.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_serve_e2e import Server, request

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def service(tmp_path: Path, rules_dir: Path):
    (rules_dir / "schedule.yaml").unlink()
    server = Server(tmp_path, rules_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_shows_accounts_positions_and_updates_live(service: Server) -> None:
    from playwright.sync_api import expect, sync_playwright

    secret = (service.data / "webhook-secret").read_text().strip()
    token = (service.data / "admin-token").read_text().strip()
    first = {"secret": secret, "strategy": "es-scalper", "ticker": "MES1!", "action": "buy", "quantity": 1,
             "id": "dash-1"}
    status, answer = request(f"{service.url}/webhook", body=first)
    assert status == 202 and answer["decision"]["accepted"], answer

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(service.url + "/")
            page.fill("#token", token)
            page.click("#login button[type=submit]")
            expect(page.locator("#accounts tr[data-account='apex-1']")).to_be_visible(timeout=10_000)
            expect(page.locator("#positions tr[data-position^='apex-1:MES']")).to_be_visible(timeout=10_000)
            expect(page.locator("#live")).to_have_text("live", timeout=10_000)
            page.evaluate("window.__notReloaded = true")
            row = page.locator("#positions tr[data-position^='apex-1:MES'] td:nth-child(4)")
            expect(row).to_have_text("1")

            second = {**first, "id": "dash-2", "quantity": 2}
            status, answer = request(f"{service.url}/webhook", body=second)
            assert status == 202, answer
            expect(row).to_have_text("3", timeout=10_000)  # 1 + 2, pushed over the stream
            # The signal shows with its decision record: which accounts got an order and why.
            signal = page.locator(f".signal[data-signal='{answer['signal_id']}']")
            expect(signal).to_be_visible(timeout=10_000)
            expect(signal.locator("summary")).to_contain_text("es-scalper")
            expect(signal.locator("li").first).to_contain_text("buy 2")
            expect(signal.locator("li[data-rules]")).to_contain_text("decided by rules generation 1 (")
            assert page.evaluate("window.__notReloaded") is True

            # Controls ask for confirmation and carry the token: pause a broker from the page.
            page.click("#brokers tr[data-broker='paper-slow'] button[data-action='pause']")
            expect(page.locator("#brokers tr[data-broker='paper-slow'] .pill")).to_have_text("paused", timeout=10_000)
            expect(page.locator("#attention")).to_contain_text("none")
            # A signal while it is paused: its mirror order there is missed, and the page says so on top.
            status, answer = request(f"{service.url}/webhook", body={**first, "id": "dash-3"})
            assert status == 202, answer
            missed = page.locator("#attention tr[data-order]")
            expect(missed).to_have_count(1, timeout=10_000)
            expect(missed).to_contain_text("topstep-1")
            expect(missed).to_contain_text("behind its strategy")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_data_needs_the_token(service: Server) -> None:
    import urllib.error
    import urllib.request

    assert request(f"{service.url}/api/dashboard")[0] == 401
    with urllib.request.urlopen(f"{service.url}/", timeout=5) as r:  # the page itself holds no data
        html = r.read().decode()
    assert r.status == 200 and "/assets/dashboard.js" in html
    assert "http://" not in html and "https://" not in html  # no CDN: everything ships with the package
    for name in ("..%2Fdashboard.py", "index.html", "nope.js"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{service.url}/assets/{name}", timeout=5)
        assert exc.value.code == 404
        exc.value.close()
