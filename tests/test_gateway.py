"""
The whole gateway in memory: routes, broker, breaker, retries and rate
limit, driven by a Clock and answered by hand through a FakeAgent.
"""

import gc
import json
import types

import attrs
import pytest
import treq
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from txgateway.ratelimit.interface import IRateLimitStore
from tests.fakes import SERVICE_INI, FakeResponse, Harness, cyclic_garbage_of, result_of


def body_json(response):
    return json.loads(result_of(treq.content(response)))


def error_of(response):
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return body_json(response)["error"]


def ini(**service_keys):
    extra = "".join(f"{k} = {v}\n" for k, v in service_keys.items())
    return SERVICE_INI + extra


# -- routing and headers


def test_prefix_is_stripped_and_the_rest_goes_to_the_base_path_with_the_query():
    h = Harness(SERVICE_INI)
    h.request("GET", "/api/ai/chat/completions?model=x&n=2")
    assert h.agents["ai"].last.uri == b"http://ai.backend:8000/v1/chat/completions?model=x&n=2"


def test_answer_comes_back_with_request_id_service_and_timing_headers():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/models", headers={"X-Request-ID": "client-id-1"})
    h.advance(0.25)
    h.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"application/json"}, b'{"data":[]}'))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    assert result_of(treq.content(response)) == b'{"data":[]}'
    headers = response.headers
    assert headers.getRawHeaders("x-request-id") == ["client-id-1"]
    assert headers.getRawHeaders("x-gateway-service") == ["ai"]
    assert headers.getRawHeaders("x-gateway-response-time") == ["250"]
    assert headers.getRawHeaders("x-gateway-attempts") == ["1"]
    assert response.length == 11  # the client moved Content-Length here: not chunked


def test_backend_gets_the_request_id_and_forwarded_headers_but_no_hop_by_hop_ones():
    h = Harness(SERVICE_INI)
    h.request(
        "POST",
        "/api/ai/x",
        data=b'{"prompt":"hi"}',
        headers={
            "X-Request-ID": "rid-7",
            "Authorization": "Bearer backend-token",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9v",
            "X-Forwarded-For": "203.0.113.9",
            "Content-Type": "application/json",
        },
    )
    sent = h.agents["ai"].last
    headers = sent.headers
    assert sent.method == b"POST"
    assert sent.body == b'{"prompt":"hi"}'
    assert headers.getRawHeaders(b"x-request-id") == [b"rid-7"]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer backend-token"]
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]
    assert headers.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"gateway.test"]
    for hop in (b"connection", b"x-secret-hop", b"keep-alive", b"te", b"proxy-authorization", b"host", b"content-length"):
        assert not headers.hasHeader(hop), hop


def test_hop_by_hop_response_headers_stay_behind():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(
        FakeResponse(200, {b"connection": b"close, x-internal", b"x-internal": b"1", b"x-model": b"m1"}, b"ok")
    )
    h.flush()
    headers = result_of(d).headers
    assert headers.getRawHeaders("x-model") == ["m1"]
    assert not headers.hasHeader("x-internal")


def test_a_keep_alive_header_is_dropped_both_ways_on_its_own():
    # Named in no Connection header: dropped because Keep-Alive is hop-by-hop itself.
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x", headers={"Keep-Alive": "timeout=5", "X-Kept": "1"})
    sent = h.agents["ai"].last
    assert not sent.headers.hasHeader(b"keep-alive") and sent.headers.getRawHeaders(b"x-kept") == [b"1"]
    assert not sent.headers.hasHeader(b"connection")
    sent.respond(FakeResponse(200, {b"keep-alive": b"timeout=5, max=100", b"x-model": b"m1"}, b"ok"))
    h.flush()
    headers = result_of(d).headers
    assert not headers.hasHeader("keep-alive") and headers.getRawHeaders("x-model") == ["m1"]


def test_unknown_service_is_a_json_404():
    h = Harness(SERVICE_INI)
    response = result_of(h.request("GET", "/api/nope/x", headers={"X-Request-ID": "r-404"}))
    assert response.code == 404
    assert error_of(response) == {"type": "unknown_service", "message": "no service is named 'nope'", "request_id": "r-404"}
    assert not response.headers.hasHeader("x-gateway-service")


def test_paths_outside_the_api_are_a_json_404():
    h = Harness(SERVICE_INI)
    response = result_of(h.request("GET", "/admin"))
    assert response.code == 404
    assert error_of(response)["type"] == "not_found"


def test_dot_dot_in_the_path_is_refused_before_the_backend():
    h = Harness(SERVICE_INI)
    response = result_of(h.request("GET", "/api/ai/%2e%2e/admin"))
    assert response.code == 400
    assert error_of(response)["type"] == "bad_request"
    assert h.agents["ai"].requests == []


