"""
Redis that fails over: a master, a replica and three Sentinels, all
redis-server processes on 127.0.0.1 started by the tests (the binary the
other Redis tests use); gateways find the master through
C{redis+sentinel://} URLs, and the master is killed under traffic.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Process, free_port, request, wait_until
from tests.integration.test_daemon import ini_for
from tests.integration.test_redis import RedisServer, redis_server_binary

pytestmark = pytest.mark.integration

MASTER = "gwmaster"


class Replica(RedisServer):
    def __init__(self, workdir: Path, master_port: int) -> None:
        self.master_port = master_port
        super().__init__(workdir)

    def start(self) -> None:
        self.process = Process(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
             "--replicaof", "127.0.0.1", str(self.master_port)],
            self.workdir,
        )
        self.process.wait_for(lambda line: "MASTER <-> REPLICA sync: Finished" in line)


class SentinelNode:
    def __init__(self, workdir: Path, master_port: int) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}",
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 10000",
            f"sentinel parallel-syncs {MASTER} 1", "",
        ]))
        self.process = Process([redis_server_binary(), str(conf), "--sentinel"], workdir)
        self.process.wait_for(lambda line: "+monitor master" in line)


class Fleet:
    """A master, a replica, three Sentinels."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        self.master = RedisServer(workdir / "master")
        self.replica = Replica(workdir / "replica", self.master.port)
        self.sentinels = [SentinelNode(workdir / f"sentinel{n}", self.master.port) for n in range(3)]
        # Every Sentinel knows the others and the replica before anything fails.
        wait_until(lambda: all(b"num-other-sentinels\r\n$1\r\n2\r\n" in self.ask(s, "SENTINEL", "MASTER", MASTER)
                               and b"num-slaves\r\n$1\r\n1\r\n" in self.ask(s, "SENTINEL", "MASTER", MASTER)
                               for s in self.sentinels), timeout=20)

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{MASTER}/0"

    @staticmethod
    def ask(node, *words: str) -> bytes:
        return RedisServer.command(node, *words)

    def master_port(self) -> int:
        reply = self.ask(self.sentinels[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return int(reply.split(b"\r\n")[-2])

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            if node.process.proc.poll() is None:
                node.process.stop()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()


def sentinel_ini(backend_url: str, redis_url: str, requests: int) -> str:
    return ini_for(backend_url).replace(
        "[ratelimit]\nrequests = 10000\n",
        f"[ratelimit]\nbackend = redis\nrequests = {requests}\nwindow = 60\nkey = header:X-Client\n"
        f"redis_url = {redis_url}\nredis_timeout = 0.3\nredis_retry_interval = 0.5\n",
    )


def admitted(gateways, client: str, count: int) -> int:
    return sum(
        gateways[n % len(gateways)].request("GET", "/api/data/echo", headers={"X-Client": client}).status == 200
        for n in range(count)
    )


def test_gateways_find_the_master_through_the_sentinels_and_follow_its_failover(start_gateway, backend, fleet):
    first = start_gateway(sentinel_ini(backend.url, fleet.url, requests=5))
    second = start_gateway(sentinel_ini(backend.url, fleet.url, requests=5))
    assert admitted([first, second], "before", 10) == 5  # one shared limit, through the Sentinels
    health = first.request("GET", "/health").json()
    assert health["ratelimit"]["healthy"] is True and health["status"] == "ok"

    # Traffic from both gateways while the master is killed: every request answered.
    statuses: list[int] = []
    stop = threading.Event()

    def traffic(gateway) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            answer = request(gateway.port, "GET", "/api/data/echo", headers={"X-Client": f"load-{n}"}, timeout=5)
            statuses.append(answer.status)

    workers = [threading.Thread(target=traffic, args=(gateway,)) for gateway in (first, second)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    old_port = fleet.master.port
    fleet.master.process.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: first.request("GET", "/health").json()["ratelimit"]["healthy"] is False, timeout=10)
    wait_until(lambda: fleet.master_port() != old_port, timeout=20)
    promoted_at = time.monotonic()
    wait_until(lambda: all(g.request("GET", "/health").json()["ratelimit"]["healthy"] for g in (first, second)), timeout=15)
    back_at = time.monotonic()
    stop.set()
    for worker in workers:
        worker.join(10)
    assert fleet.master_port() == fleet.replica.port
    assert statuses and set(statuses) == {200}, sorted(set(statuses))  # no client error, ever
    assert back_at - promoted_at < 5, (killed_at, promoted_at, back_at)

    # Exact again, on the new master: a fresh client gets 5, shared by both gateways.
    assert admitted([first, second], "after", 10) == 5
    for gateway in (first, second):
        gateway.logged("ratelimit_redis_recovered")  # the log writer may not have written it yet
        events = [e["event"] for e in gateway.log_lines() if e.get("event", "").startswith("ratelimit_redis")]
        assert events == ["ratelimit_redis_unavailable", "ratelimit_redis_recovered"]


def test_budgets_settled_while_the_master_fails_over_reach_the_new_master_once(start_gateway, fleet, tmp_path):
    from tests.integration.test_governance import call, governed, redis_budgets, spent_of
    from tests.integration.test_openai_sdk import OpenAIBackend

    backend = OpenAIBackend(tmp_path)
    try:
        gateway = start_gateway(governed(backend.url, "budget_usd = 10\ntokens_per_minute = 10000000", redis_budgets(fleet.url)))
        before = [call(gateway.port, "plain", stream=False)[0] for _ in range(10)]
        time.sleep(0.3)  # the replica has them: what is lost to Redis's own replication is not the gateway's to keep
        old_port = fleet.master.port
        fleet.master.process.proc.send_signal(signal.SIGKILL)
        during: list[int] = []
        # Settles while no master answers go to the journal; once Sentinel names the new one, it is replayed there.
        while fleet.master_port() == old_port or len(during) < 20:
            during.append(call(gateway.port, "plain", stream=False)[0])
        wait_until(lambda: gateway.request("GET", "/health").json()["budgets"] == {
            "backend": "redis", "healthy": True, "serving_from": "redis", "journal": 0}, timeout=15)
        after = [call(gateway.port, "plain", stream=False)[0] for _ in range(10)]
        assert set(before + during + after) == {200}
        # Every request settled 1 + 60 tokens at $1 a million, on the new master, once.
        assert spent_of(gateway) == pytest.approx(len(before + during + after) * 61e-6)
        gateway.logged("budgets_redis_recovered")
        events = [e["event"] for e in gateway.log_lines() if e.get("event", "").startswith("budgets_redis")]
        assert events == ["budgets_redis_unavailable", "budgets_redis_recovered"]
    finally:
        backend.process.stop()


def test_the_redis_cache_is_shared_through_the_sentinels_and_follows_the_failover(start_gateway, fleet, fresh_backend):
    from tests.integration.test_cache import cache_ini

    first = start_gateway(cache_ini(fresh_backend.url, "redis", fleet.url))
    second = start_gateway(cache_ini(fresh_backend.url, "redis", fleet.url))
    assert first.request("GET", "/api/cached/echo/one").headers["X-Cache"] == "MISS"
    # The entry is written after the answer: the other gateway sees it once it is there.
    wait_until(lambda: second.request("GET", "/api/cached/echo/one").headers["X-Cache"] == "HIT")
    old_port = fleet.master.port
    time.sleep(0.3)  # replicated
    fleet.master.process.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: fleet.master_port() != old_port, timeout=20)
    # The entry written before the failover is on the new master; new ones are shared again.
    wait_until(lambda: second.request("GET", "/api/cached/echo/one").headers["X-Cache"] == "HIT", timeout=15)
    wait_until(lambda: first.request("GET", "/health").json()["cache"]["healthy"], timeout=15)
    assert first.request("GET", "/api/cached/echo/two").headers["X-Cache"] == "MISS"
    wait_until(lambda: second.request("GET", "/api/cached/echo/two").headers["X-Cache"] == "HIT")
    assert fleet.master_port() == fleet.replica.port
