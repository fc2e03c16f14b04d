"""Hot reload of the policy file, with rollback.

Triggers: a change of the file on disk (polled: inode, mtime, size, then a
content hash, so Kubernetes ConfigMap symlink swaps are seen), SIGHUP, and
``POST /admin/reload``. A new policy is validated completely and its runtime
built before anything changes; if either fails the running policy stays and
the error is logged, counted and shown at ``/admin/config/status``.

A good policy is swapped in by replacing one reference (``DataPlane.runtime``):
new requests take the new runtime; requests in flight keep the one they
started with, which is retired (objects the new runtime did not take over are
closed) once its last request finished, or after ``drain.timeout``.

Rollback returns to the previous good policy (a bounded stack of them), by
``POST /admin/rollback`` or automatically when ``reload.rollback_grace`` is set
and an upstream the reload added or changed had no reachable replica for the
whole grace period.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.clock import SYSTEM_CLOCK
from proxy.config import PolicyError
from proxy.config.loader import read_policy_file as read_policy_document
from proxy.config.models import Policy
from proxy.dataplane.runtime import Runtime
from proxy.ops.checkpoint import policy_fingerprint
from proxy.ops.host import ReloadHost
from proxy.ops.preflight import tls_file_problems
from proxy.upstream.reachable import replica_reachable

log = logging.getLogger("fender")

HISTORY = 10  # previous good policies kept for rollback
PROBE_TIMEOUT_CAP = 1.0
# Settings that live in the listeners: a reload records them but they apply at the next start.
RESTART_FIELDS = ("listen", "admin", "admin_auth", "checkpoint", "admin_tls")
RESTART_SERVER_FIELDS = ("keepalive_timeout", "max_connections")


@dataclass
class Loaded:
    """A policy that ran (or runs), and where it came from."""

    policy: Any
    file_sha256: str | None  # of the file text it was read from (None: not from the file)
    loaded_at: float  # unix time it was applied
    trigger: str  # start, file, signal, api, rollback, auto_rollback
    warnings: list[str] = field(default_factory=list)  # FILE:LINE:COL: warning: ... (proxy/config/lint.py)


@dataclass
class Attempt:
    at: float
    trigger: str
    result: str  # applied, unchanged, failed
    error: str | None = None
    errors: list[str] = field(default_factory=list)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_policy_file(path: str) -> tuple[Policy, str, list[str]]:
    """Parse the file; returns (policy, sha256 of its bytes, warnings) or raises PolicyError.

    The certificate, key and CA files the policy names are read too: one that cannot be used is
    a policy error at the line naming it (the running policy and its files stay)."""
    document = read_policy_document(path)
    # Unset environment references are errors here, and a file read always has its digest.
    assert document.policy is not None and document.sha256 is not None
    problems = tls_file_problems(document.policy)
    if problems:
        raise PolicyError([document.issue(at, message) for at, message in problems])
    return document.policy, document.sha256, [issue.as_warning() for issue in document.warnings]


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def changed_upstreams(old_policy, new_policy) -> list[str]:
    """Upstreams of the new policy that are new or whose settings differ."""
    return [
        name for name, options in new_policy.upstreams.items() if old_policy.upstreams.get(name) != options
    ]


def restart_required(old_policy, new_policy) -> list[str]:
    fields = [name for name in RESTART_FIELDS if getattr(old_policy, name) != getattr(new_policy, name)]
    fields += [
        f"server.{name}"
        for name in RESTART_SERVER_FIELDS
        if getattr(old_policy.server, name) != getattr(new_policy.server, name)
    ]
    if (old_policy.server.tls is None) != (new_policy.server.tls is None):
        fields.append("server.tls")  # turning HTTPS on or off; other changes of the block apply live
    return fields


class Reloader:
    """Owns the policy lifecycle of one Fender: reload, rollback, file watch, status."""

    def __init__(self, fender: ReloadHost, file_sha: str | None) -> None:
        self.fender = fender
        self.path = fender.source
        self.current = Loaded(fender.policy, file_sha, time.time(), "start")
        self.history: deque[Loaded] = deque(maxlen=HISTORY)
        self.last_attempt: Attempt | None = None
        self.last_failure: Attempt | None = None
        self.pending_restart: list[str] = []
        self._lock = asyncio.Lock()
        self._retiring: dict[int, Runtime] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watch_task: asyncio.Task | None = None
        self._guard_task: asyncio.Task | None = None
        self._failed_sha: str | None = None
        self.watch_clock = SYSTEM_CLOCK
        self.metrics = fender.metrics
        self.metrics.config_loaded_timestamp.set(self.current.loaded_at)

    # -- triggers ------------------------------------------------------------------

    async def reload(self, trigger: str) -> Attempt:
        """Read, validate and apply the policy file. Never raises for a bad policy."""
        async with self._lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> Attempt:
        if not self.path:
            return self._fail(trigger, ["this Fender was started without a policy file; nothing to reload"])
        try:
            policy, sha, warnings = await asyncio.to_thread(read_policy_file, self.path)
        except PolicyError as exc:
            self._failed_sha = file_sha256(self.path)
            return self._fail(trigger, [str(issue) for issue in exc.issues])
        if policy == self.current.policy:
            self.fender.refresh_tls(policy)  # the certificate files are re-read on every reload
            self.current.file_sha256 = sha
            self._failed_sha = None
            attempt = self._record(trigger, "unchanged")
            log.info("policy %s reloaded (%s): unchanged", self.path, trigger)
            return attempt
        attempt = await self._apply(policy, sha, trigger, warnings=warnings)
        if attempt.result == "failed":
            self._failed_sha = sha
        else:
            self._failed_sha = None
            self.fender.refresh_tls(policy)
        return attempt

    async def rollback(self, reason: str = "manual") -> Attempt | None:
        """Return to the previous good policy; None when there is none."""
        async with self._lock:
            if not self.history:
                return None
            previous = self.history.pop()
            trigger = "rollback" if reason == "manual" else "auto_rollback"
            attempt = await self._apply(
                previous.policy, previous.file_sha256, trigger, remember=False, warnings=previous.warnings
            )
            if attempt.result == "applied":
                self.metrics.config_rollbacks.labels(reason).inc()
            else:
                self.history.append(previous)
            return attempt

    # -- applying ------------------------------------------------------------------

    async def _apply(
        self, policy, sha: str | None, trigger: str, remember: bool = True, warnings: list[str] | None = None
    ) -> Attempt:
        fender = self.fender
        old = fender.runtime
        new = None
        try:
            new = Runtime(policy, fender.metrics, self.path, fender.clock, previous=old)
            await new.start()
        except Exception as exc:  # a module refusing the policy at build or start time
            log.exception("policy %s could not be built", self.path)
            if new is not None:  # close what it built; what it took over keeps serving
                await new.retire(old.owned_ids())
            return self._fail(trigger, [f"{self.path or '-'}: cannot build the runtime: {exc}"])
        fender.swap(new)
        if remember:
            self.history.append(self.current)
        self.pending_restart = restart_required(fender.started_policy, policy)
        self.current = Loaded(policy, sha, time.time(), trigger, list(warnings or ()))
        self.metrics.config_loaded_timestamp.set(self.current.loaded_at)
        attempt = self._record(trigger, "applied")
        log.info(
            "policy %s applied (%s): %d routes, %d upstreams, %d stateful objects carried over%s%s",
            self.path or "-",
            trigger,
            len(policy.routes),
            len(policy.upstreams),
            new.kept_objects,
            f"; needs a restart to change {', '.join(self.pending_restart)}" if self.pending_restart else "",
            _warnings_suffix(self.current.warnings),
        )
        self._spawn(self._retire(old))
        if self._guard_task is not None:
            self._guard_task.cancel()
            self._guard_task = None
        grace = policy.reload.rollback_grace
        if grace > 0 and trigger not in ("rollback", "auto_rollback"):
            changed = changed_upstreams(old.policy, policy)
            if changed:
                self._guard_task = self._spawn(self._guard(new, changed, grace))
        return attempt

    async def _retire(self, old: Runtime) -> None:
        self._retiring[id(old)] = old
        try:
            finished = await old.wait_idle(self.fender.policy.drain.timeout)
            if not finished:
                log.warning(
                    "%d requests still use the previous policy after drain.timeout; closing its idle "
                    "connections (busy ones close when their response ends)",
                    old.active,
                )
        finally:
            del self._retiring[id(old)]
        live = self.fender.runtime.owned_ids()
        for other in self._retiring.values():
            live |= other.owned_ids()
        await old.retire(live)

    def _record(self, trigger: str, result: str) -> Attempt:
        attempt = Attempt(time.time(), trigger, result)
        self.last_attempt = attempt
        self.metrics.config_reloads.labels(trigger, result).inc()
        self.metrics.config_last_reload_success.set(1)
        self._update_differs()
        return attempt

    def _fail(self, trigger: str, errors: list[str]) -> Attempt:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        attempt = Attempt(time.time(), trigger, "failed", first + more, errors)
        self.last_attempt = self.last_failure = attempt
        self.metrics.config_reloads.labels(trigger, "failed").inc()
        self.metrics.config_last_reload_success.set(0)
        self._update_differs()
        log.error("policy reload (%s) rejected, the running policy stays:\n%s", trigger, "\n".join(errors))
        return attempt

    def _update_differs(self) -> None:
        self.metrics.config_differs_from_file.set(0 if self.matches_file() else 1)

    def matches_file(self) -> bool:
        if not self.path:
            return True
        sha = file_sha256(self.path)
        return sha is not None and sha == self.current.file_sha256

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- automatic rollback ----------------------------------------------------------

    async def _guard(self, runtime: Runtime, names: list[str], grace: float) -> None:
        clock = self.fender.clock
        deadline = clock.now() + grace
        interval = min(1.0, grace / 4)
        unreached = set(names)
        while unreached:
            for name in list(unreached):
                upstream = runtime.upstreams[name]
                timeout = min(upstream.options.pool.connect_timeout, PROBE_TIMEOUT_CAP)
                results = await asyncio.gather(*(replica_reachable(r, timeout) for r in upstream.replicas))
                if any(results):
                    unreached.discard(name)
            if not unreached or clock.now() >= deadline:
                break
            await clock.sleep(min(interval, max(deadline - clock.now(), 0.0)))
        if not unreached or self.fender.runtime is not runtime:
            return
        log.error(
            "automatic rollback: no replica of %s was reachable within %.1fs of the reload",
            ", ".join(sorted(unreached)),
            grace,
        )
        self._guard_task = None
        await self.rollback("unreachable")

    # -- file watch ------------------------------------------------------------------

    def start(self) -> None:
        if self.path:
            self._watch_task = self._spawn(self._watch(_stat(self.path)))

    async def _watch(self, seen) -> None:
        # Polling a file is I/O against real time, not a state machine: it uses the system clock,
        # so tests that step Fender's injected clock (and count its sleepers) do not see it.
        clock = self.watch_clock
        pending = None
        while True:
            options = self.fender.policy.reload  # a reload may turn watching off or on
            await clock.sleep(options.watch_interval)
            if not options.watch:
                seen, pending = _stat(self.path), None
                continue
            now = _stat(self.path)
            if now == seen:
                pending = None
                continue
            if now != pending:
                pending = now  # changed: wait until it looks the same twice (debounce)
                continue
            seen, pending = now, None
            sha = file_sha256(self.path)
            if sha is None or sha == self.current.file_sha256 or sha == self._failed_sha:
                continue
            try:
                await self.reload("file")
            except Exception:  # pragma: no cover - the watcher must survive anything
                log.exception("reload after a file change failed")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        # Runtimes still retiring: close what the running one does not use.
        live = self.fender.runtime.owned_ids()
        for old in list(self._retiring.values()):
            await old.retire(live)
        self._retiring.clear()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict:
        last = self.last_attempt
        failure = self.last_failure
        ok = last is None or last.result != "failed"
        return {
            "ok": ok,
            "error": None if ok or last is None else last.error,
            "errors": [] if ok or last is None else last.errors,
            "version": self.current.policy.version,
            "fingerprint": policy_fingerprint(self.current.policy),
            "loaded_at": _iso(self.current.loaded_at),
            "source": self.path or None,
            "applied_by": self.current.trigger,
            "matches_file": self.matches_file(),
            "rollback_available": len(self.history),
            "pending_restart": self.pending_restart,
            "warnings": self.current.warnings,
            "last_attempt": None
            if last is None
            else {"at": _iso(last.at), "trigger": last.trigger, "result": last.result},
            "last_failure": None
            if failure is None
            else {"at": _iso(failure.at), "trigger": failure.trigger, "error": failure.error},
        }


def _warnings_suffix(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return f"; {len(warnings)} warning{'s' if len(warnings) > 1 else ''}:\n" + "\n".join(warnings)


def _stat(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap swap changes the inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