def test_a_backend_error_answer_passes_through_unchanged():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(422, {b"content-type": b"application/problem+json"}, b'{"detail":"bad"}'))
    h.flush()
    response = result_of(d)
    assert response.code == 422
    assert result_of(treq.content(response)) == b'{"detail":"bad"}'
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]


# -- retries on the clock


def test_retries_wait_one_two_four_seconds():
    h = Harness(SERVICE_INI)
    agent = h.agents["ai"]
    h.request("GET", "/api/ai/x")
    attempt_times = []
    for delay in (1.0, 2.0, 4.0):
        attempt_times.append(h.clock.seconds())
        agent.last.refuse()
        h.advance(delay - 0.001)
        assert len(agent.requests) == len(attempt_times)
        h.advance(0.001)
    attempt_times.append(h.clock.seconds())
    assert attempt_times == pytest.approx([0.0, 1.0, 3.0, 7.0], abs=1e-9)
    assert len(agent.requests) == 4


def test_after_the_last_failed_attempt_the_client_gets_502():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    for delay in (1, 2, 4, 0):
        h.agents["ai"].last.refuse()
        h.advance(delay)
    response = result_of(d)
    assert response.code == 502
    assert error_of(response)["type"] == "upstream_unavailable"
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["4"]
    assert response.headers.getRawHeaders("x-gateway-response-time") == ["7000"]


def test_a_backend_connection_the_gateway_has_no_file_for_is_503_at_once_and_no_failure_of_the_backend():
    from twisted.internet.error import ConnectBindError

    h = Harness(ini(breaker_threshold=1))
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.answer.errback(ConnectBindError(24, "Too many open files"))  # as Twisted reports EMFILE
    h.flush()
    response = result_of(d)
    assert response.code == 503
    assert error_of(response)["type"] == "gateway_busy"
    assert response.headers.getRawHeaders("retry-after") == ["1"]
    assert len(h.agents["data"].requests) == 1  # not retried: no other backend would mend it
    # One failure would have opened this breaker: it is still closed, and the next request goes.
    h.request("GET", "/api/data/x")
    assert len(h.agents["data"].requests) == 2


def test_a_retried_500_then_success_answers_200_after_two_attempts():
    h = Harness(SERVICE_INI)
    d = h.request("POST", "/api/ai/x", data=b"same body", headers={"X-Request-ID": "same-id"})
    h.agents["ai"].last.respond(FakeResponse(500, {}, b"oops"))
    h.advance(1)
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"fine"))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["2"]
    first, second = h.agents["ai"].requests
    assert first.body == second.body == b"same body"
    assert first.headers.getRawHeaders(b"x-request-id") == second.headers.getRawHeaders(b"x-request-id") == [b"same-id"]


def test_4xx_but_429_is_never_retried():
    for code in (400, 401, 404, 409):
        h = Harness(SERVICE_INI)
        d = h.request("GET", "/api/ai/x")
        h.agents["ai"].last.respond(FakeResponse(code, {b"retry-after": b"1"}, b"no"))
        h.advance(100)
        assert len(h.agents["ai"].requests) == 1
        assert result_of(d).code == code


def test_the_last_upstream_answer_is_relayed_when_retries_are_spent():
    h = Harness(ini(retries=1))
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.respond(FakeResponse(503, {}, b"busy-1"))
    h.advance(1)
    h.agents["data"].last.respond(FakeResponse(503, {b"x-why": b"overloaded"}, b"busy-2"))
    h.flush()
    response = result_of(d)
    assert response.code == 503
    assert result_of(treq.content(response)) == b"busy-2"
    assert response.headers.getRawHeaders("x-why") == ["overloaded"]
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["2"]


def test_retry_after_seconds_on_503_sets_the_delay():
    h = Harness(SERVICE_INI)
    h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(503, {b"retry-after": b"3"}, b""))
    h.advance(2.999)
    assert len(h.agents["ai"].requests) == 1
    h.advance(0.001)
    assert len(h.agents["ai"].requests) == 2


def test_retry_after_longer_than_max_delay_passes_the_answer_through():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(503, {b"retry-after": b"120"}, b"later"))
    h.flush()
    response = result_of(d)
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["120"]
    assert len(h.agents["ai"].requests) == 1


def test_attempt_timeout_is_504_and_cancels_the_attempt():
    h = Harness(ini(retries=0))
    d = h.request("GET", "/api/data/slow")
    h.advance(29.999)
    assert not h.agents["data"].cancelled
    h.advance(0.001)
    response = result_of(d)
    assert response.code == 504
    assert error_of(response)["type"] == "upstream_timeout"
    assert h.agents["data"].cancelled == h.agents["data"].requests


def test_the_deadline_bounds_all_attempts_and_delays():
    h = Harness(SERVICE_INI.replace("[gateway]\n", "[gateway]\ndeadline = 12\n"))
    d = h.request("GET", "/api/ai/x")
    h.advance(10)  # first attempt times out (timeout = 10)
    h.advance(1)  # backoff; second attempt has 1 s of deadline left
    assert len(h.agents["ai"].requests) == 2
    h.advance(1)
    response = result_of(d)
    assert response.code == 504
    assert "deadline" in error_of(response)["message"]
    assert len(h.agents["ai"].requests) == 2


