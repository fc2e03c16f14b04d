"""Checkpoints: what Fender learned (breaker states, replica health) saved across restarts.

The framework knows nothing about breakers or health checks. A policy module
registers a *provider* on the runtime while its layer is built::

    def build_layer(route, next_handler, ctx):      # ctx: proxy.policies.context.LayerContext
        breaker = ctx.keep(("breaker", route.name), route.circuit_breaker, lambda: Breaker(...))
        ctx.checkpoint(f"breaker/{route.name}", breaker.snapshot, breaker.restore)

(the registry, :class:`proxy.kernel.handover.CheckpointProviders`, sits in the kernel so the
policies need nothing from this module).

Contract for a provider ``(name, snapshot, restore)``:

* ``snapshot() -> dict`` returns JSON-serialisable plain data, quickly (it
  runs on the event loop). Include whatever identifies the settings the state
  belongs to (e.g. the breaker options dumped with ``model_dump(mode="json")``,
  replica URLs), and wall-clock times (``time.time()``), never monotonic ones:
  a restarted process has a different monotonic origin.
* ``restore(data)`` gets back what ``snapshot`` returned in the previous
  process, once, before the runtime serves. It must restore only what still
  matches its current settings and ignore the rest; it may raise on data it
  does not understand (the framework logs it and carries on).

The file is one JSON document: ``{"fender_checkpoint": 1, "written_at": <unix
time>, "policy": {"version": 1, "fingerprint": <sha256>}, "providers": {name:
data}}``, written atomically (temporary file in the same directory, fsync,
rename, fsync of the directory). A file that is corrupt, truncated, written
by a newer format, dated in the future or for another policy format version
is ignored with one warning; a provider whose data does not restore is
skipped with the others restored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from proxy.config.models import dump_policy

log = logging.getLogger("fender")

FORMAT = 1
MAX_BYTES = 64 * 1024 * 1024
# Clocks of a restarted host may differ a little; beyond this a checkpoint is "from the future".
FUTURE_SLACK_SECONDS = 300.0


def policy_fingerprint(policy) -> str:
    """sha256 of the effective policy (defaults filled in), stable across processes."""

    text = json.dumps(dump_policy(policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def build_document(runtime, now: float | None = None) -> dict:
    return {
        "fender_checkpoint": FORMAT,
        "written_at": time.time() if now is None else now,
        "policy": {"version": runtime.policy.version, "fingerprint": policy_fingerprint(runtime.policy)},
        "providers": runtime.checkpoints.snapshot_all(),
    }


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fender-checkpoint-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not open directories
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


class CheckpointUnusable(Exception):
    """Why a checkpoint file is ignored (one line for the warning)."""


def read_document(path: str, policy, now: float | None = None) -> dict | None:
    """The checkpoint at ``path`` checked for use with ``policy``; None when there is no file.

    Raises :class:`CheckpointUnusable` when the file must be ignored.
    """
    now = time.time() if now is None else now
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointUnusable(f"cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise CheckpointUnusable(f"larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointUnusable(f"corrupt or truncated ({exc})") from None
    if not isinstance(doc, dict) or "fender_checkpoint" not in doc:
        raise CheckpointUnusable("not a Fender checkpoint")
    fmt = doc.get("fender_checkpoint")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise CheckpointUnusable(f"unknown checkpoint format {fmt!r}")
    if fmt > FORMAT:
        raise CheckpointUnusable(f"written by a newer Fender (format {fmt}, this one reads {FORMAT})")
    written_at = doc.get("written_at")
    if not isinstance(written_at, int | float) or isinstance(written_at, bool):
        raise CheckpointUnusable("no valid written_at time")
    if written_at > now + FUTURE_SLACK_SECONDS:
        raise CheckpointUnusable(f"dated {written_at - now:.0f}s in the future")
    meta = doc.get("policy")
    if not isinstance(meta, dict) or meta.get("version") != policy.version:
        got = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointUnusable(f"from another policy version ({got!r}, running {policy.version})")
    providers = doc.get("providers")
    if not isinstance(providers, dict):
        raise CheckpointUnusable("no providers section")
    return doc


class Checkpointer:
    """Writes the running runtime's checkpoint periodically and on demand; restores at start."""

    def __init__(self, options, metrics, get_runtime: Callable[[], Any], clock) -> None:
        self.options = options
        self.path: str = options.path
        self.metrics = metrics
        self._get_runtime = get_runtime
        self._clock = clock
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.last_written: float | None = None
        self.last_error: str | None = None

    def restore(self, runtime) -> str:
        """Restore what the checkpoint file holds into ``runtime``; returns restored/ignored/absent."""
        try:
            doc = read_document(self.path, runtime.policy)
        except CheckpointUnusable as exc:
            log.warning("checkpoint %s ignored: %s", self.path, exc)
            self.metrics.checkpoint_restores.labels("ignored").inc()
            return "ignored"
        if doc is None:
            self.metrics.checkpoint_restores.labels("absent").inc()
            return "absent"
        restored, failed = runtime.checkpoints.restore_all(doc["providers"])
        if failed:
            log.warning("checkpoint %s: could not restore %s", self.path, "; ".join(failed))
        same = doc["policy"].get("fingerprint") == policy_fingerprint(runtime.policy)
        log.info(
            "checkpoint %s restored (%d providers%s)",
            self.path,
            len(restored),
            "" if same else "; the policy changed since, matching entries only",
        )
        self.metrics.checkpoint_restores.labels("restored").inc()
        return "restored"

    async def write(self) -> bool:
        """Write one checkpoint now (file I/O in a worker thread). Failures are logged and counted."""
        async with self._lock:
            runtime = self._get_runtime()
            doc = build_document(runtime)
            data = json.dumps(doc, separators=(",", ":")).encode()
            try:
                await asyncio.to_thread(write_atomically, self.path, data)
            except OSError as exc:
                self.last_error = f"{self.path}: {exc.strerror or exc}"
                log.warning("checkpoint write failed: %s", self.last_error)
                self.metrics.checkpoint_writes.labels("failed").inc()
                return False
            self.last_written = doc["written_at"]
            self.last_error = None
            self.metrics.checkpoint_writes.labels("ok").inc()
            self.metrics.checkpoint_last_write.set(doc["written_at"])
            return True

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await self._clock.sleep(self.options.interval)
            await self.write()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
