"""One classifier of responses, shared by retry (``retry_on``), the breaker (``failure_on``) and
outlier detection, as Linkerd shares ``classify``: which answers count as failures.

Conditions are the words of the policy file: ``5xx``, ``4xx``, ``gateway_error`` (502, 503,
504), a status from 100 to 599, a fault reason of :data:`proxy.kernel.reasons.TRY_FAULTS`, or a
gRPC status name (:data:`GRPC_CONDITIONS`). The options modules validate the words; this turns a
list of them into two sets read on the request path (a status set and a reason set), so each
consumer pays one membership test, and a gRPC table that is empty unless gRPC names were written.

A gRPC call answers HTTP 200 whatever happened; its outcome is ``grpc-status``. Retry and breaker
decide when the response head arrives, before anything reached the client, so what they judge is
a *trailers-only* answer: one head that carries ``grpc-status`` and ends the stream (what a gRPC
server sends when a call fails before any message). A response that started with messages is
never judged by its trailers: a message already went from the server (a retry could duplicate it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from proxy.grpc import GRPC_CODES, grpc_status
from proxy.kernel.reasons import REASONS

# gRPC status names retry_on and failure_on accept: every status but ok.
GRPC_CONDITIONS: Final[tuple[str, ...]] = tuple(name for name in GRPC_CODES if name != "ok")

_STATUS_GROUPS: Final[dict[str, range | tuple[int, ...]]] = {
    "5xx": range(500, 600),
    "4xx": range(400, 500),
    "gateway_error": (502, 503, 504),
}


class Classifier:
    """The failure conditions of one policy section, as a status set and a reason set."""

    __slots__ = ("statuses", "reasons", "grpc")

    def __init__(self, conditions: Iterable[str]) -> None:
        statuses: set[int] = set()
        reasons: set[str] = set()
        grpc: dict[int, str] = {}
        for item in conditions:
            group = _STATUS_GROUPS.get(item)
            if group is not None:
                statuses.update(group)
            elif item.isdigit():
                statuses.add(int(item))
            elif item in GRPC_CODES:
                grpc[GRPC_CODES[item]] = item
            else:
                reasons.add(item)
                if item == "connect_failure":
                    reasons.add("tls_failure")  # a failed TLS handshake is a failed connect (nothing sent)
        self.statuses: frozenset[int] = frozenset(statuses)
        self.reasons: frozenset[str] = frozenset(reasons)
        # gRPC status -> its condition name; empty (the usual case) costs the HTTP path one test.
        self.grpc: dict[int, str] = grpc

    def status_fails(self, status: int) -> bool:
        return status in self.statuses

    def reason_fails(self, reason: str) -> bool:
        return reason in self.reasons

    def grpc_fails(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The gRPC condition an upstream answer's head meets (its ``grpc-status``, present in a
        trailers-only answer), or None."""
        if not self.grpc:
            return None
        code = grpc_status(headers)
        return None if code is None else self.grpc.get(code)


# Outlier detection: a 5xx answer, or any fault of the upstream (a try's UpstreamError whose
# reason is not one of NOT_REPLICA_FAULTS, which the picker checks on the error).
OUTLIER: Final = Classifier(("5xx", *(name for name, r in REASONS.items() if r.kind == "fault")))