def test_breaker_opening_mid_retries_stops_them_with_the_fail_fast_answer():
    h = Harness(ini(breaker_threshold=2))
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.refuse()
    h.advance(1)
    h.agents["data"].last.refuse()
    h.flush()
    response = result_of(d)
    assert response.code == 503
    assert error_of(response)["type"] == "circuit_open"
    assert response.headers.getRawHeaders("retry-after") == ["60"]
    assert len(h.agents["data"].requests) == 2


# -- the breaker through the gateway


def open_breaker(h, service="data"):
    for _ in range(5):
        d = h.request("GET", f"/api/{service}/x")
        h.agents[service].last.respond(FakeResponse(502, {}, b"bad gateway"))
        h.flush()
        result_of(d)


def test_five_failures_open_the_circuit_and_the_sixth_fails_fast():
    h = Harness(ini(retries=0))
    open_breaker(h)
    calls = len(h.agents["data"].requests)
    response = result_of(h.request("GET", "/api/data/x", headers={"X-Request-ID": "ff-1"}))
    assert response.code == 503
    assert error_of(response) == {
        "type": "circuit_open",
        "message": "service 'data' is failing; the circuit is open, retry in 60 s",
        "request_id": "ff-1",
    }
    assert response.headers.getRawHeaders("retry-after") == ["60"]
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["0"]
    assert len(h.agents["data"].requests) == calls


def test_one_service_failing_leaves_the_others_alone():
    h = Harness(ini(retries=0))
    open_breaker(h)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200


def test_after_the_cooldown_one_trial_closes_the_circuit():
    h = Harness(ini(retries=0))
    open_breaker(h)
    h.advance(60)
    trial = h.request("GET", "/api/data/x")
    other = result_of(h.request("GET", "/api/data/y"))
    assert other.code == 503 and error_of(other)["type"] == "circuit_open"
    h.agents["data"].last.respond(FakeResponse(200, {}, b"back"))
    h.flush()
    assert result_of(trial).code == 200
    health = body_json(result_of(h.request("GET", "/health")))
    assert health["services"]["data"]["circuit"] == "closed"


def test_health_shows_each_circuit():
    h = Harness(ini(retries=0))
    open_breaker(h)
    h.advance(10)
    health = body_json(result_of(h.request("GET", "/health")))
    assert health["services"]["data"] == {
        "url": "http://data.backend:8001",
        "circuit": "open",
        "consecutive_failures": 5,
        "trial_in_s": 50.0,
        "endpoints": [
            {"url": "http://data.backend:8001", "circuit": "open", "consecutive_failures": 5, "trial_in_s": 50.0, "in_flight": 0},
        ],
    }
    assert health["services"]["ai"]["circuit"] == "closed"
    assert health["status"] == "degraded"
    assert health["uptime_s"] == 10.0


# -- streaming


def test_chunks_reach_the_client_as_the_backend_sends_them():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/stream", unbuffered=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    h.flush()
    seen = []
    d.addBoth(lambda result: seen.append(result) or result)
    assert seen == []  # the commit point: nothing goes out before the first byte
    upstream.send(b"data: tok1\n\n")
    h.flush()
    response = result_of(d)
    received = []
    done = treq.collect(response, received.append)
    assert received == [b"data: tok1\n\n"]
    upstream.send(b"data: tok2\n\n")
    h.flush()
    assert received == [b"data: tok1\n\n", b"data: tok2\n\n"]
    upstream.finish()
    h.flush()
    result_of(done)


def test_a_stream_broken_midway_is_not_retried_and_counts_as_a_failure():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/stream", unbuffered=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, {}))
    upstream.send(b"part")
    h.flush()
    response = result_of(d)
    received = []
    done = treq.collect(response, received.append)
    upstream.fail("reset")
    h.advance(10)
    h.flush()
    assert received == [b"part"]
    assert done.called  # ended: the client saw the connection close early
    failures = []
    done.addErrback(failures.append)
    assert failures, "an incomplete stream must not look complete"
    assert len(h.agents["ai"].requests) == 1
    assert h.gateway.broker.routes["ai"].breaker.status().consecutive_failures == 1


def test_a_stalled_body_is_cut_after_idle_timeout_not_for_being_long():
    h = Harness(SERVICE_INI)  # idle_timeout = 5
    d = h.request("GET", "/api/ai/stream", unbuffered=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, {}))
    upstream.send(b"first")
    h.flush()
    result_of(d)
    for _ in range(10):  # 40 s of steady tokens: never idle for 5 s
        h.advance(4)
        upstream.send(b"tok")
    assert not upstream.transport.stopped
    h.advance(4.999)
    assert not upstream.transport.stopped
    h.advance(0.001)
    assert upstream.transport.stopped


