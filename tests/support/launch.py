"""Start an in-process Fender on ephemeral ports: the one place the test fixtures do it."""

from __future__ import annotations

import os

from proxy.clock import SYSTEM_CLOCK
from proxy.config import parse_policy
from proxy.server.fender import Fender, bind_socket


async def launch_fender(text: str, source: str = "test-policy.yaml", clock=None) -> Fender:
    """Parse ``text``, start Fender on 127.0.0.1 ephemeral ports, add ``.url`` and ``.admin_url``.

    FENDER_TEST_ENGINE=granian serves the data listener with granian (tests/test_granian.py).
    """
    engine = os.environ.get("FENDER_TEST_ENGINE") or None
    fender = Fender(parse_policy(text, source), source, clock=clock or SYSTEM_CLOCK, engine=engine)
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    fender.url = f"http://127.0.0.1:{fender.data_port}"
    fender.admin_url = f"http://127.0.0.1:{fender.admin_port}"
    return fender
