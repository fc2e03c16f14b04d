"""The access log: one line per proxied request, as text or as one JSON object (server.access_log_format).

Built once per policy load only when ``server.access_log`` is on (the runtime holds None
otherwise), so a request pays for this module only when someone asked for the log.
Field names are part of the interface (docs/observability.md, "Access log"): add fields, never rename them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from proxy.kernel.exchange import Exchange, LocalReply
from proxy.policies.cache.status import cache_result

log = logging.getLogger("fender.access")

_MAX_TARGET = 512  # characters of the request target kept (a URL can be 8 KiB)


class AccessLog:
    """Writes the access lines of one runtime in its format."""

    __slots__ = ("format",)

    def __init__(self, fmt: str = "text") -> None:
        self.format = fmt
        _bare_json_lines(fmt == "json")
        if log.level == logging.NOTSET:
            # Asking for an access log is asking for its lines, whatever --log-level quiets elsewhere.
            log.setLevel(logging.INFO)

    def write(self, scope, method: str, status: int, reply, ex: Exchange, started: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        peer = scope.get("client")
        client = ex.client or (peer[0] if peer else None)
        error = reply.reason if isinstance(reply, LocalReply) else None
        cache = cache_result(ex.response_headers) if ex.response_headers else None
        duration_ms = (time.perf_counter() - started) * 1000
        target = ex.target.decode("latin-1")[:_MAX_TARGET]
        tracing = ex.tracing
        # A sampled request's RequestTrace, or an unsampled one's traceparent (00-<trace id>-...).
        trace_id = (
            None
            if tracing is None
            else tracing[3:35].decode()
            if type(tracing) is bytes
            else tracing.trace_id.hex()
        )
        if self.format == "json":
            now = time.time()
            record = {
                "time": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now % 1 * 1000):03d}Z",
                "client": client,
                "method": method,
                "target": target,
                "status": status,
                "route": ex.route_name,
                "upstream": ex.upstream_name,
                "replica": ex.replica_name,
                "tries": len(ex.tried),
                "cache": cache,
                "error": error,
                "request_id": ex.request_id.decode("latin-1"),
                "duration_ms": round(duration_ms, 1),
            }
            if trace_id is not None:
                record["trace_id"] = trace_id
            tls = scope.get("fender.tls")
            if tls is not None:
                record["tls"] = tls[0]
                record["client_cert"] = tls[1]
            log.info("%s", json.dumps(record, separators=(",", ":")))
            return
        tls = scope.get("fender.tls")
        log.info(
            '%s "%s %s" %d route=%s upstream=%s replica=%s tries=%d cache=%s error=%s rid=%s %.1fms%s%s',
            client or "-",
            method,
            target,
            status,
            ex.route_name,
            ex.upstream_name or "-",
            ex.replica_name or "-",
            len(ex.tried),
            cache or "-",
            error or "-",
            ex.request_id.decode("latin-1"),
            duration_ms,
            "" if trace_id is None else f" trace={trace_id}",
            "" if tls is None else f" tls={tls[0]} client_cert={_quoted(tls[1])}",
        )


def _quoted(subject: str | None) -> str:
    return "-" if subject is None else '"' + subject.replace('"', "'") + '"'


class _BareLines(logging.StreamHandler):
    """stderr, message only: a JSON line must not get the process's time/level prefix."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))


def _bare_json_lines(on: bool) -> None:
    """JSON lines go to stderr bare, unless whoever embeds Fender gave fender.access its own handlers."""
    ours = [h for h in log.handlers if isinstance(h, _BareLines)]
    if on:
        if not log.handlers:
            log.addHandler(_BareLines())
            log.propagate = False
        return
    for handler in ours:
        log.removeHandler(handler)
    if ours:
        log.propagate = True