def test_client_going_away_cancels_the_pending_attempt_and_nothing_is_retried():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/slow")
    d.cancel()
    h.flush()
    assert h.agents["ai"].cancelled == h.agents["ai"].requests
    h.advance(100)
    assert len(h.agents["ai"].requests) == 1
    assert h.clock.getDelayedCalls() == []
    assert h.gateway.broker.routes["ai"].breaker.status().consecutive_failures == 0


def test_client_going_away_during_backoff_leaves_no_timer_behind():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.refuse()
    h.flush()
    assert h.clock.getDelayedCalls()
    d.cancel()
    h.flush()
    assert h.clock.getDelayedCalls() == []
    h.advance(100)
    assert len(h.agents["ai"].requests) == 1


# -- rate limiting


LIMITED = SERVICE_INI.replace("requests = 1000", "requests = 3\nwindow = 60")


def answer_all(h, service="ai"):
    for sent in h.agents[service].requests:
        if not sent.answer.called:
            sent.respond(FakeResponse(200, {}, b"ok"))
    h.flush()


def test_proxied_answers_carry_ratelimit_headers():
    h = Harness(LIMITED)
    d = h.request("GET", "/api/ai/x")
    answer_all(h)
    headers = result_of(d).headers
    assert headers.getRawHeaders("ratelimit-limit") == ["3"]
    assert headers.getRawHeaders("ratelimit-remaining") == ["2"]
    assert headers.getRawHeaders("ratelimit-reset") == ["20"]


def test_a_client_over_its_limit_gets_429_and_never_reaches_the_backend():
    h = Harness(LIMITED)
    for _ in range(3):
        h.request("GET", "/api/ai/x")
        answer_all(h)
    response = result_of(h.request("GET", "/api/ai/x", headers={"X-Request-ID": "rl-1"}))
    assert response.code == 429
    assert error_of(response)["type"] == "rate_limited"
    assert error_of(response)["request_id"] == "rl-1"
    assert response.headers.getRawHeaders("retry-after") == ["20"]
    assert response.headers.getRawHeaders("ratelimit-remaining") == ["0"]
    assert len(h.agents["ai"].requests) == 3
    h.advance(20)
    d = h.request("GET", "/api/ai/x")
    answer_all(h)
    assert result_of(d).code == 200


def broker_frames(broker) -> list[str]:
    """The coroutines of C{broker} waiting now (each a frame a stream would keep for as long as it lasts)."""
    return [
        o.__qualname__ for o in gc.get_objects()
        if isinstance(o, types.CoroutineType) and o.cr_frame is not None and o.cr_frame.f_locals.get("self") is broker
    ]


def test_a_call_whose_limit_is_decided_at_once_waits_in_no_frame_of_the_limits():
    h = Harness(LIMITED)
    d = h.request("GET", "/api/ai/x")  # its backend has not answered: the call waits
    assert h.agents["ai"].requests and broker_frames(h.gateway.broker) == []
    answer_all(h)
    response = result_of(d)
    assert response.code == 200 and response.headers.getRawHeaders("ratelimit-remaining") == ["2"]


@implementer(IRateLimitStore)
class DecidedLater:
    """A rate limit store that decides when told to (as one in Redis answers later)."""

    description = {"backend": "later"}

    def __init__(self, store: IRateLimitStore) -> None:
        self._store = store
        self.waiting: list[tuple[Deferred, str, object]] = []

    def take(self, key, spec) -> Deferred:
        self.waiting.append((Deferred(), key, spec))
        return self.waiting[-1][0]

    def decide(self) -> None:
        waiting, self.waiting = self.waiting, []
        for taking, key, spec in waiting:
            self._store.take(key, spec).chainDeferred(taking)

    def close(self) -> Deferred:
        return self._store.close()


def test_a_limit_decided_later_admits_the_call_then_or_refuses_it():
    h = Harness(LIMITED)
    later = DecidedLater(h.store)
    h.gateway.broker.limiter = attrs.evolve(h.gateway.broker.limiter, store=later)
    answered = []
    for _ in range(4):
        answered.append(h.request("GET", "/api/ai/x"))
    assert h.agents["ai"].requests == []  # nothing goes before its limit says so
    later.decide()
    h.flush()
    assert len(h.agents["ai"].requests) == 3
    answer_all(h)
    responses = [result_of(d) for d in answered]
    assert [response.code for response in responses] == [200, 200, 200, 429]
    assert responses[0].headers.getRawHeaders("ratelimit-remaining") == ["2"]
    assert error_of(responses[3])["type"] == "rate_limited"


def test_health_is_never_limited():
    h = Harness(LIMITED)
    for _ in range(10):
        assert result_of(h.request("GET", "/health/live")).code == 200


