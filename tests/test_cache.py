"""The response cache on a Clock: freshness, keys, LRU by bytes, coalescing, and what the client sees."""

from __future__ import annotations

import treq
from twisted.internet.task import Clock

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from txgateway.cache.policy import CachedAnswer, cache_key, freshness
from txgateway.cache.stores import MemoryCacheStore

INI = GATEWAY_HEAD + """[cache]
max_entry_bytes = 100
[service:emb]
url = http://emb.test
cache = memory
cache_ttl = 60
cache_methods = GET, POST
retries = 0
timeout = 10
coalesce_wait = 5
"""

JSON = {b"content-type": b"application/json"}


def body_of(answer) -> bytes:
    """The body of an answer (a response, or the Deferred of one not yet looked at)."""
    response = result_of(answer) if hasattr(answer, "addBoth") else answer
    return result_of(treq.content(response))


def answered(h: Harness, d, response: FakeResponse):
    """Answer the last backend request with C{response}; the client's response."""
    h.agents["emb"].last.respond(response)
    h.flush()
    return result_of(d)


def test_freshness_follows_the_backend_when_it_says_shorter_or_no():
    assert freshness(200, [], 300) == 300
    assert freshness(200, [(b"Cache-Control", b"public, max-age=30")], 300) == 30
    assert freshness(200, [(b"Cache-Control", b"max-age=30, s-maxage=10")], 300) == 10
    assert freshness(200, [(b"Cache-Control", b"max-age=900")], 300) == 300
    for headers in ([(b"Cache-Control", b"no-store")], [(b"Cache-Control", b"private")], [(b"Set-Cookie", b"a=b")],
                    [(b"Vary", b"*")], [(b"Cache-Control", b"max-age=0")]):
        assert freshness(200, headers, 300) is None, headers
    assert freshness(404, [], 300) is None


def test_a_backends_no_cache_does_not_keep_an_answer_out():
    # SSE servers send it on every stream so that proxies do not buffer them.
    assert freshness(200, [(b"Cache-Control", b"no-cache")], 300) == 300
    assert freshness(200, [(b"Cache-Control", b"no-cache, max-age=20")], 300) == 20
    assert freshness(200, [(b"Cache-Control", b"no-cache, no-store")], 300) is None


def test_an_sse_answer_marked_no_cache_is_kept_and_replayed():
    h = Harness(INI.replace("max_entry_bytes = 100", "max_entry_bytes = 1000"))
    events = b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
    d = h.request("POST", "/api/emb/chat/completions", data=b'{"stream": true}')
    sse = {b"content-type": b"text/event-stream", b"cache-control": b"no-cache"}
    first = answered(h, d, FakeResponse(200, sse, events))
    assert body_of(first) == events and first.headers.getRawHeaders("x-cache") == ["MISS"]
    second = result_of(h.request("POST", "/api/emb/chat/completions", data=b'{"stream": true}'))
    assert second.headers.getRawHeaders("x-cache") == ["HIT"] and body_of(second) == events
    assert len(h.agents["emb"].requests) == 1


def test_the_key_holds_service_method_target_body_and_tenant():
    base = cache_key("emb", b"POST", b"/v1/embeddings", b"{}", "alice")
    assert base == cache_key("emb", b"POST", b"/v1/embeddings", b"{}", "alice")
    for other in (
        cache_key("rag", b"POST", b"/v1/embeddings", b"{}", "alice"),
        cache_key("emb", b"GET", b"/v1/embeddings", b"{}", "alice"),
        cache_key("emb", b"POST", b"/v1/embeddings?x=1", b"{}", "alice"),
        cache_key("emb", b"POST", b"/v1/embeddings", b"{ }", "alice"),
        cache_key("emb", b"POST", b"/v1/embeddings", b"{}", "bob"),
        cache_key("emb", b"POST", b"/v1/embeddings", b"{}", None),
    ):
        assert other != base


def test_the_memory_store_drops_the_least_recently_used_by_bytes_and_expired_entries():
    clock = Clock()
    entry = CachedAnswer(200, b"OK", (), b"x" * 100, 0.0, 10.0)
    store = MemoryCacheStore(clock, max_bytes=entry.size * 2)
    store.put("a", entry)
    store.put("b", entry)
    assert result_of(store.get("a")) is entry  # a is now the most recently used
    store.put("c", entry)
    assert result_of(store.get("b")) is None and result_of(store.get("a")) is entry and result_of(store.get("c")) is entry
    assert store.bytes == entry.size * 2
    clock.advance(10)
    assert result_of(store.get("a")) is None and len(store) == 1


