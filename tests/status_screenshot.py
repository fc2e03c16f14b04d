"""Write the status page screenshot of docs/admin.md: ``python -m tests.status_screenshot [PATH]``.

Runs the browser test's scenario (tests/support/status_browser.py) against an
in-process Fender and writes the laptop-width screenshot to PATH
(docs/status-page.png by default). Needs Debian's chromium and playwright.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from proxy.config import parse_policy
from proxy.server.fender import Fender, bind_socket
from tests.support.status_browser import scenario


async def main(path: Path, workdir: Path):
    started: list[Fender] = []

    async def start(text: str) -> Fender:
        source = workdir / "fender.yaml"  # a real file, so the page can say the policy matches it
        source.write_text(text)
        fender = Fender(parse_policy(text, str(source)), str(source))
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        fender.url = f"http://127.0.0.1:{fender.data_port}"
        fender.admin_url = f"http://127.0.0.1:{fender.admin_port}"
        started.append(fender)
        return fender

    try:
        seen = await scenario(start, path)
    finally:
        for fender in started:
            await fender.stop()
    return seen


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png")
    with tempfile.TemporaryDirectory() as tmp:
        seen = asyncio.run(main(target, Path(tmp)))
    seen.screenshots[1].unlink()  # the phone-width picture is for the test only
    print(f"{target}: {target.stat().st_size} bytes; failover shown after {seen.failover_seen_after:.1f}s")
