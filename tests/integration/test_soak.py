"""
A bounded soak: thousands of mixed requests (healthy, failing, streaming,
cancelled, limited, unknown) through a real gateway site on the real
reactor, in front of a real backend process.  Afterwards: no 5xx where the
backend was healthy, flat memory, no file-descriptor or connection leak,
and every timer the gateway created was fired or cancelled.
"""

from __future__ import annotations

import io
import os
import random
import resource

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from tests.integration.conftest import free_port
from txgateway.config.gateway import parse_config
from txgateway.daemon.service import GatewayService

pytestmark = pytest.mark.integration

ROUNDS = 2
REQUESTS_PER_ROUND = 2500
CONCURRENCY = 24


class RecordingClock:
    """The reactor's clock, remembering every call the gateway schedules."""

    def __init__(self, wrapped) -> None:
        self._wrapped = wrapped
        self.calls = []

    def seconds(self) -> float:
        return self._wrapped.seconds()

    def callLater(self, delay, f, *args, **kwargs):
        call = self._wrapped.callLater(delay, f, *args, **kwargs)
        self.calls.append(call)
        return call

    def getDelayedCalls(self):
        return [call for call in self.calls if call.active()]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MIX = [
    ("healthy", 55),
    ("stream", 10),
    ("failing", 10),
    ("cancelled", 5),
    ("limited", 10),
    ("unknown", 5),
    ("bad_path", 5),
]


def hang_calls(calls: dict) -> int:
    return sum(count for path, count in calls["by_path"].items() if path.endswith("/hang"))


def pick(rng: random.Random) -> str:
    return rng.choices([name for name, _ in MIX], [weight for _, weight in MIX])[0]


@pytest_twisted.ensureDeferred
async def test_soak_mixed_traffic_leaves_nothing_behind(backend, tmp_path):
    port = free_port()
    config = parse_config(
        f"""
[gateway]
listen = tcp:{port}:interface=127.0.0.1
[logging]
file = {tmp_path}/soak.log
level = warning
[ratelimit]
requests = 1000000
[service:data]
url = {backend.url}
retries = 1
retry_delay = 0.01
timeout = 2
breaker_threshold = 1000000
[service:tight]
url = {backend.url}
ratelimit_requests = 5
ratelimit_window = 3600
""",
        "soak.ini",
        environ={},
    )
    clock = RecordingClock(reactor)
    service = GatewayService(config, reactor, stdout=io.StringIO(), clock=clock)
    service.startService()
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = CONCURRENCY
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(42)
    outcomes: dict[str, dict[int, int]] = {}
    calls_before = backend.calls()
    hangs = {"issued": 0, "seen_before": hang_calls(calls_before)}

    async def backend_saw_every_hang() -> None:
        """
        Until every /hang request issued so far reached the backend: a
        cancellation is only meaningful (and only counted by the backend as
        a disconnect) once its request got there.  A fixed timer instead
        sometimes cancelled this client's own connection attempt
        (ConnectingCancelledError) or a request still inside the gateway.
        """
        deadline = reactor.seconds() + 20
        while True:
            calls = await treq.json_content(await client.get(backend.url + "/calls"))
            if hang_calls(calls) - hangs["seen_before"] >= hangs["issued"]:
                return
            assert reactor.seconds() < deadline, "hang requests did not reach the backend within 20 s"
            await deferLater(reactor, 0.01, lambda: None)

    async def one(kind: str) -> None:
        if kind == "healthy":
            d = client.get(base + "/api/data/echo")
        elif kind == "stream":
            d = client.get(base + "/api/data/sse?n=3&interval=0.005")
        elif kind == "failing":
            d = client.get(base + "/api/data/status/503")
        elif kind == "limited":
            d = client.get(base + "/api/tight/echo")
        elif kind == "unknown":
            d = client.get(base + "/api/nowhere/x")
        elif kind == "bad_path":
            d = client.get(base + "/api/data/%2e%2e/x")
        else:  # cancelled: the client gives up while the backend hangs
            d = client.get(base + "/api/data/hang")
            hangs["issued"] += 1
            await backend_saw_every_hang()
            d.cancel()
            try:
                await d
            except (defer.CancelledError, ResponseNeverReceived):
                outcomes.setdefault(kind, {}).setdefault(0, 0)
                outcomes[kind][0] += 1
            return
        response = await d
        await treq.content(response)
        outcomes.setdefault(kind, {}).setdefault(response.code, 0)
        outcomes[kind][response.code] += 1

    async def round_of(count: int) -> None:
        semaphore = defer.DeferredSemaphore(CONCURRENCY)
        await defer.gatherResults(
            [semaphore.run(lambda kind=pick(rng): defer.Deferred.fromCoroutine(one(kind))) for _ in range(count)],
            consumeErrors=True,
        )

    try:
        await round_of(REQUESTS_PER_ROUND)  # warm up: pools fill, caches settle
        await deferLater(reactor, 0.5, lambda: None)
        fds_before, rss_before = open_fds(), rss_mb()
        for _ in range(ROUNDS):
            await round_of(REQUESTS_PER_ROUND)
        await deferLater(reactor, 0.5, lambda: None)
        fds_after, rss_after = open_fds(), rss_mb()

        assert set(outcomes["healthy"]) == {200}
        assert set(outcomes["stream"]) == {200}
        assert set(outcomes["failing"]) == {503}  # the backend's own 503, passed through after one retry
        assert set(outcomes["limited"]) == {200, 429} and outcomes["limited"][200] == 5
        assert set(outcomes["unknown"]) == {404}
        assert set(outcomes["bad_path"]) == {400}
        assert sum(outcomes["cancelled"].values()) > 0
        assert fds_after - fds_before <= 8, (fds_before, fds_after)
        assert rss_after - rss_before < 25, (rss_before, rss_after)
        # Every request answered: no timer of the gateway's is left pending.
        assert clock.getDelayedCalls() == [], clock.getDelayedCalls()
        assert service.front.in_flight == 0
        cancelled = sum(outcomes["cancelled"].values())
        deadline = reactor.seconds() + 20
        while (await treq.json_content(await client.get(backend.url + "/calls")))["disconnects"] - calls_before["disconnects"] < cancelled:
            assert reactor.seconds() < deadline, "the backend did not see every cancelled request go"
            await deferLater(reactor, 0.05, lambda: None)
        assert service.gateway.broker.routes["data"].breaker.status().state == "closed"
    finally:
        await pool.closeCachedConnections()
        await service.stopService()
    assert clock.getDelayedCalls() == []
