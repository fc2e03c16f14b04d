"""Drive the real status page in headless Chromium (Debian's ``chromium``) with Playwright.

Used by tests/test_status_page.py and by ``python -m tests.status_screenshot``, which
writes the documentation's screenshot (docs/status-page.png) through the very same steps.

The scenario: Fender (admin token on) in front of two in-process replicas of one
upstream, ``primary`` (priority 0) and ``standby`` (priority 1), with 200 ms
health checks, and a paced client stream. The page is opened, the token typed
into its form; then the primary is stopped and the page must show it failing
and the standby active; then the page's "Force open" button trips the breaker
and the page must show it open. Screenshots are taken at laptop and phone width.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from proxy.ops.history import TrafficHistory
from tests.conftest import start_asgi, stop_asgi
from tests.support.need import missing

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
TOKEN_ENV = "FENDER_STATUS_PAGE_TOKEN"
TOKEN = "status-page-demo-token-4f1c9a"
# The page polls every 2 s; health checks notice a dead replica in 2 x 200 ms. "A few polls":
FEW_POLLS_SECONDS = 4 * 2.0 + 2.0
MAX_REQUESTS = 3000  # hard bound on the client stream


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


class Replica:
    """A tiny upstream answering with its name; /api/fail answers 500; /catalog is cacheable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = None
        self.port = 0
        self.served = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        path = scope["path"]
        status, body, headers = 200, self.name.encode(), [(b"content-type", b"text/plain")]
        if path.startswith("/api/fail"):
            status = 500
        elif path.startswith("/catalog"):
            headers.append((b"cache-control", b"max-age=60"))
        if path != "/healthz":
            self.served += 1
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def start(self) -> None:
        self.server, self.port = await start_asgi(self)

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await stop_asgi(server)


