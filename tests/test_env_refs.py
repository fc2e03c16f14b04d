"""Environment references in the policy (${NAME}, ${NAME:-default}, $$) and secrets kept out of admin output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from proxy.config.loader import read_policy
from proxy.server.fender import Fender
from tests.conftest import ROOT
from tests.support.launch import launch_fender

POLICY = """\
upstreams:
  app:
    replicas:
      - url: http://${APP_HOST:-127.0.0.1}:${APP_PORT}
routes:
  - name: api
    upstream: app
    match:
      path_regex: "^/v[0-9]+/price$$"
      headers: {x-api-key: "${API_KEY}", x-cost: "$$5"}
"""


def test_references_expand_with_defaults_and_dollars() -> None:
    policy = parse_policy(POLICY, "p.yaml", {"APP_PORT": "9001", "API_KEY": "k-1"})
    replica = policy.upstreams["app"].replicas[0]
    assert (replica.host, replica.port) == ("127.0.0.1", 9001)  # the default, then the variable
    match = policy.routes[0].match
    assert match.path_regex == "^/v[0-9]+/price$"  # $$ is one $; a lone $ stays as written
    assert match.headers == {"x-api-key": "k-1", "x-cost": "$5"}
    # A set but empty variable takes the default too (as ${NAME:-default} does in the shell).
    empty = parse_policy(POLICY, "p.yaml", {"APP_HOST": "", "APP_PORT": "1", "API_KEY": "k"})
    assert empty.upstreams["app"].replicas[0].host == "127.0.0.1"


def test_unset_variable_is_an_error_at_its_value() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY, "p.yaml", {"API_KEY": "k"})
    assert [str(issue) for issue in info.value.issues] == [
        "p.yaml:4:14: upstreams.app.replicas[0].url: environment variable APP_PORT is not set "
        "(set it, or give a default: ${APP_PORT:-default})"
    ]


def test_without_the_environment_unset_variables_are_warnings_and_their_errors_are_left_out() -> None:
    document = read_policy(POLICY, "p.yaml", {}, unset_env="warn")
    # The URL cannot be checked without APP_PORT ("http://127.0.0.1:" would be refused): no error.
    assert document.policy is None
    assert [issue.as_warning() for issue in document.warnings] == [
        "p.yaml:4:14: warning: upstreams.app.replicas[0].url: environment variable APP_PORT is not set "
        "(set it, or give a default: ${APP_PORT:-default})",
        "p.yaml:10:28: warning: routes[0].match.headers.x-api-key: environment variable API_KEY is not set "
        "(set it, or give a default: ${API_KEY:-default})",
    ]
    # An error elsewhere is still an error.
    with pytest.raises(PolicyError, match=r"p.yaml:8:14: routes\[0\].timeout: "):
        read_policy(POLICY.replace("upstream: app", "upstream: app\n    timeout: 3"), "p.yaml", {}, "warn")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"${APP_PORT"', 'an environment reference "${" is not closed by "}" (write $$ for a literal $)'),
        ('"${9X}"', '"${9X}" is not an environment reference: write ${NAME} or ${NAME:-default}'),
    ],
)
def test_malformed_reference_is_located(value, message) -> None:
    text = f"upstreams:\n  app:\n    replicas: [{{url: {value}}}]\nroutes: [{{name: a, upstream: app}}]\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml", {})
    assert str(info.value.issues[0]).startswith(f"p.yaml:3:22: upstreams.app.replicas[0].url: {message}")


def test_a_secret_from_the_environment_never_shows_in_error_messages() -> None:
    text = "state: {backend: redis, redis: {url: '${REDIS_PASSWORD}'}}\n" + POLICY
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml", {"REDIS_PASSWORD": "hunter2-secret", "APP_PORT": "1", "API_KEY": "k"})
    shown = str(info.value)
    assert "is not a Redis URL" in shown and "hunter2-secret" not in shown and '"***"' in shown


def validate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "validate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in ("APP_PORT", "API_KEY")}, **env},
    )


def test_validate_warns_validate_env_and_run_refuse(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n" + POLICY)
    plain = validate(str(path), env={"API_KEY": "k"})
    line = (
        f"{path}:6:14: upstreams.app.replicas[0].url: environment variable APP_PORT is not set "
        "(set it, or give a default: ${APP_PORT:-default})"
    )
    assert plain.returncode == 0
    assert plain.stderr.splitlines() == [line.replace(":14: ", ":14: warning: ")]
    checked = validate(str(path), "--env", env={"API_KEY": "k"})
    assert checked.returncode == 1 and checked.stderr.splitlines() == [line]
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "APP_PORT"} | {"API_KEY": "k"},
    )
    assert run.returncode == 2
    assert run.stderr.splitlines()[0] == line


async def test_reload_refuses_an_unset_variable_and_keeps_the_running_policy(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("APP_PORT", "9001")
    monkeypatch.setenv("API_KEY", "k")
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    from proxy.config import load_policy

    fender = Fender(load_policy(path), str(path))
    try:
        monkeypatch.delenv("APP_PORT")
        path.write_text(POLICY.replace("name: api", "name: api2"))
        attempt = await fender.reloader.reload("api")
        assert attempt.result == "failed"
        assert attempt.errors == [
            f"{path}:4:14: upstreams.app.replicas[0].url: environment variable APP_PORT is not set "
            "(set it, or give a default: ${APP_PORT:-default})"
        ]
        assert fender.policy.routes[0].name == "api"
    finally:
        await fender.runtime.close()


async def test_secrets_never_appear_in_admin_config_routes_or_status(echo_upstream, monkeypatch) -> None:
    secret, tenant, password = "sk-live-0123456789", "tenant-token-abcdef", "pw-9876543210"
    monkeypatch.setenv("TEST_API_KEY", secret)
    monkeypatch.setenv("TEST_TENANT_TOKEN", tenant)
    monkeypatch.setenv("TEST_REDIS_PASS", password)
    text = textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        upstreams:
          echo: {{replicas: [{{url: http://127.0.0.1:{echo_upstream.port}}}]}}
        routes:
          - name: keyed
            upstream: echo
            match: {{headers: {{x-api-key: "${{TEST_API_KEY}}", x-tenant: "${{TEST_TENANT_TOKEN}}"}}}}
          - name: all
            upstream: echo
            match: {{headers: {{x-note: "redis://u:${{TEST_REDIS_PASS}}@cache:6379/0"}}}}
        """
    )
    fender = await launch_fender(text)
    try:
        base = f"http://127.0.0.1:{fender.admin_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            shown = {
                path: (await client.get(path)).text
                for path in ("/admin/config", "/admin/routes", "/admin/status", "/admin/config/status")
            }
            # The policy holds the secrets (the route matches on them) ...
            ok = await client.get(
                f"http://127.0.0.1:{fender.data_port}/x", headers={"x-api-key": secret, "x-tenant": tenant}
            )
        assert ok.status_code == 200
        # ... and no admin answer shows any of them.
        for path, body in shown.items():
            for value in (secret, tenant, password):
                assert value not in body, path
        config = json.loads(shown["/admin/config"])["policy"]
        assert config["routes"][0]["match"]["headers"] == {"x-api-key": "***", "x-tenant": "***"}
        assert config["routes"][1]["match"]["headers"] == {"x-note": "redis://u:***@cache:6379/0"}
    finally:
        await fender.stop()