def test_a_service_with_its_own_limit_uses_its_own_buckets():
    h = Harness(LIMITED.replace("[service:data]\n", "[service:data]\nratelimit_requests = 1\nratelimit_window = 10\n"))
    d = h.request("GET", "/api/data/x")
    answer_all(h, "data")
    assert result_of(d).headers.getRawHeaders("ratelimit-limit") == ["1"]
    assert result_of(h.request("GET", "/api/data/x")).code == 429
    d = h.request("GET", "/api/ai/x")
    answer_all(h)
    assert result_of(d).code == 200


def test_header_keyed_limits_count_each_key_apart():
    h = Harness(LIMITED.replace("[ratelimit]\n", "[ratelimit]\nkey = header:X-Api-Key\n"))
    for _ in range(3):
        h.request("GET", "/api/ai/x", headers={"X-Api-Key": "team-a"})
        answer_all(h)
    assert result_of(h.request("GET", "/api/ai/x", headers={"X-Api-Key": "team-a"})).code == 429
    d = h.request("GET", "/api/ai/x", headers={"X-Api-Key": "team-b"})
    answer_all(h)
    assert result_of(d).code == 200


# -- health and logs


def test_liveness_and_readiness():
    h = Harness(SERVICE_INI)
    assert result_of(h.request("GET", "/health/live")).code == 200
    assert result_of(h.request("GET", "/health/ready")).code == 200
    h.gateway.accepting = False
    response = result_of(h.request("GET", "/health/ready"))
    assert response.code == 503


def test_wrong_method_on_a_probe_is_a_json_405():
    h = Harness(SERVICE_INI)
    response = result_of(h.request("POST", "/health"))
    assert response.code == 405
    assert error_of(response)["type"] == "method_not_allowed"


def test_every_log_line_about_a_request_carries_its_id_and_the_access_line_its_fields():
    h = Harness(ini(retries=1))
    with capture_logs() as logs:
        d = h.request("GET", "/api/data/x?q=1", headers={"X-Request-ID": "trace-me", "Authorization": "Bearer s3cret"})
        h.agents["data"].last.refuse()
        h.advance(1)
        h.agents["data"].last.respond(FakeResponse(200, {}, b"ok"))
        h.flush()
        result_of(d)
    mine = [e for e in logs if e.get("request_id") == "trace-me"]
    assert [e["event"] for e in mine] == ["attempt_failed"]
    [access] = h.access.lines
    assert list(access)[:3] == ["timestamp", "level", "event"]
    assert access["event"] == "request_completed" and access["request_id"] == "trace-me"
    assert access["trace_id"] == mine[0]["trace_id"]
    assert {k: access[k] for k in ("method", "path", "service", "status", "client", "attempts")} == {
        "method": "GET", "path": "/api/data/x", "service": "data", "status": 200, "client": "127.0.0.1", "attempts": 2,
    }
    assert access["duration_ms"] == 1000.0
    assert "s3cret" not in json.dumps(logs) + json.dumps(h.access.lines)


def test_a_gateway_bug_is_a_json_500_without_a_traceback():
    h = Harness(SERVICE_INI)

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug with a secret in its message")

    h.gateway.broker.proxy = broken
    with capture_logs() as logs:
        response = result_of(h.request("GET", "/api/ai/x", headers={"X-Request-ID": "bug-1"}))
    assert response.code == 500
    assert error_of(response) == {
        "type": "internal_error", "message": "the gateway failed to handle this request", "request_id": "bug-1",
    }
    assert any(e["event"] == "unhandled_error" and e["request_id"] == "bug-1" for e in logs)
    assert result_of(h.request("GET", "/health/live")).code == 200


def test_a_proxied_request_leaves_no_reference_cycle_behind():
    h = Harness(SERVICE_INI)

    def one():
        d = h.request("GET", "/api/ai/x")
        h.agents["ai"].last.respond(FakeResponse(200, {}, b"ok"))
        h.flush()
        result_of(treq.content(result_of(d)))

    # Cycles cost a collection every few dozen requests and long pauses (measured).
    assert cyclic_garbage_of(one) == []


# -- several endpoints per service

TWO = SERVICE_INI.replace("url = http://data.backend:8001", "url = http://data-a:8001, http://data-b:8001\nbalance = ordered")


def test_a_service_with_two_urls_sends_to_its_first_endpoint_when_ordered():
    h = Harness(TWO)
    d = h.request("GET", "/api/data/x")
    assert [r.uri for r in h.endpoints["http://data-a:8001"].requests] == [b"http://data-a:8001/x"]
    h.endpoints["http://data-a:8001"].last.respond(FakeResponse(200, {}, b"a"))
    h.flush()
    assert result_of(d).code == 200


