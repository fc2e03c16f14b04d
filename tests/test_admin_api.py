"""Admin API: bearer token, GET never mutates, and the OpenAPI document matches what is served."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from proxy.admin.ops import openapi_path
from proxy.config import PolicyError, parse_policy
from proxy.ops.auth import AdminAuthError, resolve_admin_token
from tests.conftest import ROOT
from tests.support.admin import TOKEN, admin_policy


def test_admin_beyond_loopback_without_token_is_an_invalid_policy():
    with pytest.raises(PolicyError, match="reachable beyond this host, but no admin token is configured"):
        parse_policy(admin_policy(9, admin="0.0.0.0:0"))


def test_cli_reports_the_missing_token_and_exits_2(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(admin_policy(9, admin="0.0.0.0:0"))
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{path}:2:8: admin: the admin listener 0.0.0.0:0 is reachable beyond this host" in proc.stderr


def test_token_sources_and_their_errors(tmp_path):
    env_policy = parse_policy(admin_policy(9, admin="0.0.0.0:0", auth="{token_env: FENDER_ADMIN_TOKEN}"))
    assert resolve_admin_token(env_policy, {"FENDER_ADMIN_TOKEN": f"  {TOKEN}\n"}) == TOKEN
    with pytest.raises(AdminAuthError, match="FENDER_ADMIN_TOKEN, but that environment variable is unset"):
        resolve_admin_token(env_policy, {})
    with pytest.raises(AdminAuthError, match="shorter than 16"):
        resolve_admin_token(env_policy, {"FENDER_ADMIN_TOKEN": "short"})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    file_policy = parse_policy(admin_policy(9, auth=f'{{token_file: "{token_file}"}}'))
    assert resolve_admin_token(file_policy, {}) == TOKEN
    missing = parse_policy(admin_policy(9, auth=f'{{token_file: "{tmp_path / "nope"}"}}'))
    with pytest.raises(AdminAuthError, match="cannot read it"):
        resolve_admin_token(missing, {})
    # Loopback without a token is allowed (the default).
    assert resolve_admin_token(parse_policy(admin_policy(9)), {}) is None


async def test_token_guards_admin_endpoints_but_not_probes_or_metrics(
    echo_upstream, start_fender, monkeypatch
):
    monkeypatch.setenv("FENDER_TEST_ADMIN_TOKEN", TOKEN)
    fender = await start_fender(admin_policy(echo_upstream.port, auth="{token_env: FENDER_TEST_ADMIN_TOKEN}"))
    async with httpx.AsyncClient(base_url=fender.admin_url) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        missing = await client.get("/admin/config/status")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.post("/admin/reload", headers={"authorization": "Bearer " + TOKEN[:-1] + "y"})
        assert wrong.status_code == 401
        assert fender.reloader.last_attempt is None  # the refused POST did nothing
        good = await client.get("/admin/config/status", headers={"authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200 and good.json()["ok"] is True


def _required(schema: dict, doc: dict) -> list[str]:
    ref = schema.get("$ref")
    if ref:
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema.get("required", [])


async def test_openapi_matches_the_served_endpoints(echo_upstream, start_fender):
    fender = await start_fender(admin_policy(echo_upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as client:
        doc = (await client.get("/admin/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        served = {
            openapi_path(route.path): {m.lower() for m in route.methods if m != "HEAD"}
            for route in fender.admin_app.routes
        }
        documented = {path: set(ops) for path, ops in doc["paths"].items()}
        assert documented == served
        for path, operations in doc["paths"].items():
            for method, operation in operations.items():
                assert operation["summary"]
                response = await client.request(method.upper(), path)
                codes = operation["responses"]
                if operation.get("x-fender-generic"):
                    # Documented from a docstring only (e.g. a path with {name}): served, and no server error.
                    assert response.status_code not in (404, 405) or "{" in path, (method, path)
                    assert response.status_code < 500, (method, path)
                    continue
                assert str(response.status_code) in codes, (method, path, response.status_code)
                content = codes[str(response.status_code)]["content"]
                if "application/json" in content:
                    body = response.json()
                    for key in _required(content["application/json"]["schema"], doc):
                        assert key in body, (path, key)
                else:
                    # Exactly what the document says: text/plain for probes, text/html for the status page.
                    assert response.headers["content-type"].partition(";")[0] in content, (path, content)


async def test_get_never_mutates(echo_upstream, start_fender):
    fender = await start_fender(admin_policy(echo_upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as client:
        doc = (await client.get("/admin/openapi.json")).json()
        runtime, status = fender.runtime, fender.reloader.status()
        for path, operations in doc["paths"].items():
            if "get" in operations:
                assert (await client.get(path)).status_code < 500
            else:
                # Changing endpoints refuse GET rather than act on it.
                assert (await client.get(path)).status_code == 405, path
        assert fender.runtime is runtime
        assert fender.reloader.status() == status
        assert fender.reloader.last_attempt is None


def test_openapi_documents_module_endpoints_from_their_docstring():
    from starlette.routing import Route

    from proxy.admin.ops import build_openapi

    async def force_open(request):
        """Force a breaker open until reset.

        More words."""

    doc = build_openapi([Route("/admin/breakers/{name}/open", force_open, methods=["POST"])])
    operation = doc["paths"]["/admin/breakers/{name}/open"]["post"]
    assert operation["summary"] == "Force a breaker open until reset."
    assert set(operation["responses"]) == {"200", "400", "404"}
    assert operation["security"] == [{"bearer": []}]