def test_a_second_identical_request_is_a_hit_with_age_and_its_own_request_id():
    h = Harness(INI)
    first = h.request("GET", "/api/emb/v1/models?x=1")
    h.agents["emb"].last.respond(FakeResponse(200, {**JSON, b"x-backend": b"yes"}, b'{"data":[]}'))
    h.flush()
    response = result_of(first)
    assert response.headers.getRawHeaders("x-cache") == ["MISS"] and body_of(response) == b'{"data":[]}'
    h.advance(7)
    second = h.request("GET", "/api/emb/v1/models?x=1", headers={"X-Request-ID": "again"})
    response = result_of(second)
    assert len(h.agents["emb"].requests) == 1
    assert response.code == 200 and body_of(response) == b'{"data":[]}'
    assert response.headers.getRawHeaders("x-cache") == ["HIT"] and response.headers.getRawHeaders("age") == ["7"]
    assert response.headers.getRawHeaders("x-backend") == ["yes"]
    assert response.headers.getRawHeaders("x-request-id") == ["again"]
    assert [line["cache"] for line in h.access.lines] == ["miss", "hit"]


def test_an_entry_expires_at_its_ttl():
    h = Harness(INI)
    h.request("GET", "/api/emb/a")
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"1"))
    h.advance(59.9)
    assert result_of(h.request("GET", "/api/emb/a")).headers.getRawHeaders("x-cache") == ["HIT"]
    h.advance(0.1)
    d = h.request("GET", "/api/emb/a")
    assert len(h.agents["emb"].requests) == 2
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"2"))
    h.flush()
    assert body_of(d) == b"2"


def test_post_bodies_and_vary_headers_are_part_of_the_key():
    h = Harness(INI)
    for body, language in ((b'{"input":"a"}', "en"), (b'{"input":"b"}', "en"), (b'{"input":"a"}', "fr")):
        d = h.request("POST", "/api/emb/v1/embeddings", data=body, headers={"Accept-Language": language})
        h.agents["emb"].last.respond(FakeResponse(200, {**JSON, b"vary": b"Accept-Language"}, body + language.encode()))
        h.flush()
        assert result_of(d).headers.getRawHeaders("x-cache") == ["MISS"]
    assert len(h.agents["emb"].requests) == 3
    d = h.request("POST", "/api/emb/v1/embeddings", data=b'{"input":"a"}', headers={"Accept-Language": "fr"})
    response = result_of(d)
    assert response.headers.getRawHeaders("x-cache") == ["HIT"] and body_of(response) == b'{"input":"a"}fr'


def test_tenants_never_read_each_others_answers():
    h = Harness(INI + "[auth]\nkeys = alice:ka, bob:kb\n")
    h.request("GET", "/api/emb/a", headers={"X-API-Key": "ka"})
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"alice's"))
    h.flush()
    d = h.request("GET", "/api/emb/a", headers={"X-API-Key": "kb"})
    assert len(h.agents["emb"].requests) == 2
    assert result_of(h.request("GET", "/api/emb/a", headers={"X-API-Key": "ka"})).headers.getRawHeaders("x-cache") == ["HIT"]
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"bob's"))
    h.flush()
    assert body_of(d) == b"bob's"


def test_what_is_never_cached_and_what_the_client_may_skip():
    h = Harness(INI)
    for headers, body in (({b"set-cookie": b"s=1"}, b"c"), ({b"cache-control": b"private"}, b"p")):
        h.request("GET", "/api/emb/x")
        h.agents["emb"].last.respond(FakeResponse(200, {**JSON, **headers}, body))
        h.flush()
    h.request("GET", "/api/emb/big")
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"x" * 101))  # over max_entry_bytes
    h.flush()
    h.request("GET", "/api/emb/big")
    assert len(h.agents["emb"].requests) == 4
    h.agents["emb"].last.respond(FakeResponse(500, JSON, b"no"))
    h.flush()
    d = h.request("DELETE", "/api/emb/x")
    assert answered(h, d, FakeResponse(200, JSON, b"gone")).headers.getRawHeaders("x-cache") == ["BYPASS"]
    h.request("GET", "/api/emb/ok")
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"ok"))
    h.flush()
    d = h.request("GET", "/api/emb/ok", headers={"Cache-Control": "no-cache"})
    assert len(h.agents["emb"].requests) == 7  # no-cache: no lookup
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"ok2"))
    h.flush()
    assert result_of(d).headers.getRawHeaders("x-cache") == ["MISS"]
    assert body_of(h.request("GET", "/api/emb/ok")) == b"ok2"  # ...but stored
    d = h.request("GET", "/api/emb/ok", headers={"Cache-Control": "no-store"})
    assert answered(h, d, FakeResponse(200, JSON, b"ok3")).headers.getRawHeaders("x-cache") == ["BYPASS"]


