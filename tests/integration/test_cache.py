"""
The response cache through the running daemon: in memory and in a real
redis-server the test starts, shared by two gateways, surviving Redis's
death, coalescing concurrent identical requests, replaying a cached SSE
answer to the official openai client.
"""

from __future__ import annotations

import threading

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, wait_until
from tests.integration.test_openai_sdk import FULL, OpenAIBackend
from tests.integration.test_redis import RedisServer

pytestmark = pytest.mark.integration


def cache_ini(backend_url: str, cache: str, redis_url: str = "", extra: str = "") -> str:
    redis = f"redis_url = {redis_url}\nredis_timeout = 0.2\n" if redis_url else ""
    return DAEMON_HEAD + f"""[cache]
{redis}
[service:cached]
url = {backend_url}
cache = {cache}
cache_methods = GET, POST
timeout = 5
retry_delay = 0.05
{extra}
"""


def test_a_hit_from_memory_never_reaches_the_backend(start_gateway, fresh_backend):
    gateway = start_gateway(cache_ini(fresh_backend.url, "memory"))
    first = gateway.request("GET", "/api/cached/echo/one?x=1")
    second = gateway.request("GET", "/api/cached/echo/one?x=1")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.body == second.body and second.headers["Age"] == "0"
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert fresh_backend.calls()["count"] == 1
    metrics = gateway.request("GET", "/metrics").body.decode()
    assert 'txgateway_cache_requests_total{result="hit",service="cached"} 1.0' in metrics
    assert "txgateway_cache_bytes " in metrics and "txgateway_cache_bytes 0.0" not in metrics


def test_fifty_concurrent_identical_requests_reach_the_backend_once(start_gateway, tmp_path):
    from tests.integration.conftest import Backend

    slow = Backend(tmp_path, env={"BACKEND_DELAY": "0.5"})
    try:
        gateway = start_gateway(cache_ini(slow.url, "memory"))
        answers: list = [None] * 50

        def ask(number: int) -> None:
            answers[number] = gateway.request("POST", "/api/cached/echo/same", body=b'{"input": "same"}')

        threads = [threading.Thread(target=ask, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert [answer.status for answer in answers] == [200] * 50
        assert len({answer.body for answer in answers}) == 1
        assert slow.calls()["count"] == 1
        assert sorted({answer.headers["X-Cache"] for answer in answers}) == ["HIT", "MISS"]
    finally:
        slow.process.stop()


def test_two_gateways_share_hits_through_redis(start_gateway, fresh_backend, tmp_path):
    redis = RedisServer(tmp_path)
    try:
        one = start_gateway(cache_ini(fresh_backend.url, "redis", redis.url))
        two = start_gateway(cache_ini(fresh_backend.url, "redis", redis.url))
        assert one.request("GET", "/api/cached/echo/shared").headers["X-Cache"] == "MISS"
        # The entry is written after the answer: the other gateway sees it once it is there.
        wait_until(lambda: two.request("GET", "/api/cached/echo/shared").headers["X-Cache"] == "HIT")
        assert fresh_backend.calls()["count"] <= 2
        health = two.request("GET", "/health").json()
        assert health["cache"] == {"backend": "redis", "healthy": True}
    finally:
        redis.stop()


def test_redis_killed_mid_traffic_costs_no_client_an_error(start_gateway, fresh_backend, tmp_path):
    redis = RedisServer(tmp_path)
    gateway = start_gateway(cache_ini(fresh_backend.url, "redis", redis.url))
    statuses = []
    for number in range(20):
        statuses.append(gateway.request("GET", f"/api/cached/echo/{number % 5}").status)
    redis.stop()
    for number in range(40):
        answer = gateway.request("GET", f"/api/cached/echo/{number % 5}")
        statuses.append(answer.status)
    assert statuses == [200] * 60
    assert answer.headers["X-Cache"] == "BYPASS"
    [unavailable] = gateway.logged("cache_unavailable")
    assert unavailable["backend"] == "redis"
    assert gateway.request("GET", "/health").json()["cache"]["healthy"] is False
    redis.start()
    # Back within the retry interval (5 s): logged once, and hits again.
    wait_until(lambda: gateway.request("GET", "/api/cached/echo/again").headers["X-Cache"] == "HIT", timeout=15)
    assert len(gateway.logged("cache_recovered")) == 1
    redis.stop()


def test_a_cached_stream_is_replayed_whole_to_the_openai_client(start_gateway, tmp_path):
    backend = OpenAIBackend(tmp_path)
    try:
        ini = cache_ini(backend.url, "memory", extra="api = openai\n") + "[model:cached-chat]\ntargets = cached:plain-model\n"
        gateway = start_gateway(ini)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="none", max_retries=0)

        def streamed():
            with client.chat.completions.with_streaming_response.create(
                model="cached-chat", messages=[{"role": "user", "content": "Count"}], stream=True
            ) as response:
                chunks = list(response.parse())
                return response.headers["x-cache"], chunks

        first_cache, first = streamed()
        second_cache, second = streamed()
        assert (first_cache, second_cache) == ("MISS", "HIT")
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices) for chunks in (first, second)]
        assert texts == [FULL, FULL]
        assert [c.model_dump() for c in first] == [c.model_dump() for c in second]
        assert backend.calls()["plain-model"]["count"] == 1
    finally:
        backend.process.stop()
