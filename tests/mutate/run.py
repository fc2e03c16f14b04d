"""Mutation check: does the suite catch a rule being broken? (`make mutate`; not part of `make test`)

Each mutation below breaks one promised rule by replacing an exact piece of production
code. For each, in a throwaway copy of the tree (never the real files), the text is
replaced, the test files that should catch it run with PYTHONPATH on the copy, and the
mutation is *caught* when they fail, *missed* when they pass. The find-text must occur
exactly once in its file: when the code changes under it, the script stops with an error
naming the mutation, so the list is kept up to date rather than silently testing nothing.

    python tests/mutate/run.py              # all of them
    python tests/mutate/run.py vary-ignored budget-deposits
    python tests/mutate/run.py --list

Exit status: 0 when every mutation was caught, 1 when one was missed, 2 on a bad list.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("proxy", "tests", "policies", "docs", "deploy", "pyproject.toml", "README.md")
PER_MUTATION_TIMEOUT = 600  # seconds


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]  # test files (or pytest node ids) that must fail with the mutation


MUTATIONS = (
    # -- the four rules issue 26 found uncovered --------------------------------------------------
    Mutation(
        "5xx-replaces-stored-good",
        "proxy/policies/cache/replies.py",
        "if failed and (stale is not None or local):",
        "if failed and local:",
        ("tests/test_cache.py",),
    ),
    Mutation(
        "only-first-selecting-header",
        "proxy/policies/cache/store.py",
        "zip(entry.vary, entry.selection, strict=True)",
        "zip(entry.vary[:1], entry.selection[:1], strict=True)",
        ("tests/test_cache.py",),
    ),
    Mutation(
        "retry-outside-bulkhead",
        "proxy/policies/chain.py",
        '    ("bulkhead", bulkhead.build_layer),\n    ("adaptive_concurrency", adaptive.build_layer),\n    ("retry", retry.build_layer),\n',
        '    ("retry", retry.build_layer),\n    ("adaptive_concurrency", adaptive.build_layer),\n    ("bulkhead", bulkhead.build_layer),\n',
        ("tests/test_pipeline_order.py",),
    ),
    Mutation(
        "any-failed-trial-reopens",
        "proxy/policies/breaker/machine.py",
        "if self._over(self.trial_calls, self.trial_failures, self.trial_slow):",
        "if self.trial_failures or self._over(self.trial_calls, self.trial_failures, self.trial_slow):",
        ("tests/test_breaker.py",),
    ),
    # -- the eleven the suite already caught when the issue was filed -------------------------------
    Mutation(
        "retry-after-bytes-sent",
        "proxy/policies/retry/layer.py",
        "reply.error is not None and not reply.error.request_sent",
        "reply.error is not None",
        (
            "tests/test_retry.py",
            "tests/test_hardening_policies.py::test_post_without_idempotency_key_is_not_retried_once_bytes_were_sent",
        ),
    ),
    Mutation(
        "budget-deposits",
        "proxy/policies/retry/budget.py",
        "self._requests[slot] += 1\n        self._req_sum += 1",
        "self._requests[slot] += 1",
        ("tests/test_retry.py",),
    ),
    Mutation(
        "vary-ignored",
        "proxy/policies/cache/route.py",
        "names = self.key_headers + (analysis.vary or ())",
        "names = self.key_headers",
        ("tests/test_cache.py",),
    ),
    Mutation(
        "variant-replacement",
        "proxy/policies/cache/store.py",
        "kept = [e for e in self.entries if not (e.vary == entry.vary and e.selection == entry.selection)]",
        "kept = list(self.entries)",
        ("tests/test_cache_policy.py",),
    ),
    Mutation(
        "unbounded-variants",
        "proxy/policies/cache/store.py",
        "[entry, *kept][:MAX_VARIANTS]",
        "[entry, *kept]",
        ("tests/test_cache_policy.py",),
    ),
    Mutation(
        "breaker-not-handed-over-on-reload",
        "proxy/policies/breaker/layer.py",
        "breaker = ctx.keep(key, options, lambda: _new_breaker(owner, route, options, ctx))",
        "breaker = _new_breaker(owner, route, options, ctx)",
        ("tests/test_handover.py",),
    ),
    Mutation(
        "retry-on-tried-replica",
        "proxy/cluster/picker.py",
        "if tried and picked.name in tried:",
        "if False:",
        ("tests/test_failover.py",),
    ),
    Mutation(
        "connection-cap-off",
        "proxy/server/protocol.py",
        "if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:",
        "if False:",
        ("tests/test_hardening_limits.py", "tests/test_hardening_overload.py"),
    ),
    Mutation(
        "breaker-inside-retry",
        "proxy/policies/chain.py",
        '    ("circuit_breaker", breaker.build_layer),\n    ("bulkhead", bulkhead.build_layer),\n    ("adaptive_concurrency", adaptive.build_layer),\n    ("retry", retry.build_layer),\n',
        '    ("bulkhead", bulkhead.build_layer),\n    ("adaptive_concurrency", adaptive.build_layer),\n    ("retry", retry.build_layer),\n    ("circuit_breaker", breaker.build_layer),\n',
        ("tests/test_pipeline_order.py", "tests/test_deadline_explain.py"),
    ),
    Mutation(
        "deadline-ignores-try-time",
        "proxy/policies/retry/layer.py",
        "if wait + max(now - started, 0.001) > left:",
        "if wait > left:",
        ("tests/test_retry.py",),
    ),
    Mutation(
        "own-answers-count-as-breaker-successes",
        "proxy/policies/breaker/layer.py",
        "                breaker.release(token)\n",
        "                breaker.record(token, False, self.clock.now() - started)\n",
        ("tests/test_breaker.py",),
    ),
)


def check_list(mutations: tuple[Mutation, ...]) -> list[str]:
    """Problems with the list against the real tree: each find-text once in its file, test files present."""
    problems = []
    names = [m.name for m in mutations]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"{name}: listed twice")
    for m in mutations:
        path = ROOT / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.find)
        if count != 1:
            problems.append(f"{m.name}: find-text occurs {count} times in {m.file} (must be exactly once)")
        for test in m.tests:
            if not (ROOT / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {test} does not exist")
    return problems


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "last.json")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, dest / name)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    """pytest on ``tests`` inside ``tree``, stopping at the first failure: (exit code, seconds, summary)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=PER_MUTATION_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - started, f"timed out after {PER_MUTATION_TIMEOUT}s"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary_at = next((i for i, line in enumerate(lines) if "short test summary info" in line), len(lines))
    failed = [line.split()[1] for line in lines[summary_at:] if line.startswith(("FAILED ", "ERROR "))]
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    return done.returncode, time.monotonic() - started, summary + (f" ({failed[0]})" if failed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    args = parser.parse_args(argv)
    problems = check_list(MUTATIONS)
    if problems:
        print("mutation list is out of date with the code:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.file}  ->  {' '.join(m.tests)}")
        return 0
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="fender-mutate-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for m in chosen:
            target = tree / m.file
            original = target.read_text()
            target.write_text(original.replace(m.find, m.replace, 1))
            try:
                code, seconds, last = run_tests(tree, m.tests)
            finally:
                target.write_text(original)
            # pytest exits 1 when a test failed; anything else (0 passed, 2+ errors, a timeout) is not a catch.
            verdict = "caught" if code == 1 else "MISSED" if code == 0 else f"error (exit {code})"
            results.append((m, verdict))
            print(f"{verdict:8} {m.name:40} {seconds:6.1f}s  {last}", flush=True)
    caught = sum(1 for _, verdict in results if verdict == "caught")
    print(f"\n{caught}/{len(results)} caught in {time.monotonic() - started:.0f}s")
    missed = [m.name for m, verdict in results if verdict != "caught"]
    if missed:
        print("not caught: " + ", ".join(missed))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
