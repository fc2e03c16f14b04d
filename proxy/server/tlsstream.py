"""Server-side TLS over a plain transport: ``ssl.SSLObject`` with memory BIOs, run by Fender.

One :class:`TLSStream` per accepted connection. To the event loop's TCP transport it is the
protocol; to the HTTP protocol above it (HTTP/1.1, HTTP/2, a tunnel end after
``set_protocol``) it is the transport. It replaces ``loop.connect_accepted_socket(ssl=...)``
(the event loop's SSL protocol, uvloop's or asyncio's) and the accept task that peeked at the
first bytes before it:

* the first bytes are looked at as they arrive (no peek, no task per connection): a TLS
  handshake record starts the handshake; plain HTTP gets nginx's 400 and a lingering close;
  anything else is closed;
* one timer bounds the handshake by what is left of ``server.header_timeout`` since the accept;
* decrypted bytes go to the protocol in one ``data_received`` per read; each ``write`` is one
  ``SSL_write`` and one write to the socket; ``close`` sends close_notify after what is queued.

Why not the loop's SSL protocol: per new connection it costs more Python work (a coroutine
and a task per accept, a handshake waiter future, buffers of 256 KiB) than the handshake
leaves room for; the measurements are in docs/performance.md (TLS listener).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

__all__ = ["TLSStream"]

_WRITE_CHUNK = 256 * 1024  # plaintext per SSL_write: bounds the ciphertext held at once
_READ_SIZE = 256 * 1024  # plaintext per SSL_read call
_SSL_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_LINGER = 2.0  # after the plain-HTTP 400: how long to discard what the client still sends
_TLS_HANDSHAKE = 0x16
_HTTP_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# states
_FIRST = 0  # nothing received yet
_HANDSHAKE = 1
_OPEN = 2  # handshake done, the application protocol runs
_DONE = 3  # refused, failed or closed: nothing more is read or written


class TLSStream(asyncio.Transport, asyncio.Protocol):
    """TLS for one accepted connection (see the module docstring).

    ``acceptor`` is the listener's :class:`proxy.server.tls.TLSAcceptor`: it gives the context,
    the application protocol factory, the deadline and the error counters, and is told when
    the handshake ends (``handshake_done``).
    """

    __slots__ = (
        "acceptor",
        "context",
        "accepted",
        "raw",
        "app",
        "state",
        "_sslobj",
        "_incoming",
        "_outgoing",
        "_timer",
        "_closing",
        "_app_lost",
    )

    def __init__(self, acceptor, context: ssl.SSLContext, accepted: float) -> None:
        super().__init__()
        self.acceptor = acceptor
        self.context = context
        self.accepted = accepted
        self.raw: asyncio.Transport = None  # type: ignore[assignment]
        self.app: Any = None
        self.state = _FIRST
        self._sslobj: ssl.SSLObject = None  # type: ignore[assignment]
        self._incoming: ssl.MemoryBIO = None  # type: ignore[assignment]
        self._outgoing: ssl.MemoryBIO = None  # type: ignore[assignment]
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._app_lost = False

    # -- the TCP transport's protocol -------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.raw = transport
        acceptor = self.acceptor
        if not acceptor.admit(self):
            self.state = _DONE
            transport.abort()
            return
        self._timer = acceptor.loop.call_at(self.accepted + acceptor.header_timeout(), self._timed_out)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _OPEN:
            self._incoming.write(data)
            self._read()
            return
        if state == _HANDSHAKE:
            self._incoming.write(data)
            self._handshake()
            return
        if state == _FIRST:
            first = data[0]
            if first == _TLS_HANDSHAKE:
                self.state = _HANDSHAKE
                self._incoming = incoming = ssl.MemoryBIO()
                self._outgoing = ssl.MemoryBIO()
                self._sslobj = self.context.wrap_bio(incoming, self._outgoing, server_side=True)
                incoming.write(data)
                self._handshake()
            elif first in _HTTP_START:
                self._refuse_plain()
            else:
                self._fail("not_tls", f"first byte 0x{first:02x} is not a TLS handshake")
        # _DONE: discarded (the lingering close after the plain-HTTP answer, or closing)

    def eof_received(self) -> bool | None:
        state = self.state
        if state == _OPEN:
            app = self.app
            if app is not None and not self._closing:
                return app.eof_received()
            return None
        if state == _FIRST:
            self._fail("closed", "closed before sending anything")
        elif state == _HANDSHAKE:
            self._fail("closed", "the client closed the connection during the handshake")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        state = self.state
        self.state = _DONE
        if state == _FIRST:
            self.acceptor.handshake_done(self, "closed", "closed before sending anything")
        elif state == _HANDSHAKE:
            self.acceptor.handshake_done(
                self, "closed", "the client closed the connection during the handshake"
            )
        elif state == _DONE:
            self.acceptor.handshake_done(self)  # a no-op unless the handshake had not ended
        app = self.app
        if app is not None and not self._app_lost:
            self._app_lost = True
            app.connection_lost(exc)
        # No reference cycles left behind: the protocol above holds this object, not the reverse.
        self.app = None
        self._sslobj = None  # type: ignore[assignment]

    def pause_writing(self) -> None:
        app = self.app
        if app is not None and self.state == _OPEN:
            app.pause_writing()

    def resume_writing(self) -> None:
        app = self.app
        if app is not None and self.state == _OPEN:
            app.resume_writing()

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self) -> None:
        sslobj = self._sslobj
        try:
            sslobj.do_handshake()
        except _SSL_AGAIN:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._flush()  # the alert, when OpenSSL made one
            self._fail(*self.acceptor.describe(exc))
            return
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        self.state = _OPEN
        self.acceptor.handshake_done(self)
        app = self.acceptor.make_protocol(self.accepted)
        self.app = app
        if self._sslobj.version() != "TLSv1.3":
            self._flush()  # TLS 1.2: the server's Finished comes after the client's
        app.connection_made(self)
        # TLS 1.3: the session tickets OpenSSL queued wait for the first write (the response,
        # HTTP/2's SETTINGS) or the close, one write to the socket less per connection.
        if self._incoming.pending and not self._closing:
            self._read()  # the first request came with the client's Finished

    def _timed_out(self) -> None:
        self._timer = None
        if self.state in (_FIRST, _HANDSHAKE):
            self._fail("timeout", "no complete handshake within server.header_timeout")

    def _fail(self, reason: str, words: str) -> None:
        self.state = _DONE
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        self.acceptor.handshake_done(self, reason, words)
        self._closing = True
        self.raw.close()

    def _refuse_plain(self) -> None:
        """The nginx answer to plain HTTP on an HTTPS port, then a lingering close."""
        self.state = _DONE
        timer = self._timer
        if timer is not None:
            timer.cancel()
        self.acceptor.handshake_done(self, "plain_http", "plain HTTP request sent to the HTTPS port")
        self._closing = True
        raw = self.raw
        raw.write(self.acceptor.plain_http_answer)
        try:
            raw.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            raw.close()
            return
        self._timer = self.acceptor.loop.call_later(_LINGER, raw.close)

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> None:
        sslobj = self._sslobj
        chunks = []
        eof = False
        incoming = self._incoming
        try:
            while True:
                chunk = sslobj.read(_READ_SIZE)
                if not chunk:
                    eof = True  # close_notify
                    break
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break  # all read: no SSLWantReadError to raise and catch (1.5 us each)
        except _SSL_AGAIN:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fatal(exc)
            return
        app = self.app
        if self._outgoing.pending and (eof or not chunks):
            # An alert (a refused renegotiation), a key update: now. With application data, what
            # is queued leaves with the answer to it (or at the close).
            self._flush()
        if chunks and app is not None and not self._closing:
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and self.app is not None and not self._closing:
            if not self.app.eof_received():
                self.close()

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self.state = _DONE
        self.raw.abort()

    # -- writing ----------------------------------------------------------------------------

    def _flush(self) -> None:
        outgoing = self._outgoing
        if outgoing is not None and outgoing.pending:
            self.raw.write(outgoing.read())

    def write(self, data) -> None:
        if self._closing or self.state != _OPEN:
            return
        sslobj = self._sslobj
        try:
            if len(data) <= _WRITE_CHUNK:
                sslobj.write(data)
                self.raw.write(self._outgoing.read())
                return
            view = memoryview(data)
            for start in range(0, len(view), _WRITE_CHUNK):
                sslobj.write(view[start : start + _WRITE_CHUNK])
                self.raw.write(self._outgoing.read())
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close (as the event loop's SSL transport)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.state == _OPEN and self._sslobj is not None:
            try:
                self._sslobj.unwrap()  # queues close_notify; the client's is not waited for
            except (ssl.SSLError, OSError, ValueError):
                pass
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    # -- reading flow control, extra info, protocol -----------------------------------------

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol) -> None:
        self.app = protocol

    def get_protocol(self):
        return self.app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self.context
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if sslobj is not None:
            if name == "peercert":
                return sslobj.getpeercert()
            if name == "cipher":
                return sslobj.cipher()
            if name == "compression":
                return sslobj.compression()
        raw = self.raw
        return default if raw is None else raw.get_extra_info(name, default)
