"""One classifier of responses, shared by retry (``retry_on``), the breaker (``failure_on``) and
outlier detection, as Linkerd shares ``classify``: which answers count as failures.

Conditions are the words of the policy file: ``5xx``, ``4xx``, ``gateway_error`` (502, 503,
504), a status from 100 to 599, or a fault reason of :data:`proxy.kernel.reasons.TRY_FAULTS`.
The options modules validate the words; this turns a list of them into two sets read on the
request path (a status set and a reason set), so each consumer pays one membership test.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from proxy.kernel.reasons import REASONS

_STATUS_GROUPS: Final[dict[str, range | tuple[int, ...]]] = {
    "5xx": range(500, 600),
    "4xx": range(400, 500),
    "gateway_error": (502, 503, 504),
}


class Classifier:
    """The failure conditions of one policy section, as a status set and a reason set."""

    __slots__ = ("statuses", "reasons")

    def __init__(self, conditions: Iterable[str]) -> None:
        statuses: set[int] = set()
        reasons: set[str] = set()
        for item in conditions:
            group = _STATUS_GROUPS.get(item)
            if group is not None:
                statuses.update(group)
            elif item.isdigit():
                statuses.add(int(item))
            else:
                reasons.add(item)
                if item == "connect_failure":
                    reasons.add("tls_failure")  # a failed TLS handshake is a failed connect (nothing sent)
        self.statuses: frozenset[int] = frozenset(statuses)
        self.reasons: frozenset[str] = frozenset(reasons)

    def status_fails(self, status: int) -> bool:
        return status in self.statuses

    def reason_fails(self, reason: str) -> bool:
        return reason in self.reasons


# Outlier detection: a 5xx answer, or any fault of the upstream (a try's UpstreamError whose
# reason is not one of NOT_REPLICA_FAULTS, which the picker checks on the error).
OUTLIER: Final = Classifier(("5xx", *(name for name, r in REASONS.items() if r.kind == "fault")))