def test_identical_requests_in_flight_cost_one_backend_call():
    h = Harness(INI)
    many = [h.request("GET", "/api/emb/same") for _ in range(5)]
    assert len(h.agents["emb"].requests) == 1
    h.agents["emb"].last.respond(FakeResponse(200, JSON, b"once"))
    h.flush()
    assert [body_of(d) for d in many] == [b"once"] * 5
    assert sorted(line["cache"] for line in h.access.lines) == ["coalesced"] * 4 + ["miss"]
    exposition = h.gateway.metrics.exposition().decode()
    assert 'txgateway_cache_requests_total{result="coalesced",service="emb"} 4.0' in exposition


def test_when_the_first_request_fails_the_waiters_go_on_their_own():
    h = Harness(INI)
    first = h.request("GET", "/api/emb/same")
    waiters = [h.request("GET", "/api/emb/same") for _ in range(2)]
    h.agents["emb"].last.respond(FakeResponse(503, JSON, b"busy"))
    h.flush()
    assert result_of(first).code == 503
    assert len(h.agents["emb"].requests) == 3  # each waiter asked the backend itself
    for sent, body in zip(h.agents["emb"].requests[1:], (b"a", b"b")):
        sent.respond(FakeResponse(200, JSON, body))
    h.flush()
    assert sorted(body_of(d) for d in waiters) == [b"a", b"b"]


def test_a_waiter_that_leaves_disturbs_nothing_and_one_that_waits_too_long_goes_itself():
    h = Harness(INI)
    first = h.request("GET", "/api/emb/same")
    leaving = h.request("GET", "/api/emb/same")
    staying = h.request("GET", "/api/emb/same")
    leaving.cancel()
    leaving.addErrback(lambda failure: None)
    h.flush()
    assert len(h.agents["emb"].requests) == 1
    h.advance(5)  # coalesce_wait
    assert len(h.agents["emb"].requests) == 2
    h.agents["emb"].requests[1].respond(FakeResponse(200, JSON, b"own"))
    h.agents["emb"].requests[0].respond(FakeResponse(200, JSON, b"first"))
    h.flush()
    assert body_of(staying) == b"own" and body_of(first) == b"first"


class SilentRedis:
    """A Redis that never answers (txredisapi's calls while Redis is down), then one that does."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.Deferred = Deferred
        self.answering = False
        self.data: dict = {}

    def get(self, key):
        if not self.answering:
            return self.Deferred()
        from twisted.internet.defer import succeed

        return succeed(self.data.get(key))

    def set(self, key, value, pexpire=None):
        if not self.answering:
            return self.Deferred()
        from twisted.internet.defer import succeed

        self.data[key] = value
        return succeed(True)


def test_a_silent_redis_is_bypassed_after_its_timeout_and_logged_once_each_way():
    from structlog.testing import capture_logs

    from txgateway.cache.stores import RedisCacheStore

    redis = SilentRedis()
    h = Harness(INI.replace("cache = memory", "cache = redis"))
    store = RedisCacheStore(redis, h.clock, 0.2, h.log, retry_interval=5)
    h.gateway.broker.cache.stores["redis"] = store
    with capture_logs() as logs:
        d = h.request("GET", "/api/emb/a")
        h.advance(0.2)  # the lookup's timeout: the backend answers
        h.agents["emb"].last.respond(FakeResponse(200, JSON, b"1"))
        h.flush()
        assert result_of(d).headers.getRawHeaders("x-cache") == ["MISS"]
        d = h.request("GET", "/api/emb/a")  # Redis is left alone for retry_interval: no wait
        assert answered(h, d, FakeResponse(200, JSON, b"2")).headers.getRawHeaders("x-cache") == ["BYPASS"]
        assert h.gateway.health()["cache"] == {"backend": "redis", "healthy": False}
        h.advance(0.2)  # the first answer's put fails too: Redis is left alone 5 s from now
        redis.answering = True
        h.advance(5)
        d = h.request("GET", "/api/emb/a")
        h.agents["emb"].last.respond(FakeResponse(200, JSON, b"3"))
        h.flush()
        assert result_of(d).headers.getRawHeaders("x-cache") == ["MISS"]
        assert result_of(h.request("GET", "/api/emb/a")).headers.getRawHeaders("x-cache") == ["HIT"]
    assert [e["event"] for e in logs if e["event"].startswith("cache_")] == ["cache_unavailable", "cache_recovered"]


def test_a_reload_keeps_the_memory_store_and_what_it_holds(tmp_path):
    from tests.test_operations import make_service

    ini = INI
    service, reactor, path = make_service(tmp_path, ini)
    store = service.gateway.broker.cache.stores["memory"]
    path.write_text(ini.replace("cache_ttl = 60", "cache_ttl = 30"))
    assert service.reload()
    assert service.gateway.broker.cache.stores["memory"] is store
    path.write_text(ini.replace("max_entry_bytes = 100", "max_entry_bytes = 200"))
    assert service.reload()
    assert service.gateway.broker.cache.stores["memory"] is not store  # [cache] changed: a new store