def test_a_retry_goes_to_another_endpoint_than_the_one_that_failed():
    h = Harness(TWO)
    d = h.request("GET", "/api/data/x")
    h.endpoints["http://data-a:8001"].last.refuse()
    h.advance(1)
    assert len(h.endpoints["http://data-b:8001"].requests) == 1
    h.endpoints["http://data-b:8001"].last.respond(FakeResponse(200, {}, b"b"))
    h.flush()
    response = result_of(d)
    assert response.code == 200 and response.headers.getRawHeaders("x-gateway-attempts") == ["2"]


def test_each_endpoint_has_its_own_breaker_and_the_service_fails_fast_only_when_none_admits():
    h = Harness(TWO.replace("balance = ordered", "balance = ordered\nretries = 0\nbreaker_threshold = 1\nbreaker_cooldown = 30"))
    a, b = h.endpoints["http://data-a:8001"], h.endpoints["http://data-b:8001"]
    d = h.request("GET", "/api/data/x")
    a.last.refuse()
    h.flush()
    assert result_of(d).code == 502  # no retries: a's breaker is open now
    d = h.request("GET", "/api/data/x")
    assert len(a.requests) == 1 and len(b.requests) == 1  # b takes the traffic
    b.last.respond(FakeResponse(200, {}, b"b"))
    h.flush()
    assert result_of(d).code == 200
    health = body_json(result_of(h.request("GET", "/health")))["services"]["data"]
    assert health["url"] == "http://data-a:8001, http://data-b:8001"
    assert health["circuit"] == "closed"  # one endpoint closed: the service serves
    assert [(e["url"], e["circuit"]) for e in health["endpoints"]] == [("http://data-a:8001", "open"), ("http://data-b:8001", "closed")]
    h.advance(10)
    d = h.request("GET", "/api/data/x")
    b.last.refuse()
    h.flush()
    answer = result_of(d)
    assert answer.code == 502
    answer = result_of(h.request("GET", "/api/data/x"))
    assert answer.code == 503 and error_of(answer)["type"] == "circuit_open"
    assert answer.headers.getRawHeaders("retry-after") == ["20"]  # a's trial is the soonest
    health = body_json(result_of(h.request("GET", "/health")))["services"]["data"]
    assert (health["circuit"], health["trial_in_s"]) == ("open", 20.0)


def test_requests_in_flight_are_shown_per_endpoint():
    h = Harness(TWO)
    h.request("GET", "/api/data/x")
    endpoints = body_json(result_of(h.request("GET", "/health")))["services"]["data"]["endpoints"]
    assert [e["in_flight"] for e in endpoints] == [1, 0]
    h.endpoints["http://data-a:8001"].last.respond(FakeResponse(200, {}, b"a"))
    h.flush()
    endpoints = body_json(result_of(h.request("GET", "/health")))["services"]["data"]["endpoints"]
    assert [e["in_flight"] for e in endpoints] == [0, 0]


def test_a_reload_keeps_the_endpoints_whose_url_stayed():
    from txgateway.config.gateway import parse_config
    from txgateway.daemon.service import build_routes
    from txgateway.observability.metrics import GatewayMetrics

    h = Harness(TWO)
    before = h.gateway.broker.routes["data"]
    config = parse_config(TWO.replace("http://data-a:8001, http://data-b:8001", "http://data-b:8001, http://data-c:8001"), "t", {})
    after = build_routes(config, h.clock, h._upstream_for, h.log, GatewayMetrics(h.clock), h.gateway.broker.routes)["data"]
    assert after.endpoints[0] is before.endpoints[1]
    assert after.endpoints[1].url == "http://data-c:8001"


# -- fallback services

FALLBACK = SERVICE_INI.replace("[service:data]\n", "[service:data]\nfallback = ai\nretries = 0\n")


def test_a_service_that_gives_up_falls_over_to_its_fallback_with_the_same_request():
    h = Harness(FALLBACK)
    d = h.request("POST", "/api/data/x?q=1", data=b"same body", headers={"X-Request-ID": "fb-1"})
    h.agents["data"].last.refuse()
    sent = h.agents["ai"].last
    assert (sent.method, sent.uri, sent.body) == (b"POST", b"http://ai.backend:8000/v1/x?q=1", b"same body")
    assert sent.headers.getRawHeaders(b"x-request-id") == [b"fb-1"]
    sent.respond(FakeResponse(200, {}, b"from ai"))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    assert response.headers.getRawHeaders("x-gateway-service") == ["ai"]
    assert response.headers.getRawHeaders("x-gateway-fallback-from") == ["data"]
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["2"]
    [line] = h.access.lines
    assert (line["service"], line["served_by"], line["fallback_from"]) == ("data", "ai", ["data"])


