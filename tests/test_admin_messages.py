"""Admin answers that say what happened (issue 17): token refusals, the OpenAPI media types, and
breaker moves made through the admin API logged as such, never like a trip traffic caused."""

from __future__ import annotations

import logging

import httpx

from tests.conftest import policy_text
from tests.support.admin import TOKEN, admin_policy
from tests.support.raw_upstream import RawUpstream


async def test_missing_wrong_and_non_bearer_tokens_get_distinct_messages(
    echo_upstream, start_fender, monkeypatch
) -> None:
    monkeypatch.setenv("FENDER_TEST_ADMIN_TOKEN", TOKEN)
    fender = await start_fender(admin_policy(echo_upstream.port, auth="{token_env: FENDER_TEST_ADMIN_TOKEN}"))
    async with httpx.AsyncClient(base_url=fender.admin_url) as client:
        sent = {
            "missing": {},
            "empty": {"authorization": "Bearer"},
            "wrong": {"authorization": "Bearer " + TOKEN[:-1] + "y"},
            "prefix": {"authorization": "Bearer " + TOKEN[:20]},
            "basic": {"authorization": "Basic " + TOKEN},
        }
        answers = {}
        for case, headers in sent.items():
            r = await client.get("/admin/config", headers=headers)
            assert r.status_code == 401, case
            answers[case] = (r.json()["error"], r.headers["www-authenticate"])
        ok = await client.get("/admin/config", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200

    missing, challenge = answers["missing"]
    assert "admin token required" in missing and challenge == 'Bearer realm="fender-admin"'
    assert answers["empty"] == answers["missing"]
    wrong, challenge = answers["wrong"]
    assert "not accepted" in wrong and challenge == 'Bearer realm="fender-admin", error="invalid_token"'
    # A near miss and a prefix read exactly alike: nothing tells how close a guess came.
    assert answers["prefix"] == answers["wrong"]
    assert "not a bearer token" in answers["basic"][0]
    assert len({missing, wrong, answers["basic"][0]}) == 3
    for message, _ in answers.values():
        assert TOKEN[:4] not in message and str(len(TOKEN)) not in message


async def test_openapi_describes_the_status_page_as_html(echo_upstream, start_fender) -> None:
    fender = await start_fender(admin_policy(echo_upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url) as client:
        paths = (await client.get("/admin/openapi.json")).json()["paths"]
        page = await client.get("/")
    assert list(paths["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert page.headers["content-type"].startswith("text/html")
    assert list(paths["/status.js"]["get"]["responses"]["200"]["content"]) == ["text/javascript"]
    assert list(paths["/admin/status"]["get"]["responses"]["200"]["content"]) == ["application/json"]


ROUTES = """
- name: catalog
  upstream: echo
  circuit_breaker: {consecutive_failures: 1, scope: route, open_for: 30s}
"""


def breaker_lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fender.breaker"]


async def test_admin_moves_are_logged_as_admin_moves_and_a_trip_as_a_trip(start_fender, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fender.breaker")
    async with RawUpstream(lambda req, conn: conn.send(503, [], b"down")) as up:
        fender = await start_fender(policy_text(up.port, routes=ROUTES))
        async with httpx.AsyncClient() as client:

            async def admin(action: str) -> None:
                r = await client.post(f"{fender.admin_url}/admin/breakers/catalog/{action}")
                assert r.status_code == 200

            await admin("open")
            await admin("close")
            await admin("close")  # already closed: still a line, the operator acted
            await admin("open")
            await admin("reset")
            assert (await client.get(fender.url + "/")).status_code == 503  # a real trip
    assert breaker_lines(caplog) == [
        (logging.WARNING, "breaker catalog: closed -> open for 30s (forced open by admin API)"),
        (logging.INFO, "breaker catalog: open -> closed (forced closed by admin API)"),
        (logging.INFO, "breaker catalog: closed, window cleared (forced closed by admin API)"),
        (logging.WARNING, "breaker catalog: closed -> open for 30s (forced open by admin API)"),
        (logging.INFO, "breaker catalog: open -> closed (reset by admin API)"),
        (logging.WARNING, "breaker catalog: closed -> open for 30s"),
    ]
