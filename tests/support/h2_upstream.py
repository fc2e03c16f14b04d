"""A scriptable HTTP/2 (h2c, prior knowledge) upstream for tests, written with the ``h2`` package.

Paths choose the behaviour of a stream:

* ``/echo``: 200 with the request body back, ``x-seen-*`` fields for the request's ``:authority``,
  ``te``, ``content-length`` and ``:scheme``, and a trailer ``x-trailer: done`` when the request said
  TE: trailers; request trailers are kept in ``request_trailers``; ``ssl`` serves it over TLS (ALPN h2);
* ``/refuse``: RST_STREAM REFUSED_STREAM; ``/reset``: RST_STREAM INTERNAL_ERROR;
* ``/big?N``: N bytes of body (the stream's flow control window permitting);
* ``/hold``: waits until ``release`` is set, then 200 ``held``;
* ``/badlength``: 200 with ``content-length: 10`` and 3 bytes of DATA (a malformed response).

``goaway_after`` sends a graceful GOAWAY on a connection after that many streams arrived (last
stream id: the last of them, still answered); ``goaway_below`` instead answers GOAWAY with a last
stream id below the held streams (those were "never processed" and must be sent again elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes


class _ServerConnection(h2.connection.H2Connection):
    """h2's server side, except that a GOAWAY (sent or received) leaves the streams it covers able
    to finish, as RFC 9113 6.8 allows (h2 alone refuses every frame after it)."""

    def _keep_open(self, call):
        state = self.state_machine.state
        result = call()
        if state == h2.connection.ConnectionState.SERVER_OPEN:
            self.state_machine.state = state
        return result

    def close_connection(self, *args, **kwargs):
        return self._keep_open(lambda: super(_ServerConnection, self).close_connection(*args, **kwargs))

    def _receive_goaway_frame(self, frame):
        return self._keep_open(lambda: super(_ServerConnection, self)._receive_goaway_frame(frame))


class H2Upstream:
    def __init__(
        self, max_concurrent_streams: int | None = None, goaway_after: int | None = None, ssl=None
    ) -> None:
        """``ssl``: a server SSLContext to serve HTTP/2 over TLS (ALPN h2 is set on it)."""
        self.ssl = ssl
        if ssl is not None:
            ssl.set_alpn_protocols(["h2"])
        self.max_concurrent_streams = max_concurrent_streams
        self.goaway_after = goaway_after
        self.connections = 0  # accepted connections
        self.open_connections = 0
        self.requests: list[tuple[str, dict[bytes, bytes]]] = []  # (path, headers) per stream
        self.request_trailers: list[tuple[str, list[tuple[bytes, bytes]]]] = []  # (path, trailer fields)
        self.peak_streams = 0  # most concurrent streams on one connection
        self.release = asyncio.Event()
        self.held = 0  # streams waiting on release
        self.held_changed = asyncio.Event()
        self.big_sent = 0  # body bytes of /big sent so far (flow control lets them through)
        self.progress = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self.port = 0

    async def start(self) -> H2Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def goaway_all(self, last_stream_id: int | None = None) -> None:
        """GOAWAY (NO_ERROR) on every open connection; ``None``: the last stream that arrived."""
        for conn in list(self._conns):
            conn.goaway(last_stream_id)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        self.connections += 1
        self.open_connections += 1
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            self.open_connections -= 1
            writer.close()


class _Conn:
    def __init__(self, up: H2Upstream, reader, writer) -> None:
        self.up = up
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = _ServerConnection(config=config)
        self.streams: dict[int, dict] = {}
        self.tasks: set[asyncio.Task] = set()
        self.arrived = 0
        self.last_id = 0
        self.window_open = asyncio.Event()
        self.gone_away = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def goaway(self, last_stream_id: int | None) -> None:
        if self.gone_away:
            return
        self.gone_away = True
        self.h2.close_connection(last_stream_id=self.last_id if last_stream_id is None else last_stream_id)
        self.flush()

    async def run(self) -> None:
        if self.up.max_concurrent_streams is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=False,
                initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: self.up.max_concurrent_streams},
            )
        self.h2.initiate_connection()
        self.flush()
        try:
            for _ in range(100_000):
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()
                    break
                for event in events:
                    self.handle(event)
                self.flush()
                if self.gone_away and not self.streams and not self.tasks:
                    break
        except ConnectionError:
            pass
        finally:
            for task in self.tasks:
                task.cancel()

    def handle(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers)
            sid = event.stream_id
            self.last_id = max(self.last_id, sid)
            self.streams[sid] = {"headers": headers, "body": b"", "ended": asyncio.Event()}
            self.arrived += 1
            self.up.peak_streams = max(self.up.peak_streams, len(self.streams))
            self.up.requests.append((headers[b":path"].decode(), headers))
            if event.stream_ended is not None:
                self.streams[sid]["ended"].set()
            task = asyncio.ensure_future(self.respond(sid))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if self.up.goaway_after is not None and self.arrived >= self.up.goaway_after:
                self.goaway(sid)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None:
                stream["body"] += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self.up.request_trailers.append((stream["headers"][b":path"].decode(), list(event.headers)))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream["ended"].set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream["ended"].set()
        elif isinstance(event, h2.events.WindowUpdated):
            self.window_open.set()

    async def respond(self, sid: int) -> None:
        stream = self.streams[sid]
        headers = stream["headers"]
        path = headers[b":path"].decode()
        try:
            if path == "/refuse":
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                return
            if path == "/reset":
                self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
                return
            await asyncio.wait_for(stream["ended"].wait(), 10)
            if sid not in self.streams:
                return
            if path == "/hold":
                self.up.held += 1
                self.up.held_changed.set()
                await asyncio.wait_for(self.up.release.wait(), 10)
                self.send(sid, [(b":status", b"200")], b"held")
                return
            if path == "/badlength":  # a content-length its DATA contradicts
                self.send(sid, [(b":status", b"200"), (b"content-length", b"10")], b"abc")
                return
            if path.startswith("/big?"):
                await self.send_big(sid, int(path[5:]))
                return
            out = [
                (b":status", b"200"),
                (b"content-type", b"application/octet-stream"),
                (b"x-seen-authority", headers.get(b":authority", b"")),
                (b"x-seen-te", headers.get(b"te", b"-")),
                (b"x-seen-length", headers.get(b"content-length", b"-")),
                (b"x-seen-connection", headers.get(b"connection", b"-")),
                (b"x-seen-scheme", headers.get(b":scheme", b"-")),
            ]
            trailers = [(b"x-trailer", b"done")] if headers.get(b"te") == b"trailers" else None
            self.h2.send_headers(sid, out)
            await self.send_flow(sid, stream["body"])
            if trailers:
                self.h2.send_headers(sid, trailers, end_stream=True)
            else:
                self.h2.end_stream(sid)
        except (h2.exceptions.H2Error, KeyError, TimeoutError):
            pass  # the client reset the stream, or left
        finally:
            self.streams.pop(sid, None)
            with contextlib.suppress(Exception):
                self.flush()
            if self.gone_away and not self.streams:
                self.writer.close()

    def send(self, sid: int, headers, body: bytes, trailers=None) -> None:
        self.h2.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            self.h2.send_data(sid, body, end_stream=not trailers)
        if trailers:
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.flush()

    async def send_big(self, sid: int, size: int) -> None:
        self.h2.send_headers(sid, [(b":status", b"200")])
        self.flush()
        await self.send_flow(sid, b"x" * size, count=True)
        self.h2.end_stream(sid)
        self.flush()

    async def send_flow(self, sid: int, data: bytes, count: bool = False) -> None:
        """Send ``data`` as the client's windows allow."""
        view = memoryview(data)
        for _ in range(100_000):
            if not view:
                return
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(view))
            if window <= 0:
                self.window_open.clear()
                await asyncio.wait_for(self.window_open.wait(), 10)
                continue
            self.h2.send_data(sid, view[:window].tobytes())
            view = view[window:]
            if count:
                self.up.big_sent += window
            self.flush()
            await self.writer.drain()
