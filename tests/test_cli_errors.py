"""Start-up errors of a real `fender run`: one line naming what failed, exit status 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_proxy_port_in_use_is_one_line_naming_the_listener(tmp_path):
    with held_port() as held:
        port = held.getsockname()[1]
        path = tmp_path / "policy.yaml"
        path.write_text(policy(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
        result = run_fender(str(path), "--log-level", "info")
    assert_one_line(
        result, f"fender: cannot listen on 127.0.0.1:{port} (proxy listener): address already in use"
    )


def test_admin_port_in_use_is_one_line_naming_the_listener(tmp_path):
    with held_port() as held:
        port = held.getsockname()[1]
        path = tmp_path / "policy.yaml"
        path.write_text(policy(f"127.0.0.1:{free_port()}", f"127.0.0.1:{port}"))
        result = run_fender(str(path))
    assert_one_line(
        result, f"fender: cannot listen on 127.0.0.1:{port} (admin listener): address already in use"
    )


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
