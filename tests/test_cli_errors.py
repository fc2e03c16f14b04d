"""Start-up errors of a real `fender run`: one line naming what failed, exit status 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port


def run_fender(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`fender run ...` that is expected to stop by itself (every case here refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def held_port() -> socket.socket:
    """A listening socket on 127.0.0.1 that the test holds, so Fender cannot bind its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def policy(listen: str, admin: str, extra: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
            listen: {listen}
            admin: {admin}
            reload: {{watch: false}}
            upstreams:
              echo: {{replicas: [{{url: http://127.0.0.1:9}}]}}
            routes:
              - {{name: all, upstream: echo}}
            """
        )
        + extra
    )


def assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [line]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listener", ["proxy listener", "admin listener"])
def test_a_port_in_use_is_one_line_naming_the_listener(tmp_path, listener):
    with held_port() as held:
        port = held.getsockname()[1]
        taken, free = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
        path = tmp_path / "policy.yaml"
        path.write_text(policy(taken, free) if listener == "proxy listener" else policy(free, taken))
        result = run_fender(str(path), "--log-level", "info")
    assert_one_line(result, f"fender: cannot listen on {taken} ({listener}): address already in use")


def test_debug_log_level_shows_the_traceback(tmp_path):
    with held_port() as held:
        port = held.getsockname()[1]
        path = tmp_path / "policy.yaml"
        path.write_text(policy(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
        result = run_fender(str(path), "--log-level", "debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith(
        f"fender: cannot listen on 127.0.0.1:{port} (proxy listener): address already in use"
    )


def test_default_policy_missing_says_not_found(tmp_path):
    result = run_fender(cwd=tmp_path)  # no argument: policies/example.yaml, absent here
    assert_one_line(
        result, "fender: policy file policies/example.yaml not found (give the path: fender run POLICY.yaml)"
    )


def test_given_policy_missing_says_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run_fender(str(missing))
    assert_one_line(
        result, f"fender: policy file {missing} not found (give the path: fender run POLICY.yaml)"
    )


def test_unreadable_token_file_is_one_line(tmp_path):
    token_dir = tmp_path / "token"  # a directory: open() fails on it even for root
    token_dir.mkdir()
    path = tmp_path / "policy.yaml"
    path.write_text(policy("127.0.0.1:0", "127.0.0.1:0", f'admin_auth: {{token_file: "{token_dir}"}}\n'))
    result = run_fender(str(path))
    assert_one_line(result, f"fender: admin_auth.token_file {token_dir}: cannot read it (is a directory)")


def test_unset_token_env_is_one_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        policy("127.0.0.1:0", "127.0.0.1:0", "admin_auth: {token_env: FENDER_TEST_UNSET_TOKEN}\n")
    )
    env = {k: v for k, v in os.environ.items() if k != "FENDER_TEST_UNSET_TOKEN"}
    result = run_fender(str(path), env=env)
    assert_one_line(
        result,
        "fender: admin_auth.token_env names FENDER_TEST_UNSET_TOKEN, but that environment variable is unset "
        "or empty (set it to the token)",
    )


# --------------------------------------------------------------------------- validate = run
#
# Every refusal `fender run` makes, walked through `validate`, `validate --env` and `run`. Rows whose
# cause is in the policy alone are refused by all three with the same FILE:LINE:COL line; rows whose
# cause is this machine pass plain `validate`, and `validate --env` prints at FILE:LINE:COL the very
# message `run` prints after "fender: ".

BASE = """\
listen: {listen}
admin: {admin}
reload: {{watch: false}}
upstreams:
  echo: {{replicas: [{{url: http://127.0.0.1:9}}]}}
routes:
  - {{name: all, upstream: echo}}
"""


def _policy_only(extra: str = "", listen: str = "127.0.0.1:0", admin: str = "127.0.0.1:0") -> str:
    return BASE.format(listen=listen, admin=admin) + extra


# (name, policy given (tmp_path, held port), environment to drop or set, where, message, machine-dependent)
REFUSALS = [
    (
        "admin beyond loopback without admin_auth",
        lambda tmp, port: _policy_only(admin="0.0.0.0:0"),
        {},
        "2:8: admin: ",
        "the admin listener 0.0.0.0:0 is reachable beyond this host, but no admin token is configured: add "
        "admin_auth: {token_env: NAME} (or token_file), or bind admin to 127.0.0.1",
        False,
    ),
    (
        "max_request_line above max_header_bytes",
        lambda tmp, port: _policy_only("server: {max_request_line: 64KiB}\n"),
        {},
        "8:28: server.max_request_line: ",
        "max_request_line (64KiB) cannot exceed max_header_bytes (32KiB): the request line is part of the "
        "head, so a longer one would be cut by max_header_bytes (raise max_header_bytes as well)",
        False,
    ),
    (
        "listen and admin on one port",
        lambda tmp, port: (
            _policy_only(listen="127.0.0.1:8123", admin="0.0.0.0:8123") + "admin_auth: {token_env: X_TOKEN}\n"
        ),
        {},
        "2:8: admin: ",
        "listen (127.0.0.1:8123) and admin (0.0.0.0:8123) would bind the same port; give them different ports",
        False,
    ),
    (
        "proxy port in use",
        lambda tmp, port: _policy_only(listen=f"127.0.0.1:{port}"),
        {},
        "1:9: ",
        "cannot listen on 127.0.0.1:{port} (proxy listener): address already in use",
        True,
    ),
    (
        "admin port in use",
        lambda tmp, port: _policy_only(admin=f"127.0.0.1:{port}"),
        {},
        "2:8: ",
        "cannot listen on 127.0.0.1:{port} (admin listener): address already in use",
        True,
    ),
    (
        "token variable unset",
        lambda tmp, port: _policy_only("admin_auth: {token_env: FENDER_PARITY_TOKEN}\n"),
        {"FENDER_PARITY_TOKEN": None},
        "8:25: ",
        "admin_auth.token_env names FENDER_PARITY_TOKEN, but that environment variable is unset or empty "
        "(set it to the token)",
        True,
    ),
    (
        "token file unreadable",
        lambda tmp, port: _policy_only(f'admin_auth: {{token_file: "{tmp}"}}\n'),
        {},
        "8:26: ",
        "admin_auth.token_file {tmp}: cannot read it (is a directory)",
        True,
    ),
    (
        "token too short",
        lambda tmp, port: _policy_only("admin_auth: {token_env: FENDER_PARITY_TOKEN}\n"),
        {"FENDER_PARITY_TOKEN": "short"},
        "8:25: ",
        "the admin token is shorter than 16 characters; use a long random value",
        True,
    ),
    (
        "environment variable unset",
        lambda tmp, port: _policy_only().replace(
            "http://127.0.0.1:9", '"http://127.0.0.1:${FENDER_PARITY_PORT}"'
        ),
        {"FENDER_PARITY_PORT": None},
        "5:27: upstreams.echo.replicas[0].url: ",
        "environment variable FENDER_PARITY_PORT is not set (set it, or give a default: "
        "${FENDER_PARITY_PORT:-default})",
        True,
    ),
]


def _environment(changes: dict) -> dict:
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.mark.parametrize(
    ("name", "text", "env", "where", "message", "machine"), REFUSALS, ids=[row[0] for row in REFUSALS]
)
def test_validate_refuses_what_run_refuses(tmp_path, name, text, env, where, message, machine):
    with held_port() as held:
        port = held.getsockname()[1]
        path = tmp_path / "policy.yaml"
        path.write_text(text(tmp_path, port))
        message = message.replace("{port}", str(port)).replace("{tmp}", str(tmp_path))
        located = f"{path}:{where}{message}"
        environ = _environment(env)

        def fender(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "proxy", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                env=environ,
            )

        plain = fender("validate", str(path))
        checked = fender("validate", "--env", str(path))
        run = fender("run", str(path))
    assert "Traceback" not in plain.stderr + checked.stderr + run.stderr
    assert checked.returncode == 1 and checked.stderr.splitlines() == [located]
    assert run.returncode == 2
    if machine:
        assert plain.returncode == 0, plain.stderr  # without --env only the policy is judged
        if "is not set (set it" in message:
            # The one refusal in the policy text that depends on the machine: validate --env and run give
            # it as a policy problem at its line; plain validate warns (CI lacks the deployment's env).
            position, policy_path = where.split(": ", 1)
            assert plain.stderr.splitlines() == [f"{path}:{position}: warning: {policy_path}{message}"]
            assert run.stderr.splitlines()[0] == located
        else:
            assert run.stderr.splitlines() == [f"fender: {message}"]
    else:
        assert plain.returncode == 1 and plain.stderr.splitlines() == [located]
        assert run.stderr.splitlines()[0] == located


def test_missing_optional_package_is_refused_by_validate_env_and_run(monkeypatch):
    from proxy.config import parse_policy
    from proxy.ops import preflight

    policy = parse_policy(_policy_only("state: {backend: redis}\n"))
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda m: None if m == "redis" else real(m))
    [problem] = preflight.missing_packages(policy)
    assert str(problem) == "state.backend: redis needs the redis package (pip install 'fender[redis]')"
    assert problem.at == ("state", "backend")


def test_validate_of_a_missing_file_says_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "validate", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"fender: policy file {missing} not found (give the path: fender validate POLICY.yaml)"
    ]


def test_validate_env_says_what_it_checked_on_this_machine(tmp_path):
    from tests.conftest import free_port

    listen, admin = free_port(), free_port()
    path = tmp_path / "p.yaml"
    path.write_text(policy(f"127.0.0.1:{listen}", f"127.0.0.1:{admin}"))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "validate", "--env", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{path}: ok (1 routes")
    assert lines[1] == (
        f"{path}: this machine: ports 127.0.0.1:{listen} and 127.0.0.1:{admin} free, no admin token to read, "
        "packages the policy needs installed, environment references set"
    )
