"""The status page in a real browser: headless Chromium (Debian's package) driven by Playwright.

Fender runs in-process in front of two replicas (primary priority 0, standby
priority 1, 200 ms health checks); the scenario in tests/support/status_browser.py
kills the primary and trips a breaker from the page and checks that the page
shows both, taking screenshots under the test's tmp_path (the README's
docs/status-page.png is made by the same code: ``python -m tests.status_screenshot``).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.config import parse_policy
from proxy.server.fender import Fender, bind_socket
from tests.conftest import policy_text
from tests.support.status_browser import (
    CHROMIUM_ARGS,
    FEW_POLLS_SECONDS,
    _need_browser,  # noqa: F401
    chromium_path,
    scenario,
)


@pytest.mark.slow
async def test_page_shows_failover_and_an_open_breaker(start_fender, tmp_path):
    _need_browser()
    shot = tmp_path / "status-page.png"
    seen = await scenario(start_fender, shot)
    assert seen.page_errors == []
    assert seen.failover_seen_after <= FEW_POLLS_SECONDS
    assert seen.breaker_seen_after <= FEW_POLLS_SECONDS
    assert seen.breaker_state == "open"
    for path in seen.screenshots:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert seen.screenshots[0] == shot
    # Readable at phone width: the layout reflows instead of scrolling sideways.
    assert seen.phone_overflow <= 0


async def _start_on(text: str, admin_port: int) -> Fender:
    fender = Fender(parse_policy(text, "test-policy.yaml"), "test-policy.yaml")
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", admin_port))
    return fender


@pytest.mark.slow
async def test_banner_while_the_proxy_restarts_and_actions_from_the_page(echo_upstream, tmp_path):
    _need_browser()
    from playwright.async_api import async_playwright

    text = policy_text(echo_upstream.port)
    fender = await _start_on(text, 0)
    admin_port = fender.admin_port
    replica = f"127.0.0.1:{echo_upstream.port}"
    second = None
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1024, "height": 768})
                page.set_default_timeout(15_000)
                dialogs: list[str] = []

                async def answer(dialog):
                    dialogs.append(dialog.message)
                    await dialog.accept()

                page.on("dialog", lambda d: asyncio.ensure_future(answer(d)))
                await page.goto(f"http://127.0.0.1:{admin_port}/")
                r_row = f'tr[data-replica="{replica}"]'
                await page.locator(f'{r_row} .health [data-state="passing"]').wait_for()
                assert await page.locator("#banner").is_hidden()

                # Drain from the page: asks first, then the replica is out of rotation in Fender.
                await page.click(f"{r_row} button:has-text('Drain')")
                await page.locator(f'{r_row} .health [data-state="drained"]').wait_for()
                assert dialogs and dialogs[-1].startswith(f"Drain {replica}?")
                assert fender.runtime.upstreams["echo"].picker.state_of(replica).drained
                await page.click(f"{r_row} button:has-text('Undrain')")
                await page.locator(f'{r_row} .serving [data-state="active"]').wait_for()
                assert not fender.runtime.upstreams["echo"].picker.state_of(replica).drained

                # The proxy goes away: a visible banner, the last figures stay on screen.
                await fender.stop()
                banner = page.locator("#banner")
                await banner.wait_for(state="visible", timeout=FEW_POLLS_SECONDS * 1000)
                assert "Disconnected" in await banner.inner_text()
                assert await page.locator(r_row).count() == 1
                await page.screenshot(path=str(tmp_path / "disconnected.png"))

                # ...and comes back on the same port: the banner goes, the page recovers by itself.
                second = await _start_on(text, admin_port)
                await banner.wait_for(state="hidden", timeout=FEW_POLLS_SECONDS * 1000)
                assert (await page.inner_text("#updated")).startswith("Reconnected")
                await page.locator(f'{r_row} .health [data-state="passing"]').wait_for()
            finally:
                await browser.close()
    finally:
        await fender.stop()
        if second is not None:
            await second.stop()


async def test_rollback_button_asks_first_and_shows_a_failed_reload(start_fender, echo_upstream, tmp_path):
    _need_browser()
    from playwright.async_api import async_playwright

    policy_file = tmp_path / "policy.yaml"
    text = policy_text(echo_upstream.port)
    policy_file.write_text(text)
    fender = Fender(parse_policy(text, str(policy_file)), str(policy_file))
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fender.admin_port}") as admin:
            # A good reload (a second policy to roll back to), then a bad one.
            policy_file.write_text(text.replace("name: all", "name: everything"))
            assert (await admin.post("/admin/reload")).status_code == 200
            policy_file.write_text(text + "bogus_key: 1\n")
            assert (await admin.post("/admin/reload")).status_code == 422
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.set_default_timeout(15_000)
                answers = iter([False, True])  # first "Cancel", then "OK"
                asked: list[str] = []

                async def answer(dialog):
                    asked.append(dialog.message)
                    await (dialog.accept() if next(answers) else dialog.dismiss())

                page.on("dialog", lambda d: asyncio.ensure_future(answer(d)))
                await page.goto(f"http://127.0.0.1:{fender.admin_port}/")
                await page.locator('#policy [data-state="failed"]').wait_for()
                assert "bogus_key" in await page.inner_text("#policy pre.error-text")
                await page.locator('tr[data-route="everything"]').wait_for()

                await page.click("button:has-text('Roll back')")  # cancelled: nothing happens
                await page.click("button:has-text('Roll back')")  # confirmed
                await page.locator('tr[data-route="all"]').wait_for()
                assert len(asked) == 2 and all("Roll back" in q for q in asked)
                assert [r.name for r in fender.runtime.routes] == ["all"]
                assert fender.reloader.status()["applied_by"] == "rollback"
            finally:
                await browser.close()
    finally:
        await fender.stop()
