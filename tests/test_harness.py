"""The test harness fails loudly: a broken upstream handler, a garbled request, a wait that never ends."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, UpstreamErrors


async def broken(req, conn) -> None:
    raise RuntimeError("handler bug")


async def _get(port: int, data: bytes = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            return await reader.read()  # the upstream aborts the connection
    finally:
        writer.close()


async def test_a_handler_exception_is_raised_when_the_upstream_closes():
    with pytest.raises(UpstreamErrors, match="handler bug"):
        async with RawUpstream(broken) as up:
            await _get(up.port)
            await up.wait_until(lambda: up.errors)


async def test_an_unparsable_request_is_raised_when_the_upstream_closes():
    up = RawUpstream(broken)
    await up.__aenter__()
    await _get(up.port, b"\x00\x01 not http\r\n\r\n")
    await up.wait_until(lambda: up.errors)
    with pytest.raises(UpstreamErrors, match="Invalid method"):
        await up.close()


async def test_expect_errors_keeps_them_for_the_test_to_read():
    async with RawUpstream(broken, expect_errors=True) as up:
        await _get(up.port)
        await up.wait_until(lambda: up.errors)
    assert [str(e) for e in up.errors] == ["handler bug"]


async def test_a_failing_test_keeps_its_own_error_and_gets_the_upstream_errors_as_a_note():
    with pytest.raises(KeyError) as info:
        async with RawUpstream(broken) as up:
            await _get(up.port)
            await up.wait_until(lambda: up.errors)
            raise KeyError("the test's own failure")
    assert any("handler bug" in note for note in info.value.__notes__)


async def test_wait_until_fails_when_the_condition_never_holds():
    with pytest.raises(AssertionError, match="never true"):
        await wait_until(lambda: False, within=0.05, what="never true")
