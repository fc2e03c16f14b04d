"""The gRPC outcome of an upstream answer, for ``retry.retry_on`` and ``circuit_breaker.failure_on``.

A gRPC call answers HTTP 200 whatever happened; its outcome is ``grpc-status``. Both layers decide
when the response head arrives, before anything reached the client, so what they can judge is a
*trailers-only* response: one head that carries ``grpc-status`` and ends the stream (what a gRPC
server sends when a call fails before any message, and what grpcio's ``abort`` does). A response
that started with messages is never judged by its trailers: a message already went from the server
(and a retry could duplicate it).
"""

from __future__ import annotations

from proxy.grpc import GRPC_CODES, grpc_status

# gRPC status names retry_on and failure_on accept: every status but ok.
GRPC_CONDITIONS = tuple(name for name in GRPC_CODES if name != "ok")


def grpc_code(reply) -> int | None:
    """The gRPC status a (non-local) answer carries in its head, or None when it carries none."""
    return grpc_status(reply.headers)


def grpc_codes(names) -> dict[int, str]:
    """``{14: "unavailable", ...}`` for the gRPC status names among ``names`` (retry_on, failure_on)."""
    return {GRPC_CODES[name]: name for name in names if name in GRPC_CODES}
