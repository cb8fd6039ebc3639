"""
Breakers and retries through the running daemon, against real flaky
backends on loopback, with short configured delays.
"""

from __future__ import annotations

import http.client
import time

import pytest

from tests.integration.conftest import wait_until
from tests.integration.test_daemon import ini_for

pytestmark = pytest.mark.integration

SHORT = dict(retry_delay=0.05, retry_max_delay=0.5, timeout=1, breaker_cooldown=1, idle_timeout=0.5)


def test_a_backend_that_fails_twice_then_succeeds_is_answered_on_the_third_attempt(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **SHORT))
    answer = gateway.request("GET", "/api/data/flaky/k1?fail=2&code=503", headers={"X-Request-ID": "flaky-1"})
    assert answer.status == 200
    assert answer.json() == {"attempt": 3, "ok": True}
    assert answer.headers["X-Gateway-Attempts"] == "3"
    assert fresh_backend.calls()["by_path"]["/flaky/k1"] == 3


def test_4xx_is_passed_through_after_one_attempt(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **SHORT))
    answer = gateway.request("GET", "/api/data/flaky/k2?fail=5&code=409")
    assert answer.status == 409
    assert answer.headers["X-Gateway-Attempts"] == "1"
    assert fresh_backend.calls()["by_path"]["/flaky/k2"] == 1


def test_a_backends_429_is_retried_and_never_opens_the_circuit(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **SHORT))
    answer = gateway.request("GET", "/api/data/flaky/k3?fail=2&code=429")
    assert answer.status == 200
    assert answer.headers["X-Gateway-Attempts"] == "3"
    assert gateway.request("GET", "/health").json()["services"]["data"]["consecutive_failures"] == 0


def test_a_backend_that_always_fails_opens_the_circuit_and_then_fails_fast(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, retries=0, breaker_cooldown=30))
    for _ in range(5):
        answer = gateway.request("GET", "/api/data/status/500")
        assert answer.status == 500  # the backend's own answer, passed through
    started = time.monotonic()
    answer = gateway.request("GET", "/api/data/status/500")
    elapsed = time.monotonic() - started
    assert answer.status == 503
    assert answer.error["type"] == "circuit_open"
    assert 1 <= int(answer.headers["Retry-After"]) <= 30
    assert fresh_backend.calls()["by_path"]["/status/500"] == 5
    assert elapsed < 1.0  # fail fast: the backend is not called (benchmarks measure the real cost)
    health = gateway.request("GET", "/health").json()
    assert health["services"]["data"]["circuit"] == "open"
    assert health["services"]["ai"]["circuit"] == "closed"  # the same backend, another service
    assert gateway.request("GET", "/api/ai/echo").status == 200
    transitions = gateway.logged("circuit_transition")
    assert [(e["service"], e["from"], e["to"]) for e in transitions] == [("data", "closed", "open")]
    assert transitions[0]["request_id"]


def test_after_the_cooldown_one_trial_closes_the_circuit(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, retries=0, breaker_cooldown=0.5))
    for _ in range(5):
        gateway.request("GET", "/api/data/status/502")
    assert gateway.request("GET", "/api/data/echo").status == 503
    wait_until(lambda: gateway.request("GET", "/health").json()["services"]["data"]["circuit"] == "half_open")
    assert gateway.request("GET", "/api/data/echo").status == 200
    assert gateway.request("GET", "/health").json()["services"]["data"]["circuit"] == "closed"


def test_refused_connections_are_retried_then_answered_502(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url, **SHORT))
    answer = gateway.request("GET", "/api/down/x")
    assert answer.status == 502
    assert answer.error["type"] == "upstream_unavailable"
    story = gateway.story(answer.headers["X-Request-ID"])
    assert [e.get("attempt") for e in story if e["event"] == "attempt_failed"] == [1, 2, 3, 4]


def test_a_backend_hanging_past_the_timeout_is_retried_then_504(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **{**SHORT, "timeout": 0.3, "retries": 1}))
    answer = gateway.request("GET", "/api/data/hang")
    assert answer.status == 504
    assert answer.error["type"] == "upstream_timeout"
    assert fresh_backend.calls()["by_path"]["/hang"] == 2
    wait_until(lambda: fresh_backend.calls()["disconnects"] == 2)  # each timed-out attempt let go


def test_a_reset_mid_body_breaks_the_client_connection_and_is_not_retried(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **SHORT))
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("GET", "/api/data/reset")
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()
    assert fresh_backend.calls()["by_path"]["/reset"] == 1


def test_a_stalled_body_is_cut_after_idle_timeout(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url, **SHORT))
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("GET", "/api/data/stall", headers={"X-Request-ID": "stall-1"})
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()
    wait_until(lambda: fresh_backend.calls()["disconnects"] == 1)
    wait_until(lambda: any(e.get("event") == "stream_failed" and e["request_id"] == "stall-1" for e in gateway.log_lines()))


def test_a_long_stream_with_steady_tokens_is_never_cut(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url, **SHORT))  # idle_timeout 0.5, timeout 1
    answer = gateway.request("GET", "/api/data/sse?n=12&interval=0.2")  # 2.4 s in all
    assert answer.status == 200
    assert answer.body.count(b"data: token") == 12
