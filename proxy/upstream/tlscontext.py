"""TLS contexts for both directions, and the files behind them (no policy models here).

* :func:`client_context` (Fender as the client of an ``https://`` replica) and
  :func:`server_context` (Fender's HTTPS listeners) build ``ssl.SSLContext`` objects from the
  policy's TLS blocks (proxy/options/tls.py; read by attribute only, so this module sits in the
  lowest layer that needs it). Both take the ALPN list to offer: ``http/1.1``
  (:data:`ALPN_HTTP1`), or ``h2`` first (the listener with HTTP/2; to replicas, what the upstream's
  ``protocol`` speaks: proxy.upstream.http2.alpn_protocols).
* :class:`FileStamp` says whether certificate, key or CA files changed on disk (an atomic rename
  as Kubernetes does it, or a write in place), so the holders (proxy/upstream/tls.py,
  proxy/server/tls.py) rebuild their context and new handshakes use the new files.

The contexts follow ``ssl.create_default_context`` (chain and host name verified against the
system trust store unless ``ca_file`` says otherwise, TLS 1.2 at least) with renegotiation off.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterable, Sequence

__all__ = ["ALPN_H2_HTTP1", "ALPN_HTTP1", "TLSFileError", "client_context", "server_context", "FileStamp"]

# What the contexts offer in ALPN (a replica's pool may offer ("h2",) alone: protocol h2).
ALPN_HTTP1: tuple[str, ...] = ("http/1.1",)
ALPN_H2_HTTP1: tuple[str, ...] = ("h2", "http/1.1")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)


class TLSFileError(Exception):
    """A certificate, key or CA file cannot be used; ``field`` names the option (``cert_file``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _words(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str, where: str) -> None:
    for name, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSFileError(f"{where}.{name} {path}: cannot read it ({_words(exc)})", name) from None
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        words = _words(exc)
        if "key values mismatch" in words:
            raise TLSFileError(
                f"{where}.key_file {key_file} is not the key of {where}.cert_file {cert_file}", "key_file"
            ) from None
        raise TLSFileError(
            f"{where}.cert_file {cert_file} / key_file {key_file}: not a PEM certificate and key ({words})",
            "cert_file",
        ) from None


def _load_ca(ctx: ssl.SSLContext, path: str, where: str, name: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except OSError as exc:
        raise TLSFileError(f"{where}.{name} {path}: cannot read it ({_words(exc)})", name) from None
    except ssl.SSLError as exc:
        raise TLSFileError(f"{where}.{name} {path}: no PEM certificate in it ({_words(exc)})", name) from None


def client_context(
    options,
    alpn: Sequence[str] = ALPN_HTTP1,
    where: str = "tls",
    cls: type[ssl.SSLContext] = ssl.SSLContext,
) -> ssl.SSLContext:
    """A client context for ``options`` (``cls`` lets the pool add session reuse); raises TLSFileError."""
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED, as create_default_context
    ctx.minimum_version = _VERSIONS[options.min_version]
    ctx.options |= _NO_RENEGOTIATION
    if options.verify:
        if options.ca_file is not None:
            _load_ca(ctx, options.ca_file, where, "ca_file")
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if options.cert_file is not None and options.key_file is not None:
        _load_chain(ctx, options.cert_file, options.key_file, where)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(options, alpn: Sequence[str] = ALPN_HTTP1, where: str = "server.tls") -> ssl.SSLContext:
    """A server context for ``options``; raises TLSFileError naming the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[options.min_version]
    # No renegotiation (a client-initiated one is a CPU lever for an attacker); TLS 1.3 has none anyway.
    ctx.options |= _NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, options.cert_file, options.key_file, where)
    if options.client_ca_file is not None:
        _load_ca(ctx, options.client_ca_file, where, "client_ca_file")
    ctx.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}[
        options.client_auth
    ]
    ctx.set_alpn_protocols(list(alpn))
    return ctx


# --------------------------------------------------------------------------- files on disk


class FileStamp:
    """What a set of files looks like now (inode, size, mtime, then a hash of their bytes)."""

    __slots__ = ("paths", "_stats", "_digest")

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = tuple(paths)
        self._stats = self._stat()
        self._digest = self._hash()

    def _stat(self) -> tuple:
        out: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def _hash(self) -> str:
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                with open(path, "rb") as handle:
                    digest.update(handle.read())
            except OSError:
                digest.update(b"\x00unreadable")
            digest.update(b"\x00")
        return digest.hexdigest()

    def changed(self) -> bool:
        """True once after the files' contents changed (a touch with the same bytes is no change)."""
        stats = self._stat()
        if stats == self._stats:
            return False
        self._stats = stats
        digest = self._hash()
        if digest == self._digest:
            return False
        self._digest = digest
        return True
