"""The dependency rules of docs/architecture.md that a running interpreter can check.

The import contracts themselves run in `make lint` (lint-imports); this checks what they cannot:
what a plain ``import proxy.config`` (all ``fender validate`` needs) really loads.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout))


def test_loading_the_config_loads_nothing_of_the_data_path_the_client_or_the_metrics():
    loaded = _modules_after("import proxy.config; proxy.config.parse_policy")
    ours = {m for m in loaded if m == "proxy" or m.startswith("proxy.")}
    assert "proxy.config.models" in ours and "proxy.policies.breaker.options" in ours  # it did load
    forbidden_prefixes = (
        "proxy.metrics",
        "proxy.upstream",
        "proxy.dataplane",
        "proxy.server",
        "proxy.admin",
        "proxy.kernel.exchange",
        "proxy.cluster.picker",
        "proxy.cluster.health",
        "proxy.cluster.upstream",
        "proxy.state.redis",
        "proxy.tracing.tracer",
        "proxy.policies.context",
        "proxy.policies.chain",
    )
    reached = sorted(m for m in ours if m.startswith(forbidden_prefixes) or m.endswith(".layer"))
    assert reached == []
    assert "prometheus_client" not in loaded and "httptools" not in loaded and "httpx" not in loaded


def test_a_policy_module_imports_on_its_own():
    # No load-order import keeps a cycle hidden: each policy's layer imports first in a fresh process.
    # (lint-imports' acyclic contract covers the rest; these are the ones that once needed one.)
    for module in (
        "proxy.policies.ratelimit.layer",
        "proxy.policies.bulkhead.layer",
        "proxy.kernel.exchange",
    ):
        assert module in _modules_after(f"import {module}")


def test_the_import_contracts_name_every_policy_package():
    # A policy added without its lines in pyproject.toml would escape the options and
    # independence contracts silently (fault injection once did).
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parent.parent
    policies = sorted(
        p.name for p in (root / "proxy" / "policies").iterdir() if p.is_dir() and (p / "__init__.py").exists()
    )
    assert "fault" in policies and "retry" in policies  # the listing found the packages
    contracts = {
        c["name"]: c
        for c in tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    }
    independent = contracts["Policies do not know each other (the chain composes them)"]["modules"]
    options = contracts["Options modules import only the options vocabulary, the reasons and each other"]
    assert sorted(m.removeprefix("proxy.policies.") for m in independent) == policies
    with_options = [p for p in policies if (root / "proxy" / "policies" / p / "options.py").exists()]
    assert (
        sorted(
            m.removeprefix("proxy.policies.").removesuffix(".options")
            for m in options["source_modules"]
            if m.startswith("proxy.policies.")
        )
        == with_options
    )
