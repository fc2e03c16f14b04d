"""The data-path integration tests again, with granian serving the data listener (server.engine: granian).

uvicorn-specific behaviour (Fender's own request-head parser: 431/414 answers,
absolute-form refusal, framing refusals) is covered by the uvicorn runs only;
everything that is the proxy's own logic must hold on both servers.
"""

from __future__ import annotations

import pytest

from tests.support.need import need_module
from tests.test_proxy import (  # noqa: F401  (collected again here, on granian)
    test_body_limits_413,
    test_connect_failure_is_502_and_counted,
    test_exactly_one_date_header,
    test_get_is_proxied_with_forwarding_headers,
    test_head_and_no_body_statuses,
    test_keepalive_connection_reused_across_requests,
    test_rewrite_host,
    test_routing_first_match_methods_and_404,
    test_slow_upstream_is_504,
    test_streaming_both_ways_checked_by_hash,
    test_upstream_closing_before_response_is_502,
    test_upstream_dying_mid_body_cuts_only_that_response,
)
from tests.test_streaming import (  # noqa: F401  (collected again here, on granian)
    test_each_event_reaches_the_client_while_the_upstream_holds_the_next,
    test_request_body_pieces_reach_the_upstream_while_the_client_holds_the_next,
)

need_module("granian", "pip install 'fender[granian]'")


@pytest.fixture(autouse=True)
def granian_engine(monkeypatch):
    monkeypatch.setenv("FENDER_TEST_ENGINE", "granian")


async def test_data_listener_really_is_granian(echo_upstream, start_fender):
    import httpx

    from tests.conftest import policy_text

    fender = await start_fender(policy_text(echo_upstream.port))
    assert type(fender._servers[0]).__name__ == "_GranianServer"
    async with httpx.AsyncClient() as client:
        response = await client.get(fender.url + "/x")
    assert response.status_code == 200 and response.json()["path"] == "/x"
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(fender.admin_url + "/metrics")).text
    assert 'engine="granian"' in metrics.split("fender_policy_info{", 1)[1].split("}", 1)[0]
