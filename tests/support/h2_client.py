"""A raw HTTP/2 client for tests: the ``h2`` package's client state machine over a real socket.

It writes whatever frames a test asks for (well-formed requests, or frames
h2 would never send: built with hyperframe and written as bytes), and
collects the events the server's frames produce. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError


class H2Response:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.status = 0
        self.body = b""
        self.trailers: dict[bytes, bytes] = {}
        self.ended = False
        self.reset: int | None = None  # the RST_STREAM error code, when the server reset the stream


class H2Client:
    """``async with H2Client(port) as c``: connected, preface and SETTINGS sent."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, validate: bool = True, settings=None) -> None:
        self.port = port
        self.host = host
        config = H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=False,
        )
        self.conn = H2Connection(config=config)
        if settings:
            self.conn.local_settings = type(self.conn.local_settings)(client=True, initial_values=settings)
        self.responses: dict[int, H2Response] = {}
        self.goaway: ConnectionTerminated | None = None
        self.closed = False
        self.events: list = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.auto_ack = True  # hand back the window for DATA received (False: a reader that stalls)

    async def __aenter__(self) -> H2Client:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.conn.initiate_connection()
        self.flush()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def write_raw(self, data: bytes) -> None:
        """Bytes past the state machine (frames it would refuse to send)."""
        self.flush()
        self._writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        authority: str = "svc",
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        fields += headers or []
        self.responses[sid] = H2Response()
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    async def read_once(self, timeout: float) -> bool:
        """Read and process one chunk; False when the connection closed (or nothing came in time)."""
        try:
            async with asyncio.timeout(timeout):
                data = await self._reader.read(65536)
        except TimeoutError:
            return True
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return False
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.closed = True
            return False
        for event in events:
            self.events.append(event)
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, ResponseReceived) and response is not None:
                response.headers = dict(event.headers)
                response.status = int(response.headers.get(b":status", b"0"))
            elif isinstance(event, DataReceived):
                if response is not None:
                    response.body += event.data
                if self.auto_ack and event.flow_controlled_length:
                    with contextlib.suppress(ProtocolError):
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived) and response is not None:
                response.trailers = dict(event.headers)
            elif isinstance(event, StreamEnded) and response is not None:
                response.ended = True
            elif isinstance(event, StreamReset) and response is not None:
                response.reset = int(event.error_code)
                response.ended = True
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event
                # h2 as a client accepts no frame after a GOAWAY; a real client still reads the
                # streams up to its last stream id (RFC 9113 6.8), which is what the tests look at.
                self.conn.state_machine.state = ConnectionState.CLIENT_OPEN
        self.flush()
        return True

    async def until(self, predicate, timeout: float = 5.0) -> bool:
        """Read until ``predicate()`` holds (True), the connection closes or ``timeout`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(100_000):  # bounded in count as well as in time
            if predicate():
                return True
            left = deadline - loop.time()
            if left <= 0 or not await self.read_once(min(left, 0.5)):
                return predicate()
        return predicate()

    async def response(self, sid: int, timeout: float = 5.0) -> H2Response:
        await self.until(lambda: self.responses[sid].ended, timeout)
        return self.responses[sid]

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        await self.until(lambda: self.closed, timeout)
        return self.closed
