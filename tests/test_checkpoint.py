"""Checkpoints: providers registered by policy modules, atomic writes, robust restore."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import textwrap
import time

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.config import parse_policy
from proxy.kernel.handover import CheckpointProviders
from proxy.ops.checkpoint import FORMAT, write_atomically
from proxy.server.fender import Fender, bind_socket


class Breakerish:
    """A stand-in for a stateful runtime object (a breaker): open until a wall-clock time."""

    def __init__(self, settings: str) -> None:
        self.settings = settings
        self.open_until = 0.0
        self.restored_from: dict | None = None

    def snapshot(self) -> dict:
        return {"settings": self.settings, "open_until": self.open_until}

    def restore(self, data: dict) -> None:
        if data.get("settings") != self.settings:
            return  # the policy changed this breaker's settings: its old state does not apply
        if not isinstance(data.get("open_until"), int | float):
            raise ValueError("open_until is not a number")
        self.open_until = data["open_until"]
        self.restored_from = data


@pytest.fixture
def breakerish_module(monkeypatch):
    """A policy module plugged into the pipeline: one Breakerish per route, checkpointed."""
    from proxy.dataplane import pipeline

    def build_layer(route, next_handler, ctx):
        settings = f"timeout={route.timeout}"
        obj = ctx.keep(("breakerish", route.name), settings, lambda: Breakerish(settings))
        ctx.checkpoint(f"breakerish/{route.name}", obj.snapshot, obj.restore)
        return None

    monkeypatch.setattr(pipeline, "ORDER", (("timeout", build_layer),))


def checkpoint_policy(path, timeout: str = "15s", interval: str = "10s") -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        checkpoint: {{path: "{path}", interval: {interval}}}
        upstreams:
          echo: {{replicas: [{{url: http://127.0.0.1:9}}]}}
        routes:
          - {{name: a, upstream: echo, timeout: {timeout}}}
          - {{name: b, match: {{path_prefix: /b}}, upstream: echo}}
        """
    )


def breakers(fender: Fender) -> dict[str, Breakerish]:
    return {
        key[1]: obj for key, (_, obj) in fender.runtime.handover.objects.items() if key[0] == "breakerish"
    }


async def started(text: str, clock=None) -> Fender:
    fender = Fender(parse_policy(text), "", **({"clock": clock} if clock else {}))
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    return fender


def restores(fender: Fender, result: str) -> float:
    return (
        fender.metrics.registry.get_sample_value("fender_checkpoint_restores_total", {"result": result}) or 0
    )


async def test_state_survives_a_restart_where_settings_still_match(tmp_path, breakerish_module):
    path = tmp_path / "state.json"
    first = await started(checkpoint_policy(path))
    until = time.time() + 30
    breakers(first)["a"].open_until = until
    breakers(first)["b"].open_until = until
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{first.admin_port}/admin/checkpoint")
    assert r.status_code == 200 and sorted(r.json()["providers"]) == ["breakerish/a", "breakerish/b"]
    await first.stop()  # writes once more at shutdown
    assert first.metrics.registry.get_sample_value("fender_checkpoint_writes_total", {"result": "ok"}) == 2
    doc = json.loads(path.read_text())
    assert doc["fender_checkpoint"] == FORMAT and doc["policy"]["version"] == 1
    assert doc["providers"]["breakerish/a"] == {"settings": "timeout=15.0", "open_until": until}

    # Route a's settings changed, b's did not: only b takes its state back.
    second = await started(checkpoint_policy(path, timeout="3s"))
    try:
        assert breakers(second)["b"].open_until == until
        assert breakers(second)["a"].open_until == 0.0
        assert restores(second, "restored") == 1
    finally:
        await second.stop()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"fender_checkpoint": 1, "written_at": 1, "pol', "corrupt or truncated"),
        (b"\xff\xfe garbage", "corrupt or truncated"),
        (b"[1, 2, 3]", "not a Fender checkpoint"),
        (json.dumps({"fender_checkpoint": FORMAT + 1, "written_at": 1}).encode(), "newer Fender"),
        (
            json.dumps(
                {
                    "fender_checkpoint": 1,
                    "written_at": time.time() + 86400,
                    "policy": {"version": 1},
                    "providers": {},
                }
            ).encode(),
            "in the future",
        ),
        (
            json.dumps(
                {"fender_checkpoint": 1, "written_at": 1, "policy": {"version": 7}, "providers": {}}
            ).encode(),
            "another policy version",
        ),
    ],
)
async def test_unusable_checkpoint_is_ignored_with_one_warning(
    tmp_path, breakerish_module, caplog, content, reason
):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="fender")
    fender = await started(checkpoint_policy(path))
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0].getMessage()
        assert restores(fender, "ignored") == 1
        assert all(b.restored_from is None and b.open_until == 0 for b in breakers(fender).values())
    finally:
        await fender.stop()


async def test_a_provider_that_cannot_restore_does_not_stop_the_others(tmp_path, breakerish_module, caplog):
    path = tmp_path / "state.json"
    doc = {
        "fender_checkpoint": 1,
        "written_at": time.time(),
        "policy": {"version": 1, "fingerprint": "other"},
        "providers": {
            "breakerish/a": {"settings": "timeout=15.0", "open_until": "soon"},
            "breakerish/b": {"settings": "timeout=15.0", "open_until": 123.0},
            "gone/module": {"x": 1},
        },
    }
    path.write_text(json.dumps(doc))
    caplog.set_level(logging.WARNING, logger="fender")
    fender = await started(checkpoint_policy(path))
    try:
        assert breakers(fender)["b"].open_until == 123.0
        assert breakers(fender)["a"].open_until == 0.0
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "breakerish/a" in warnings[0]
    finally:
        await fender.stop()


async def test_periodic_write_follows_the_clock(tmp_path, breakerish_module):
    path = tmp_path / "state.json"
    clock = ManualClock()
    fender = await started(checkpoint_policy(path, interval="10s"), clock=clock)
    try:
        assert restores(fender, "absent") == 1
        assert not path.exists()
        async with asyncio.timeout(5):
            while clock.sleepers == 0:  # noqa: ASYNC110 (waits for the writer to reach its sleep)
                await asyncio.sleep(0.01)
        breakers(fender)["a"].open_until = 42.0
        clock.advance(10)
        async with asyncio.timeout(5):
            while not path.exists():  # noqa: ASYNC110 (the write happens in a worker thread)
                await asyncio.sleep(0.01)
        assert json.loads(path.read_text())["providers"]["breakerish/a"]["open_until"] == 42.0
    finally:
        await fender.stop()


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    write_atomically(str(path), b"first")
    write_atomically(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind
    with pytest.raises(OSError):
        write_atomically(str(tmp_path / "missing" / "state.json"), b"x")
    assert path.read_bytes() == b"second"


def test_providers_refuse_duplicate_names_and_skip_failing_snapshots(caplog):
    providers = CheckpointProviders()
    providers.register("ok", lambda: {"n": 1}, lambda d: None)
    providers.register("broken", lambda: 1 / 0, lambda d: None)
    with pytest.raises(ValueError):
        providers.register("ok", dict, lambda d: None)
    caplog.set_level(logging.ERROR, logger="fender")
    assert providers.snapshot_all() == {"ok": {"n": 1}}
    assert "broken" in caplog.text