@pytest.mark.parametrize("primary_retries", [0, 1, 2, 3])
def test_a_fallback_gets_its_own_retries_however_many_the_primary_spent(primary_retries):
    config = SERVICE_INI.replace("[service:data]\n", f"[service:data]\nfallback = ai\nretries = {primary_retries}\nretry_delay = 0.1\n")
    h = Harness(config.replace("[service:ai]\n", "[service:ai]\nretries = 3\nretry_delay = 0.1\n"))
    d = h.request("GET", "/api/data/x")
    for _ in range(20):
        for name in ("data", "ai"):
            for sent in h.agents[name].requests:
                if not sent.answer.called:
                    sent.respond(FakeResponse(503, {}, b"down"))
        h.advance(1)
    assert len(h.agents["data"].requests) == primary_retries + 1
    assert len(h.agents["ai"].requests) == 4
    response = result_of(d)
    assert response.code == 503
    assert response.headers.getRawHeaders("x-gateway-attempts") == [str(primary_retries + 5)]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_a_final_backend_failure_falls_over(status):
    h = Harness(FALLBACK)
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.respond(FakeResponse(status, {}, b"no"))
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"yes"))
    h.flush()
    assert result_of(d).code == 200


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_another_4xx_is_passed_through_and_never_falls_over(status):
    h = Harness(FALLBACK)
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.respond(FakeResponse(status, {}, b"client error"))
    h.flush()
    response = result_of(d)
    assert response.code == status
    assert h.agents["ai"].requests == []
    assert not response.headers.hasHeader("x-gateway-fallback-from")


def test_when_the_whole_chain_gives_up_the_last_error_is_answered_and_named():
    h = Harness(FALLBACK.replace("[service:ai]\n", "[service:ai]\nretries = 0\n"))
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.refuse()
    h.agents["ai"].last.refuse()
    h.flush()
    response = result_of(d)
    assert response.code == 502 and error_of(response)["type"] == "upstream_unavailable"
    assert response.headers.getRawHeaders("x-gateway-service") == ["ai"]
    assert response.headers.getRawHeaders("x-gateway-fallback-from") == ["data"]


def test_the_chain_shares_the_requested_services_deadline():
    h = Harness(FALLBACK.replace("retries = 0\n", "retries = 0\ndeadline = 5\ntimeout = 4\n", 1))
    d = h.request("GET", "/api/data/x")
    h.advance(4)  # data's attempt times out at 4 s: 1 s of the deadline is left for ai
    assert len(h.agents["ai"].requests) == 1
    h.advance(1)
    response = result_of(d)
    assert response.code == 504
    assert h.agents["ai"].cancelled == h.agents["ai"].requests


def test_an_open_circuit_falls_over_at_once_and_the_limit_charges_the_requested_service_once():
    h = Harness(FALLBACK.replace("requests = 1000", "requests = 3").replace("retries = 0\n", "retries = 0\nbreaker_threshold = 1\n", 1))
    first = h.request("GET", "/api/data/x")
    h.agents["data"].last.refuse()
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ai"))
    h.flush()
    assert result_of(first).headers.getRawHeaders("ratelimit-remaining") == ["2"]
    second = h.request("GET", "/api/data/x")  # data's circuit is open: straight to ai
    assert len(h.agents["data"].requests) == 1
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ai"))
    h.flush()
    response = result_of(second)
    assert response.code == 200 and response.headers.getRawHeaders("ratelimit-remaining") == ["1"]


# -- safe retries

