"""TLS settings shared by both directions: the policy blocks, the contexts, the files behind them.

* :class:`UpstreamTLSOptions` is an upstream's ``tls:`` block (Fender as the client of an
  ``https://`` replica); :class:`ListenerTLSOptions` is ``server.tls`` and ``admin_tls``
  (Fender as the server).
* :func:`client_context` and :func:`server_context` build ``ssl.SSLContext`` objects from them.
  Both take the ALPN list to offer: today ``http/1.1`` (:data:`ALPN_HTTP1`); HTTP/2 adds ``h2``
  by passing its own list, nothing else here changes.
* :class:`FileStamp` says whether certificate, key or CA files changed on disk (an atomic rename
  as Kubernetes does it, or a write in place), so the holders (proxy/upstream/tls.py,
  proxy/tlslistener.py) rebuild their context and new handshakes use the new files.
* :func:`tls_file_problems` builds every context a policy names once, so a reload (and
  `fender validate --env`, and `run`) refuses an unreadable or mismatched file with its path
  at the policy line that names it, and the running settings stay.

The contexts follow ``ssl.create_default_context`` (chain and host name verified against the
system trust store unless ``ca_file`` says otherwise, TLS 1.2 at least) with renegotiation off.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from proxy.config.base import Flag, PolicyModel, Text, _valid_hostname
from proxy.config.units import Duration, describe_value, policy_error

__all__ = [
    "ALPN_HTTP1",
    "TLSVersion",
    "UpstreamTLSOptions",
    "ListenerTLSOptions",
    "TLSFileError",
    "client_context",
    "server_context",
    "FileStamp",
    "tls_file_problems",
]

# What the contexts offer in ALPN. HTTP/2 (issue 21) passes ("h2", "http/1.1") instead.
ALPN_HTTP1: tuple[str, ...] = ("http/1.1",)

TLSVersion = Literal["TLSv1.2", "TLSv1.3"]
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)


class TLSFileError(Exception):
    """A certificate, key or CA file cannot be used; ``field`` names the option (``cert_file``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _check_file_name(value: str | None) -> str | None:
    if value is not None and (not value or "\x00" in value):
        raise policy_error(f"{describe_value(value)} is not a file path")
    return value


class UpstreamTLSOptions(PolicyModel):
    """How Fender speaks TLS to the ``https://`` replicas of an upstream."""

    ca_file: Text | None = Field(
        default=None,
        description=(
            "PEM file of the certificate authorities that may sign the replicas' certificates. Default: the "
            "system trust store (as curl and ssl.create_default_context). Re-read when it changes on disk."
        ),
    )
    server_name: Text | None = Field(
        default=None,
        description=(
            "The name sent in SNI and verified against the replica's certificate. Default: each replica's "
            "host. Set it when replicas are addressed by IP but certified for a name."
        ),
    )
    cert_file: Text | None = Field(
        default=None,
        description=(
            "PEM client certificate (chain) presented to replicas that ask for one (mutual TLS); needs "
            "key_file. Re-read when it changes on disk: new connections use the new pair."
        ),
    )
    key_file: Text | None = Field(
        default=None,
        description="PEM private key of cert_file (unencrypted). Re-read with cert_file.",
    )
    min_version: TLSVersion = Field(
        default="TLSv1.2",
        description="Oldest TLS version accepted from a replica: TLSv1.2 (default) or TLSv1.3.",
    )
    verify: Flag = Field(
        default=True,
        description=(
            "Verify the replica's certificate chain and name (default). false needs "
            "insecure_skip_verify: true as well, and every load of the policy warns about it."
        ),
    )
    insecure_skip_verify: Flag = Field(
        default=False,
        description=(
            "Confirms verify: false (accept any certificate, which lets anyone on the path read and change "
            "the traffic). Only with verify: false."
        ),
    )
    watch_interval: Annotated[Duration, Field(gt=0)] = Field(
        default="5s",
        description=(
            "How often the certificate, key and CA files are checked for changes on disk (cert-manager and "
            "Vault rotate them in place); a changed file is used by the next new connection."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamTLSOptions:
        for name in ("ca_file", "cert_file", "key_file"):
            try:
                _check_file_name(getattr(self, name))
            except ValueError as exc:
                raise policy_error(str(exc), name) from None
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise policy_error(
                "a client certificate needs both cert_file and key_file (mutual TLS)",
                "cert_file" if missing == "cert_file" else "key_file",
            )
        if not self.verify and not self.insecure_skip_verify:
            raise policy_error(
                "verify: false accepts any certificate; confirm it with insecure_skip_verify: true "
                "(or keep verify: true and give ca_file)",
                "verify",
            )
        if self.insecure_skip_verify and self.verify:
            raise policy_error(
                "insecure_skip_verify: true only goes with verify: false (write both, or neither)",
                "insecure_skip_verify",
            )
        if self.server_name is not None and not _valid_hostname(self.server_name.lower()):
            raise policy_error(f"{describe_value(self.server_name)} is not a host name", "server_name")
        return self

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None)


class ListenerTLSOptions(PolicyModel):
    """HTTPS on a listener: its certificate and, optionally, client certificates to verify."""

    cert_file: Text = Field(
        description=(
            "PEM certificate (chain, leaf first) the listener presents. Watched: when it or key_file changes "
            "on disk (atomic rename or write in place), new handshakes use the new pair."
        ),
    )
    key_file: Text = Field(description="PEM private key of cert_file (unencrypted).")
    client_ca_file: Text | None = Field(
        default=None,
        description="PEM file of the authorities whose client certificates are accepted (mutual TLS).",
    )
    client_auth: Literal["none", "optional", "require"] = Field(
        default="none",
        description=(
            "none: ask for no client certificate; optional: verify one if the client sends it; require: "
            "refuse the handshake without a valid one. optional and require need client_ca_file."
        ),
    )
    min_version: TLSVersion = Field(
        default="TLSv1.2",
        description="Oldest TLS version a client may use: TLSv1.2 (default) or TLSv1.3.",
    )
    watch_interval: Annotated[Duration, Field(gt=0)] = Field(
        default="5s",
        description="How often the certificate, key and client CA files are checked for changes on disk.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ListenerTLSOptions:
        for name in ("cert_file", "key_file", "client_ca_file"):
            try:
                _check_file_name(getattr(self, name))
            except ValueError as exc:
                raise policy_error(str(exc), name) from None
        if self.client_auth != "none" and self.client_ca_file is None:
            raise policy_error(
                f"client_auth: {self.client_auth} needs client_ca_file (the authorities to verify clients with)",
                "client_auth",
            )
        return self

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f is not None)


# --------------------------------------------------------------------------- contexts


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
    options: UpstreamTLSOptions,
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


def server_context(
    options: ListenerTLSOptions, alpn: Sequence[str] = ALPN_HTTP1, where: str = "server.tls"
) -> ssl.SSLContext:
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
        out = []
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


def tls_file_problems(policy) -> list[tuple[tuple[str | int, ...], str]]:
    """Build each context the policy's TLS blocks describe; every file that fails, located."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    blocks: list[tuple[tuple[str | int, ...], Any]] = []
    server_tls = getattr(policy.server, "tls", None)
    if server_tls is not None:
        blocks.append((("server", "tls"), server_tls))
    admin_tls = getattr(policy, "admin_tls", None)
    if admin_tls is not None:
        blocks.append((("admin_tls",), admin_tls))
    for name, upstream in policy.upstreams.items():
        if getattr(upstream, "tls", None) is not None:
            blocks.append((("upstreams", name, "tls"), upstream.tls))
    for at, options in blocks:
        where = ".".join(str(part) for part in at)
        try:
            if isinstance(options, UpstreamTLSOptions):
                client_context(options, where=where)
            else:
                server_context(options, where=where)
        except TLSFileError as exc:
            problems.append(((*at, exc.field), str(exc)))
    return problems
