"""The client side of TLS: the context a pool connects with, session reuse, and fault words.

One :class:`UpstreamTLS` per upstream holds the options and the files' stamp; each pool of an
``https://`` replica gets its own :class:`ClientTLS` from it (a context per replica, because a
TLS session can only be resumed through the context that made it). A new connection offers the
session of the pool's latest connection (OpenSSL resumes it when the replica agrees: an
abbreviated handshake, no certificate chain sent or verified again). When the files change on
disk, or on a reload, :meth:`UpstreamTLS.refresh` builds new contexts: new connections use them,
pooled connections are not cut. Each :class:`ClientTLS` offers its own ALPN list (the upstream's
``protocol``: ``http/1.1``, ``h2``, or both for ``auto``); :func:`selected_alpn` reads the replica's
choice after the handshake (the pools refuse a connection in the wrong protocol before any byte of
HTTP goes over it).

:func:`tls_fault` turns what the ``ssl`` module raised during a handshake into a
:class:`~proxy.upstream.errors.TLSFailure` with the precise cause in a few words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence

from .errors import ConnectFailure, ConnectTimeout, TLSFailure, os_words
from .tlscontext import ALPN_HTTP1, FileStamp, TLSFileError, client_context

log = logging.getLogger("fender.upstream")

__all__ = ["ClientTLS", "UpstreamTLS", "selected_alpn", "tls_fault"]


class _ResumingContext(ssl.SSLContext):
    """A client context that offers its last session on every new connection (asyncio and uvloop
    create their SSL objects through ``wrap_bio``, which has no other way to pass one)."""

    session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        if session is None and not server_side:
            session = self.session
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


class ClientTLS:
    """What one pool needs to connect over TLS: the context and the name to send and verify."""

    __slots__ = ("owner", "context", "server_name", "generation", "alpn", "_source")

    def __init__(self, owner: UpstreamTLS, server_name: str, alpn: Sequence[str] | None = None) -> None:
        self.owner = owner
        self.server_name = server_name
        self.generation = owner.generation
        # What this pool offers by ALPN (the upstream's list unless a pool needs its own: gRPC health
        # checks speak h2 to a replica whatever the upstream's protocol).
        self.alpn = owner.alpn if alpn is None else tuple(alpn)
        self.context: _ResumingContext = owner.build(self.alpn)
        self._source: ssl.SSLObject | None = None  # the latest connection's TLS state (for its session)

    def before_connect(self) -> ssl.SSLContext:
        """The context for the next connection, offering the latest session it can resume."""
        owner = self.owner
        if self.generation != owner.generation:
            # The files changed (refresh() checked they work): a context from them, a fresh session.
            self.generation = owner.generation
            with contextlib.suppress(TLSFileError):
                self.context = owner.build(self.alpn)
            self._source = None
        ctx = self.context
        source = self._source
        if source is not None:
            with contextlib.suppress(ValueError, AttributeError):
                session = source.session  # the ticket arrives after the handshake: read it late
                if session is not None:
                    ctx.session = session
        return ctx

    def connected(self, transport: asyncio.Transport) -> None:
        self._source = transport.get_extra_info("ssl_object")

    def session_reused(self, transport: asyncio.Transport) -> bool:
        obj = transport.get_extra_info("ssl_object")
        return bool(obj is not None and obj.session_reused)


def selected_alpn(transport: asyncio.BaseTransport) -> str:
    """The protocol the replica chose by ALPN on this TLS connection, ``""`` when it chose none."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return ""
    return obj.selected_alpn_protocol() or ""


class UpstreamTLS:
    """An upstream's ``tls`` settings as contexts; rebuilt when their files change."""

    def __init__(self, options, where: str, alpn: Sequence[str] = ALPN_HTTP1) -> None:
        # options: an upstream's tls block (proxy/options/tls.py UpstreamTLSOptions), defaults filled in.
        self.options = options
        self.where = where
        self.alpn = tuple(alpn)
        self.stamp = FileStamp(self.options.files())
        self.build()  # raises TLSFileError on a file that cannot be used
        self.generation = 0  # +1 each time the files changed and work: pools then build new contexts
        self._task: asyncio.Task | None = None

    def build(self, alpn: Sequence[str] | None = None) -> _ResumingContext:
        return client_context(  # type: ignore[return-value]
            self.options, self.alpn if alpn is None else alpn, self.where, _ResumingContext
        )

    def client(self, replica_host: str, alpn: Sequence[str] | None = None) -> ClientTLS:
        return ClientTLS(self, self.options.server_name or replica_host, alpn)

    def refresh(self) -> bool:
        """Re-read the files if they changed; True when new connections get new contexts.

        A file that cannot be used is logged and the previous contexts stay."""
        if not self.stamp.changed():
            return False
        try:
            self.build()
        except TLSFileError as exc:
            log.error(
                "%s: the files changed and cannot be used; keeping the previous ones: %s", self.where, exc
            )
            return False
        self.generation += 1
        log.info("%s: certificate files changed on disk; new connections use them", self.where)
        return True

    def start(self) -> None:
        if self._task is None and self.options.files():
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.watch_interval)
            self.refresh()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# OpenSSL reasons, in the words of the error log.
