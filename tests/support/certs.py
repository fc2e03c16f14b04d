"""Certificates made by the tests (trustme), written into a temporary directory; never committed.

certs = Certs(tmp_path)
certs.server.cert, certs.server.key   # for localhost and 127.0.0.1, signed by certs.ca
certs.ca_file                         # the CA that signed them
certs.issue("expired", not_after=...)  # more leaf certificates on demand
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from tests.support.need import need_module

trustme = need_module("trustme", "pip install 'trustme>=1.1,<2' (in the test extra)")


@dataclass
class Pair:
    cert: str  # path of the PEM chain (leaf first)
    key: str  # path of the PEM key
    leaf: object  # the trustme LeafCert

    def server_context(self, **kwargs) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        for name, value in kwargs.items():
            setattr(ctx, name, value)
        return ctx

    def pem(self) -> bytes:
        return Path(self.cert).read_bytes()


class Certs:
    """A CA, a server pair for localhost/127.0.0.1 and a client pair; more with :meth:`issue`."""

    def __init__(self, directory: os.PathLike | str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="Fender test CA")
        self.ca_file = str(self.dir / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.server = self.issue("server", "localhost", "127.0.0.1")
        self.client = self.issue("client", "client.test", common_name="client.test")

    def issue(self, name: str, *identities: str, ca=None, **kwargs) -> Pair:
        leaf = (ca or self.ca).issue_cert(*(identities or ("localhost", "127.0.0.1")), **kwargs)
        cert = self.dir / f"{name}.crt"
        key = self.dir / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return Pair(str(cert), str(key), leaf)

    def expired(self) -> Pair:
        now = datetime.datetime.now(datetime.UTC)
        return self.issue(
            "expired",
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def client_context(self, pair: Pair | None = None, **kwargs) -> ssl.SSLContext:
        """A client context trusting this CA (with ``pair`` as client certificate)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if pair is not None:
            ctx.load_cert_chain(pair.cert, pair.key)
        for name, value in kwargs.items():
            setattr(ctx, name, value)
        return ctx

    def other_ca(self):
        return trustme.CA(organization_name="Another CA")


def copy_file(source: str, target: str) -> None:
    """Write ``source``'s bytes over ``target`` in place (as a writer that truncates and rewrites)."""
    Path(target).write_bytes(Path(source).read_bytes())


def replace_file(source: str, target: str) -> None:
    """Put ``source``'s bytes at ``target`` by an atomic rename (as Kubernetes updates a Secret)."""
    staging = Path(target + ".tmp")
    staging.write_bytes(Path(source).read_bytes())
    staging.replace(target)


def live_pair(pair: Pair, directory: os.PathLike | str) -> Pair:
    """A copy of ``pair`` at fixed names in ``directory`` (tls.crt, tls.key), to be rotated."""
    live = Pair(str(Path(directory) / "tls.crt"), str(Path(directory) / "tls.key"), None)
    copy_file(pair.cert, live.cert)
    copy_file(pair.key, live.key)
    return live
