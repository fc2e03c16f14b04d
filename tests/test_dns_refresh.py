"""The refresh state machine of names (TTL bounds, jitter, backoff, max_stale) on an injected clock,
the name cache, the hosts file, and the validation of the dns: section and of resolve/srv entries.

Unit tests: no socket, no process (the resolver against a real name server is in test_dns.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.clock import ManualClock
from proxy.cluster.dns.refresh import JITTER, NameCache, Refresher, RefreshState, Target
from proxy.cluster.dns.resolver import HostsFile, LookupFailed
from proxy.cluster.options import DnsOptions
from proxy.config import PolicyError, parse_policy
from proxy.metrics import Metrics
from tests.support.procs import wait_until

OPTIONS = DnsOptions(min_ttl="1s", max_ttl="60s", max_stale="5m", max_addresses=3)


def targets(*hosts: str) -> tuple[Target, ...]:
    return tuple(Target(h, 80, 0, 1, "svc.test") for h in hosts)


def test_an_answer_lives_its_ttl_bounded_by_min_and_max_ttl_plus_up_to_ten_percent():
    state = RefreshState(OPTIONS, random.Random(1))
    for ttl, base in ((0, 1.0), (0.2, 1.0), (30, 30.0), (3600, 60.0)):
        delays = [state.answer(targets("10.0.0.1"), ttl, 100.0) for _ in range(200)]
        assert all(base <= d <= base * (1 + JITTER) for d in delays)
        assert len({round(d, 9) for d in delays}) > 100  # jittered: a fleet does not ask in lockstep


def test_failures_keep_the_last_good_set_and_back_off_doubling_up_to_max_ttl():
    state = RefreshState(OPTIONS, random.Random(2))
    state.answer(targets("10.0.0.1", "10.0.0.2"), 5, now=0.0)
    bases = []
    for n in range(10):
        delay = state.failure("timeout", "no answer", now=1000.0 * (n + 1))  # hours later: still kept
        bases.append(delay)
        assert state.targets == targets("10.0.0.1", "10.0.0.2")
    expected = [min(2.0**n, 60.0) for n in range(10)]
    assert all(e <= d <= e * (1 + JITTER) for d, e in zip(bases, expected, strict=True))
    assert state.failures == 10 and state.outcome == "timeout"
    state.answer(targets("10.0.0.3"), 5, now=20000.0)
    assert state.failures == 0 and state.targets == targets("10.0.0.3")


def test_nxdomain_keeps_the_set_until_it_is_max_stale_old_and_asks_again_on_time():
    options = DnsOptions(min_ttl="1s", max_ttl="60s", max_stale="100s")
    state = RefreshState(options, random.Random(3))
    state.answer(targets("10.0.0.1"), 30, now=0.0)
    delay = state.failure("nxdomain", "gone", now=90.0)
    assert state.targets == targets("10.0.0.1")
    assert delay <= 10.0  # the next lookup is no later than the moment the set turns max_stale old
    now = 90.0
    for _ in range(20):  # bounded: the drop comes at 100s
        now += delay
        delay = state.failure("nxdomain", "gone", now)
        if not state.targets:
            break
    assert state.targets == () and now >= 100.0 and now <= 100.0 + 1e-6 + 1.0 * (1 + JITTER)
    assert state.age(now) == now  # the age of the last good answer goes on growing


def test_an_empty_answer_counts_like_nxdomain_and_a_truncated_one_is_cut_to_max_addresses():
    state = RefreshState(OPTIONS)
    five = targets("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5")
    state.answer(five, 5, now=0.0)
    kept = state.targets
    assert len(kept) == 3 and set(kept) <= set(five) and state.truncated == 2
    for shift in range(1, 5):  # a server rotating its answer: the same three, in the same order
        state.answer(five[shift:] + five[:shift], 5, now=float(shift))
        assert state.targets == kept
    state.failure("empty", "no records", now=state.last_good + OPTIONS.max_stale)
    assert state.targets == ()


class Script:
    """A lookup function for the refresher that gives answers the test decides, one per call."""

    def __init__(self) -> None:
        self.answers: list = []
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else self.last
        self.last = answer
        if isinstance(answer, LookupFailed):
            raise answer
        return answer


async def test_the_refresher_follows_the_ttl_on_the_injected_clock_and_reports_changes():
    clock = ManualClock()
    metrics = Metrics()
    counters = {o: metrics.dns_lookups.labels("up", o) for o in ("ok", "timeout", "nxdomain")}
    script = Script()
    changes: list[tuple[Target, ...]] = []
    options = DnsOptions(min_ttl="1s", max_ttl="10s", max_stale="30s")
    refresher = Refresher("up", "svc.test (resolve)", script, options, clock, changes.append, counters)
    script.answers = [
        (targets("10.0.0.1"), 5.0),
        (targets("10.0.0.1"), 5.0),  # unchanged: no change reported
        (targets("10.0.0.1", "10.0.0.2"), 5.0),
        LookupFailed("timeout", "no answer"),
        LookupFailed("nxdomain", "svc.test does not exist (NXDOMAIN)"),
    ]
    await refresher.refresh()
    assert changes == [targets("10.0.0.1")] and 5.0 <= refresher.next_at - clock.now() <= 5.5
    refresher.start()

    async def step_to_next() -> None:
        calls = script.calls
        clock.advance(refresher.next_at - clock.now())
        await wait_until(lambda: script.calls > calls, within=2, what="the next lookup")
        await asyncio.sleep(0)

    await step_to_next()
    assert changes == [targets("10.0.0.1")]
    await step_to_next()
    assert changes[-1] == targets("10.0.0.1", "10.0.0.2")
    await step_to_next()  # timeout: set kept, backoff 1s
    assert len(changes) == 2 and 1.0 <= refresher.next_at - clock.now() <= 1.1
    for _ in range(10):  # NXDOMAIN from now on; the set goes once 30s old
        await step_to_next()
        if changes[-1] == ():
            break
    assert changes[-1] == () and refresher.state.age(clock.now()) >= 30.0 - 1e-6
    assert counters["ok"]._value.get() == 3 and counters["timeout"]._value.get() == 1
    assert counters["nxdomain"]._value.get() >= 2
    await refresher.close()


async def test_the_name_cache_asks_once_per_ttl_and_keeps_addresses_through_failures():
    clock = ManualClock()

    class Resolver:  # a name server that answers what the test says (the cache's own logic is the subject)
        options = DnsOptions(min_ttl="1s", max_ttl="60s", max_stale="10s")

        def __init__(self) -> None:
            self.calls = 0
            self.answer: object = None

        async def addresses(self, name):
            self.calls += 1
            if isinstance(self.answer, LookupFailed):
                raise self.answer
            return self.answer

    from proxy.cluster.dns.resolver import AddressAnswer

    resolver = Resolver()
    metrics = Metrics()
    cache = NameCache(resolver, clock, metrics.dns_lookups)  # type: ignore[arg-type]
    resolver.answer = AddressAnswer(("10.0.0.1", "10.0.0.2"), 5.0)
    together = await asyncio.gather(*(cache.addresses("svc.test", "up") for _ in range(10)))
    assert together == [("10.0.0.1", "10.0.0.2")] * 10 and resolver.calls == 1  # one lookup at a time
    clock.advance(4.9)
    assert await cache.addresses("svc.test", "up") == ("10.0.0.1", "10.0.0.2") and resolver.calls == 1
    clock.advance(1.0)  # past the TTL (+ at most 10%)
    resolver.answer = LookupFailed("timeout", "no answer")
    assert await cache.addresses("svc.test", "up") == ("10.0.0.1", "10.0.0.2")  # last good kept
    assert resolver.calls == 2
    assert await cache.addresses("svc.test", "up") == ("10.0.0.1", "10.0.0.2")
    assert resolver.calls == 2  # the failure is remembered for its backoff: no lookup per connection
    resolver.answer = LookupFailed("nxdomain", "svc.test does not exist (NXDOMAIN)")
    for _ in range(20):  # bounded: max_stale is 10s after the last good answer
        clock.advance(1.5)
        try:
            await cache.addresses("svc.test", "up")
        except LookupFailed as failure:
            assert failure.outcome == "nxdomain"
            break
    else:
        raise AssertionError("the stale addresses were never dropped")
    assert metrics.dns_lookups.labels("up", "ok")._value.get() == 1


def test_the_hosts_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n::1 localhost\n10.0.0.7 app.internal app # comment\n")
    hosts = HostsFile(str(path))
    assert hosts.lookup("localhost") == ("127.0.0.1", "::1")
    assert hosts.lookup("APP") == ("10.0.0.7",)
    path.write_text("10.0.0.8 app\n# longer now, so the size differs too\n")
    assert hosts.lookup("app") == ("10.0.0.8",) and hosts.lookup("localhost") == ()


@pytest.mark.parametrize(
    ("dns", "at", "words"),
    [
        ('{resolvers: ["ns.example:53"]}', '"ns.example', "a name server is an IP address"),
        ('{resolvers: ["10.0.0.1:70000"]}', '"10.0.0.1:7', "the port must be a number from 1 to 65535"),
        ('{resolvers: ["10.0.0.1", "10.0.0.1:53"]}', '"10.0.0.1:53"', "is listed twice (also resolvers[0])"),
        ("{min_ttl: 2m, max_ttl: 1m}", "2m", "min_ttl (2m) cannot exceed max_ttl (1m)"),
        ("{max_addresses: 0}", "0}", "must be at least 1"),
        ("{max_stale: 0s}", "0s", "must be greater than 0s"),
    ],
)
def test_the_dns_section_is_checked_with_file_line_and_column(dns, at, words):
    line = f"dns: {dns}"
    text = f"""\