_REASONS = {
    "WRONG_VERSION_NUMBER": "the replica does not speak TLS on this port (wrong version number): a plaintext server? use http://",
    "HTTP_REQUEST": "the replica does not speak TLS on this port",
    "PACKET_LENGTH_TOO_LONG": "the replica does not speak TLS on this port (packet length too long)",
    "RECORD_LAYER_FAILURE": "the replica does not speak TLS on this port (record layer failure)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the replica refused the handshake (handshake failure alert: no common version or cipher, or it wants a client certificate)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version both sides accept (protocol version alert; see tls.min_version)",
    "UNSUPPORTED_PROTOCOL": "no TLS version both sides accept (see tls.min_version)",
    "TLSV1_ALERT_UNKNOWN_CA": "the replica does not trust our client certificate (unknown ca alert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the replica refused our client certificate (bad certificate alert)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the replica says our client certificate has expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the replica requires a client certificate (set tls.cert_file and tls.key_file)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the replica refused the handshake (decrypt error alert)",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version enabled (see tls.min_version)",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the replica speaks none of the protocols offered by ALPN (no application protocol alert; see the upstream's protocol)",
}
# The verification results people meet, reworded (the rest: OpenSSL's own words).
_VERIFY = {
    10: "the replica's certificate has expired",
    9: "the replica's certificate is not yet valid",
    20: "unknown issuer: the replica's certificate is not signed by a trusted authority (see tls.ca_file)",
    21: "unknown issuer: the replica's certificate is not signed by a trusted authority (see tls.ca_file)",
    19: "self-signed certificate in the replica's chain is not trusted (see tls.ca_file)",
    18: "the replica's certificate is self-signed and not trusted (see tls.ca_file)",
    64: "name mismatch: the replica's certificate is not valid for the address verified (see tls.server_name)",
    62: "name mismatch: the replica's certificate is not valid for the name verified (see tls.server_name)",
}


def tls_connect_fault(
    exc: BaseException, address: str, connect_timeout: float, server_name: str, tcp_done: bool
) -> BaseException:
    """The typed fault for a failed TCP connect plus TLS handshake (what retries and breakers read).

    ``tcp_done``: the TCP connect succeeded, so a timeout or error belongs to the handshake.
    Anything that is not an ``Exception`` (cancellation) comes back as it is, to be re-raised.
    """
    if isinstance(exc, TimeoutError):
        if tcp_done:
            return tls_fault(exc, address, server_name)
        return ConnectTimeout(
            f"connect to {address} timed out", cause=f"no connection within {connect_timeout:g}s"
        )
    if not tcp_done and isinstance(exc, OSError):
        return ConnectFailure(f"connect to {address} failed: {exc}", cause=os_words(exc))
    if isinstance(exc, Exception):
        return tls_fault(exc, address, server_name)
    return exc


def tls_fault(exc: BaseException, address: str, server_name: str) -> TLSFailure:
    """The TLSFailure for an exception raised while Fender's TLS handshake with ``address`` ran."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        words = (
            _VERIFY.get(exc.verify_code) or f"certificate verify failed: {(exc.verify_message or '').lower()}"
        )
        if exc.verify_code in (62, 64):  # host name or IP address mismatch
            words = f"name mismatch: the replica's certificate is not valid for {server_name} (see tls.server_name)"
        return TLSFailure(f"TLS handshake with {address} failed: {exc}", cause=words)
    if isinstance(exc, ssl.SSLError):
        return TLSFailure(f"TLS handshake with {address} failed: {exc}", cause=tls_words(exc))
    if isinstance(exc, ConnectionError | EOFError) or (isinstance(exc, OSError) and exc.errno is None):
        return TLSFailure(
            f"TLS handshake with {address} failed: {exc!r}",
            cause="the replica closed the connection during the TLS handshake (is it a TLS port?)",
        )
    return TLSFailure(
        f"TLS handshake with {address} failed: {exc!r}", cause=str(exc).lower() or type(exc).__name__
    )


def tls_words(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or ""
    return _REASONS.get(reason) or (reason.lower().replace("_", " ") or str(exc).lower())


def is_tls_alert(exc: BaseException | None) -> bool:
    """An SSL error that ends a connection because the replica refused the handshake (TLS 1.3 servers
    refuse a client certificate after the client already finished its side)."""
    return isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or "")