def test_a_backends_429_is_retried_after_its_retry_after_and_is_no_breaker_failure():
    h = Harness(ini(breaker_threshold=1))
    d = h.request("GET", "/api/data/x")
    h.agents["data"].last.respond(FakeResponse(429, {b"retry-after": b"3"}, b"slow down"))
    h.advance(2.9)
    assert len(h.agents["data"].requests) == 1
    h.advance(0.1)
    h.agents["data"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200
    assert h.gateway.broker.routes["data"].breaker.status().state == "closed"


def test_a_silent_backend_gets_a_post_once_and_the_client_its_504_at_once():
    h = Harness(ini(timeout=10))
    d = h.request("POST", "/api/data/generate", data=b"{}")
    h.advance(10)
    assert len(h.agents["data"].requests) == 1
    response = result_of(d)
    assert response.code == 504 and error_of(response)["type"] == "upstream_timeout"


@pytest.mark.parametrize(
    "method, headers, retry_timeouts",
    [("GET", {}, "idempotent"), ("POST", {"Idempotency-Key": "k-1"}, "idempotent"), ("POST", {}, "always")],
)
def test_a_request_safe_to_send_again_is_retried_after_silence(method, headers, retry_timeouts):
    h = Harness(ini(timeout=10, retry_timeouts=retry_timeouts))
    h.request(method, "/api/data/x", headers=headers)
    h.advance(10)
    h.advance(1)
    assert len(h.agents["data"].requests) == 2


def test_retry_timeouts_never_means_never():
    h = Harness(ini(timeout=10, retry_timeouts="never"))
    d = h.request("GET", "/api/data/x")
    h.advance(10)
    h.advance(10)
    assert len(h.agents["data"].requests) == 1
    assert result_of(d).code == 504


def test_a_silent_endpoint_sends_a_post_to_the_other_endpoint():
    h = Harness(TWO.replace("balance = ordered", "balance = ordered\ntimeout = 10"))
    d = h.request("POST", "/api/data/generate", data=b"{}")
    h.advance(10)
    h.advance(1)
    a, b = h.endpoints["http://data-a:8001"], h.endpoints["http://data-b:8001"]
    assert len(a.requests) == 1 and len(b.requests) == 1
    b.last.respond(FakeResponse(200, {}, b"b"))
    h.flush()
    assert result_of(d).code == 200


def test_the_retry_budget_refuses_a_retry_beyond_it_and_the_request_ends_with_its_outcome():
    h = Harness(ini(retry_budget=0, retry_budget_min=1, retries=3))
    first = h.request("GET", "/api/data/one")
    second = h.request("GET", "/api/data/two")
    upstream = h.agents["data"]
    with capture_logs() as logs:
        upstream.requests[0].respond(FakeResponse(503, {}, b"busy"))  # one retrying: the budget's floor
        upstream.requests[1].respond(FakeResponse(503, {}, b"busy too"))  # refused a retry
        h.flush()
    response = result_of(second)
    assert response.code == 503 and result_of(treq.content(response)) == b"busy too"
    assert [e["event"] for e in logs if e["event"] == "retry_budget_exhausted"] == ["retry_budget_exhausted"]
    h.advance(1)
    upstream.last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(first).code == 200
    assert len(upstream.requests) == 3


def test_an_attempt_line_announces_a_retry_only_when_one_happens():
    h = Harness(ini(retries=3, breaker_threshold=1))
    with capture_logs() as logs:
        d = h.request("GET", "/api/data/x")
        h.agents["data"].last.refuse()
        h.flush()
    assert result_of(d).code == 503
    [line] = [e for e in logs if e["event"] == "attempt_failed"]
    assert line["retry"] is False and "retry_in_s" not in line


# -- the commit point

def test_an_answer_that_stalls_before_its_first_byte_is_retried():
    h = Harness(ini(first_byte_timeout=3))
    d = h.request("GET", "/api/data/x")
    stalled = h.agents["data"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    h.advance(3)
    assert stalled.transport.stopped
    h.advance(1)
    second = h.agents["data"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    second.send(b"data: hello\n\n")
    second.finish()
    h.flush()
    response = result_of(d)
    assert response.code == 200 and result_of(treq.content(response)) == b"data: hello\n\n"
    assert response.headers.getRawHeaders("x-gateway-attempts") == ["2"]


def test_a_silent_post_before_its_first_byte_gets_its_504_at_once():
    h = Harness(ini(first_byte_timeout=3))
    d = h.request("POST", "/api/data/generate", data=b"{}")
    h.agents["data"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    h.advance(3)
    response = result_of(d)
    assert response.code == 504 and "no first byte within 3 s" in error_of(response)["message"]
    assert len(h.agents["data"].requests) == 1


def test_an_answer_that_breaks_before_its_first_byte_falls_over():
    h = Harness(FALLBACK)
    d = h.request("GET", "/api/data/x")
    broken = h.agents["data"].last.respond(FakeResponse(200, {}))
    broken.fail("reset")
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"from ai"))
    h.flush()
    response = result_of(d)
    assert result_of(treq.content(response)) == b"from ai"
    assert response.headers.getRawHeaders("x-gateway-fallback-from") == ["data"]


def test_an_event_stream_broken_after_the_commit_point_ends_with_an_error_event():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/stream", unbuffered=True, headers={"X-Request-ID": "sse-1"})
    upstream = h.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    upstream.send(b"data: tok1\n\n")
    h.flush()
    received = []
    done = treq.collect(result_of(d), received.append)
    upstream.fail("reset")
    h.flush()
    body = b"".join(received)
    assert body.startswith(b"data: tok1\n\n")
    event = body[len(b"data: tok1\n\n"):]
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    error = json.loads(event[len(b"event: error\ndata: "):])["error"]
    assert error["type"] == "stream_broken" and error["request_id"] == "sse-1"
    failures = []
    done.addErrback(failures.append)
    assert failures, "the chunked body never ends: no client takes it for complete"


def test_an_error_kinds_own_retry_after_is_on_every_answer_of_it_unless_one_is_given():
    from txgateway.errors import BAD_REQUEST, GATEWAY_BUSY, error_answer

    busy = error_answer(GATEWAY_BUSY, "full", "r1")
    assert busy.status == 503 and (b"Retry-After", b"1") in busy.headers
    given = error_answer(GATEWAY_BUSY, "full", "r1", [(b"retry-after", b"7")])
    assert [value for name, value in given.headers if name.lower() == b"retry-after"] == [b"7"]
    assert not any(name.lower() == b"retry-after" for name, _ in error_answer(BAD_REQUEST, "no", "r1").headers)