version: 1
{line}
upstreams: {{up: {{replicas: [{{url: http://127.0.0.1:9}}]}}}}
routes: [{{name: r, upstream: up}}]
"""
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    message = str(err.value)
    assert f"p.yaml:2:{line.index(at) + 1}:" in message and words in message, message


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("{url: http://10.0.0.1:80, resolve: true}", "10.0.0.1 is an IP address (remove resolve)"),
        ('{url: "unix:///run/a.sock", resolve: true}', "not a unix socket"),
        (
            "{srv: _http._tcp.a.test, weight: 3}",
            "takes its priorities, weights and ports from the SRV records",
        ),
        ("{srv: _http._tcp.a.test, url: http://a.test}", "give either url or srv, not both"),
        ("{srv: nodots}", "is not an SRV name"),
        ("{priority: 1}", "a replica needs a url"),
    ],
)
def test_replica_entries_with_resolve_or_srv_are_checked(entry, words):
    text = f"""\
upstreams:
  up:
    replicas:
      - {entry}
routes: [{{name: r, upstream: up}}]
"""
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert "p.yaml:4:" in str(err.value) and words in str(err.value), str(err.value)


async def test_the_outcome_of_a_try_to_a_replica_dns_removed_meanwhile_is_ignored():
    # A try still under way when a new answer drops its replica ends after set_replicas: its
    # outcome has no replica state left to update (it raised KeyError, a 500, under load).
    from proxy.cluster.upstream import UpstreamRuntime

    text = "upstreams:\n  up:\n    replicas: [{url: 'http://127.0.0.1:9'}, {url: 'http://127.0.0.2:9'}]\n"
    text += "routes:\n  - {name: r, upstream: up}\n"
    up = UpstreamRuntime("up", parse_policy(text).upstreams["up"], Metrics(), ManualClock())
    gone = up.replicas[1]
    await up.set_replicas(list(up.options.replicas[:1]), False)
    assert gone not in up.replicas
    up.observe(gone, 503, None, 0.1, [(b"retry-after", b"5")])  # no KeyError
    up.observe(gone, 0, None, 0.1)
    assert [r.name for r in up.replicas] == ["127.0.0.1:9"]
    await up.close()
