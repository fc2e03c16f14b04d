"""The `fender` command as users run it: validate, schema, run as a process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.conftest import ROOT, free_port, pattern_bytes, wait_port


def fender(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_validate_example_policy():
    result = fender("validate", "policies/example.yaml")
    assert result.returncode == 0
    assert result.stdout.startswith("policies/example.yaml: ok (2 routes, 2 upstreams, 3 replicas")


def test_validate_reports_file_line_col_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            listen: 127.0.0.1:8080
            upstreams:
              catalog:
                replicas: [{url: http://127.0.0.1:9001}]
            routes:
              - name: catalog
                upstream: catalog
                timeot: 3s
            """
        )
    )
    result = fender("validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}:8:5: routes[0].timeot: unknown key" in result.stderr
    assert 'did you mean "timeout"' in result.stderr


def test_run_refuses_invalid_policy(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: 3\n")
    result = fender("run", str(bad))
    assert result.returncode == 2
    assert "not starting" in result.stderr


def test_schema_command_prints_json_schema():
    result = fender("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] and "routes" in schema["properties"]


@pytest.mark.slow
def test_process_streams_large_bodies_in_bounded_memory(fender_process, tmp_path):
    """256 MiB each way through a Fender process whose peak RSS must stay far below that."""
    upstream_port, port, admin = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM_SCRIPT, str(upstream_port)], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    try:
        wait_port(upstream_port)
        proc = fender_process(
            textwrap.dedent(
                f"""
                listen: 127.0.0.1:{port}
                admin: 127.0.0.1:{admin}
                upstreams:
                  echo: {{replicas: [{{url: http://127.0.0.1:{upstream_port}}}]}}
                routes:
                  - {{name: all, upstream: echo, max_body: 0B}}
                """
            )
        )
        proc.start(port)
        size = 256 * 1024 * 1024
        expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
        with httpx.Client(timeout=120) as client:
            digest = hashlib.sha256()
            with client.stream("GET", f"http://127.0.0.1:{port}/stream?size={size}") as response:
                for chunk in response.iter_raw():
                    digest.update(chunk)
            assert digest.hexdigest() == expected

            def upload():
                step = 1024 * 1024
                for offset in range(0, size, step):
                    yield pattern_bytes(step, offset)

            result = client.post(f"http://127.0.0.1:{port}/hash", content=upload()).json()
        assert result["body_length"] == size and result["body_sha256"] == expected
        peak = proc.peak_rss_mib()
        assert peak < 120, f"peak RSS {peak:.0f} MiB while streaming 256 MiB: bodies are being buffered"
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


UPSTREAM_SCRIPT = """
import asyncio, sys, uvicorn
sys.path.insert(0, ".")
from tests.conftest import EchoUpstream
uvicorn.run(EchoUpstream(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off", ws="none")
"""