def policy(primary: Replica, standby: Replica) -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        admin_auth: {{token_env: {TOKEN_ENV}}}
        upstreams:
          orders:
            replicas:
              - {{url: http://127.0.0.1:{primary.port}, priority: 0}}
              - {{url: http://127.0.0.1:{standby.port}, priority: 1}}
            health_check: {{path: /healthz, interval: 200ms, timeout: 150ms, healthy_threshold: 1, unhealthy_threshold: 2}}
        cache: {{max_size: 8MiB}}
        routes:
          - name: orders-api
            match: {{path_prefix: /api}}
            upstream: orders
            timeout: 2s
            retry: {{attempts: 2, retry_on: [connect_failure, reset], budget: {{ratio: 50%}}}}
            circuit_breaker: {{scope: route, consecutive_failures: 50, open_for: 60s}}
          - name: catalog
            match: {{path_prefix: /catalog}}
            upstream: orders
            cache: {{}}
        """
    )


class Traffic:
    """A bounded, paced client stream: mostly /api/orders, some /api/fail (500), some cached /catalog."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=3) as client:
            while not self.stop.is_set() and self.sent < MAX_REQUESTS:
                n = self.sent
                path = (
                    "/api/fail" if n % 12 == 5 else f"/catalog/item/{n % 4}" if n % 3 == 0 else "/api/orders"
                )
                try:
                    await client.get(path)
                except httpx.HTTPError:
                    pass
                self.sent += 1
                try:
                    # Pacing of the synthetic load, not synchronisation: stop() ends it at once.
                    await asyncio.wait_for(self.stop.wait(), 0.04)
                except TimeoutError:
                    pass


@dataclass
class Observations:
    failover_seen_after: float = 0.0  # seconds from stopping the primary to the page showing it
    breaker_seen_after: float = 0.0  # seconds from clicking "Force open" to the page showing "open"
    breaker_state: str = ""  # the breaker's state in the running Fender afterwards
    screenshots: list[Path] = field(default_factory=list)
    phone_overflow: int = 0  # horizontal overflow in CSS pixels at 375 px width
    page_errors: list[str] = field(default_factory=list)


def row(kind: str, name: str) -> str:
    return f'tr[data-{kind}="{name}"]'


async def scenario(start: Callable[[str], Awaitable], screenshot: Path) -> Observations:
    """Run the scenario; ``start(policy_text)`` starts Fender (and stops it later); writes ``screenshot``."""
    from playwright.async_api import async_playwright, expect

    os.environ[TOKEN_ENV] = TOKEN
    out = Observations()
    primary, standby = Replica("primary"), Replica("standby")
    await primary.start()
    await standby.start()
    traffic_task = None
    try:
        fender = await start(policy(primary, standby))
        # Sample every 0.5 s instead of 5 s so the sparklines fill within the test's few seconds.
        await fender.history.stop()
        fender.history = TrafficHistory(fender.metrics, fender.clock, interval=0.5, span=30.0)
        fender.history.start()
        traffic = Traffic(fender.url)
        traffic_task = asyncio.create_task(traffic.run())
        primary_name = f"127.0.0.1:{primary.port}"
        standby_name = f"127.0.0.1:{standby.port}"

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                page = await context.new_page()
                page.set_default_timeout(15_000)
                page.on("pageerror", lambda exc: out.page_errors.append(str(exc)))
                page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
                await page.goto(fender.admin_url + "/")

                # The admin token is asked for once, then kept in sessionStorage.
                await page.locator("#login").wait_for(state="visible")
                await page.fill("#token", TOKEN)
                await page.click("#login button[type=submit]")
                await page.locator("#login").wait_for(state="hidden")

                p_row, s_row = row("replica", primary_name), row("replica", standby_name)
                await page.locator(f'{p_row} .health [data-state="passing"]').wait_for()
                await page.locator(f'{p_row} .serving [data-state="active"]').wait_for()
                await page.locator(f'{s_row} .serving [data-state="standby"]').wait_for()

                # Kill the primary: its row turns failing, the standby's active, within a few polls.
                await primary.stop()
                killed = time.monotonic()
                await page.locator(f'{p_row} .health [data-state="failing"]').wait_for(
                    timeout=FEW_POLLS_SECONDS * 1000
                )
                await page.locator(f'{s_row} .serving [data-state="active"]').wait_for(
                    timeout=FEW_POLLS_SECONDS * 1000
                )
                out.failover_seen_after = time.monotonic() - killed

                # Trip the breaker from the page (it asks first; the dialog handler accepts).
                b_row = row("breaker", "orders-api")
                await page.locator(f'{b_row} .state [data-state="closed"]').wait_for()
                clicked = time.monotonic()
                await page.click(f"{b_row} button:has-text('Force open')")
                await page.locator(f'{b_row} .state [data-state="open"]').wait_for(
                    timeout=FEW_POLLS_SECONDS * 1000
                )
                out.breaker_seen_after = time.monotonic() - clicked
                from proxy.policies.breaker.layer import breakers

                out.breaker_state = next(
                    b.snapshot()["state"] for b in breakers(fender.runtime.exposed) if b.name == "orders-api"
                )

                # Let the sparklines and the error spike of the open breaker show, then take the pictures.
                spark = page.locator('tr[data-route="orders-api"] svg.spark')
                await expect(spark).to_have_attribute(
                    "data-points", re.compile(r"^(1[6-9]|[2-9][0-9])$"), timeout=15_000
                )
                await page.locator('tr[data-route="orders-api"] .errors [data-state]').wait_for()
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(screenshot), full_page=True)
                out.screenshots.append(screenshot)

                await page.set_viewport_size({"width": 375, "height": 812})
                await page.locator(f'{p_row} .health [data-state="failing"]').wait_for()
                out.phone_overflow = await page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                phone = screenshot.with_name(screenshot.stem + "-375px.png")
                await page.screenshot(path=str(phone), full_page=True)
                out.screenshots.append(phone)
            finally:
                await browser.close()
    finally:
        if traffic_task is not None:
            traffic.stop.set()
            await asyncio.wait_for(traffic_task, 10)
        await primary.stop()
        await standby.stop()
    return out


def _need_browser():
    why = None
    if chromium_path() is None:
        why = "chromium not installed: apt-get install chromium"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            why = "playwright not installed: pip install 'playwright>=1.40' (never `playwright install`)"
    if why is not None:
        missing(why)
