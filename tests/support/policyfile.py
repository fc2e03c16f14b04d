"""Helpers for tests that run Fender on a policy file: where a text sits in it, and a fixture that reloads."""

from __future__ import annotations

import pytest

from proxy.clock import SYSTEM_CLOCK
from proxy.config import load_policy
from proxy.server.fender import Fender, bind_socket


def at(text: str, needle: str, occurrence: int = 0) -> str:
    """``drill.yaml:LINE:COL`` of ``needle`` in ``text`` (1-based, as the loader reports)."""
    index = -1
    for _ in range(occurrence + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"drill.yaml:{line}:{column}"


@pytest.fixture
async def fenders(tmp_path):
    """Fender on a policy file (so it can reload); stopped at the end."""
    started: list[Fender] = []

    async def start(text: str) -> Fender:
        path = tmp_path / f"policy-{len(started)}.yaml"  # one file per Fender: each reloads its own
        path.write_text(text)
        fender = Fender(load_policy(path), str(path), clock=SYSTEM_CLOCK)
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        fender.url = f"http://127.0.0.1:{fender.data_port}"
        fender.admin_url = f"http://127.0.0.1:{fender.admin_port}"
        fender.path = path
        started.append(fender)
        return fender

    async def reload(fender: Fender, text: str) -> None:
        fender.path.write_text(text)
        attempt = await fender.reloader.reload("api")
        assert attempt.result == "applied", attempt.errors

    start.reload = reload
    yield start
    for fender in started:
        await fender.stop()
