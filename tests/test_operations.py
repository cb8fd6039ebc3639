"""Metrics, trace context, API keys and reload, in memory on a Clock."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from twisted.internet.testing import MemoryReactorClock

from tests.fakes import SERVICE_INI, FakeResponse, Harness, result_of
from txgateway.config.gateway import parse_config
from txgateway.daemon.service import GatewayService
from txgateway.observability.tracing import trace_context_for


def answer(h, service="ai", code=200, body=b"ok"):
    h.agents[service].last.respond(FakeResponse(code, {}, body))
    h.flush()


def samples(h) -> dict:
    text = result_of(treq.content(result_of(h.request("GET", "/metrics")))).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


# -- metrics


def test_metrics_are_prometheus_text_with_txgateway_names():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    answer(h)
    result_of(d)
    response = result_of(h.request("GET", "/metrics"))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4")
    names = {name for name, _ in samples(h)}
    assert names and all(name.startswith("txgateway_") for name in names)


def test_requests_durations_attempts_and_retries_are_counted():
    h = Harness(SERVICE_INI)
    d = h.request("POST", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(502, {}, b"no"))
    h.advance(1)
    h.advance(0.5)
    answer(h)
    result_of(d)
    found = samples(h)
    assert found[("txgateway_requests_total", (("method", "POST"), ("service", "ai"), ("status_class", "2xx")))] == 1
    ai = ("endpoint", "http://ai.backend:8000/v1")
    assert found[("txgateway_upstream_attempts_total", (ai, ("outcome", "http_5xx"), ("service", "ai")))] == 1
    assert found[("txgateway_upstream_attempts_total", (ai, ("outcome", "answered"), ("service", "ai")))] == 1
    assert found[("txgateway_retries_total", (("service", "ai"),))] == 1
    assert found[("txgateway_request_duration_seconds_sum", (("service", "ai"),))] == 1.5
    assert found[("txgateway_upstream_duration_seconds_sum", (ai, ("service", "ai")))] == 0.5
    assert found[("txgateway_in_flight_requests", ())] == 1  # the /metrics request itself


def test_circuit_state_and_transitions_are_exported():
    h = Harness(SERVICE_INI.replace("[service:data]\n", "[service:data]\nretries = 0\n"))
    for _ in range(5):
        d = h.request("GET", "/api/data/x")
        answer(h, "data", 500)
        result_of(d)
    found = samples(h)
    data, ai = ("endpoint", "http://data.backend:8001"), ("endpoint", "http://ai.backend:8000/v1")
    assert found[("txgateway_circuit_state", (data, ("service", "data"), ("state", "open")))] == 1
    assert found[("txgateway_circuit_state", (data, ("service", "data"), ("state", "closed")))] == 0
    assert found[("txgateway_circuit_state", (ai, ("service", "ai"), ("state", "closed")))] == 1
    assert found[("txgateway_circuit_transitions_total", (data, ("from_state", "closed"), ("service", "data"), ("to_state", "open")))] == 1
    assert found[("txgateway_ratelimit_store_healthy", (("backend", "memory"),))] == 1


def test_rate_limited_requests_are_counted():
    h = Harness(SERVICE_INI.replace("requests = 1000", "requests = 1"))
    d = h.request("GET", "/api/ai/x")
    answer(h)
    result_of(d)
    assert result_of(h.request("GET", "/api/ai/x")).code == 429
    assert samples(h)[("txgateway_rate_limited_total", (("service", "ai"),))] == 1


def test_unusual_methods_do_not_grow_the_label_set():
    h = Harness(SERVICE_INI)
    result_of(h.request("PROPFIND", "/api/nope/x"))
    assert samples(h)[("txgateway_requests_total", (("method", "other"), ("service", "none"), ("status_class", "4xx")))] == 1


# -- trace context

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_valid_traceparent_is_continued_with_the_gateways_span():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x", headers={
        "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "tracestate": "vendor=abc",
    })
    answer(h)
    result_of(d)
    sent = h.agents["ai"].last.headers
    version, trace_id, span_id, flags = sent.getRawHeaders(b"traceparent")[0].decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert span_id != "00f067aa0ba902b7" and len(span_id) == 16
    assert sent.getRawHeaders(b"tracestate") == [b"vendor=abc"]
    [line] = h.access.lines  # the request's one line names its trace
    assert line["trace_id"] == TRACE


@pytest.mark.parametrize(
    "sent",
    [None, b"garbage", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"ff-" + TRACE.encode() + b"-00f067aa0ba902b7-01",
     b"00-" + TRACE.upper().encode() + b"-00f067aa0ba902b7-01", b"00-" + TRACE.encode() + b"-00f067aa0ba902b7-01-extra"],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace(sent):
    trace = trace_context_for(sent, b"vendor=abc")
    assert not trace.continued
    assert len(trace.trace_id) == 32 and trace.trace_id != TRACE
    assert trace.tracestate is None


def test_every_attempt_carries_the_trace():
    h = Harness(SERVICE_INI)
    h.request("GET", "/api/ai/x", headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-00"})
    h.agents["ai"].last.refuse()
    h.advance(1)
    first, second = h.agents["ai"].requests
    [traceparent] = first.headers.getRawHeaders(b"traceparent")  # there: never None == None
    assert traceparent.startswith(b"00-" + TRACE.encode() + b"-")
    assert second.headers.getRawHeaders(b"traceparent") == [traceparent]


# -- API keys

AUTH = SERVICE_INI + "[auth]\nkeys = team-a:alpha-secret, team-b:sha256:" + hashlib.sha256(b"beta-secret").hexdigest() + "\n"


def test_without_a_key_api_requests_get_401_and_the_probes_do_not():
    h = Harness(AUTH)
    response = result_of(h.request("GET", "/api/ai/x", headers={"X-Request-ID": "auth-1"}))
    assert response.code == 401
    assert json.loads(result_of(treq.content(response)))["error"] == {
        "type": "unauthorized",
        "message": "a valid API key is needed: Authorization: Bearer <key> or X-API-Key: <key>",
        "request_id": "auth-1",
    }
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="txgateway"']
    assert h.agents["ai"].requests == []
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert result_of(h.request("GET", path)).code == 200


def test_a_wrong_key_and_an_unknown_service_both_get_401():
    h = Harness(AUTH)
    assert result_of(h.request("GET", "/api/ai/x", headers={"Authorization": "Bearer nope"})).code == 401
    assert result_of(h.request("GET", "/api/secret-service/x")).code == 401


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer alpha-secret"}, {"X-API-Key": "alpha-secret"}, {"Authorization": "bearer alpha-secret"}])
def test_a_good_key_in_either_header_is_let_through_and_kept_from_the_backend(headers):
    h = Harness(AUTH)
    with capture_logs() as logs:
        d = h.request("GET", "/api/ai/x", headers=headers)
        answer(h)
        assert result_of(d).code == 200
    sent = h.agents["ai"].last.headers
    assert not sent.hasHeader(b"authorization") and not sent.hasHeader(b"x-api-key")
    [completed] = [e for e in h.access.lines if e["event"] == "request_completed"]
    assert completed["api_key_name"] == "team-a"
    assert "alpha-secret" not in json.dumps(logs) + json.dumps(h.access.lines)


def test_a_hashed_key_works():
    h = Harness(AUTH)
    d = h.request("GET", "/api/ai/x", headers={"X-API-Key": "beta-secret"})
    answer(h)
    assert result_of(d).code == 200


def test_the_backends_own_authorization_passes_when_the_gateway_key_is_in_x_api_key():
    h = Harness(AUTH)
    h.request("GET", "/api/ai/x", headers={"X-API-Key": "alpha-secret", "Authorization": "Bearer backend-token"})
    sent = h.agents["ai"].last.headers
    assert sent.getRawHeaders(b"authorization") == [b"Bearer backend-token"]
    assert not sent.hasHeader(b"x-api-key")


def test_a_service_may_ask_for_the_key():
    h = Harness(AUTH.replace("[service:data]\n", "[service:data]\nforward_api_key = true\n"))
    h.request("GET", "/api/data/x", headers={"X-API-Key": "alpha-secret"})
    assert h.agents["data"].last.headers.getRawHeaders(b"x-api-key") == [b"alpha-secret"]


def test_the_key_name_is_the_rate_limit_key_when_asked():
    h = Harness(AUTH.replace("requests = 1000", "requests = 1\nkey = api_key"))
    d = h.request("GET", "/api/ai/x", headers={"X-API-Key": "alpha-secret"})
    answer(h)
    result_of(d)
    assert result_of(h.request("GET", "/api/ai/x", headers={"Authorization": "Bearer alpha-secret"})).code == 429
    d = h.request("GET", "/api/ai/x", headers={"X-API-Key": "beta-secret"})
    answer(h)
    assert result_of(d).code == 200


def test_keys_come_from_a_keys_file_too(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nteam-c:gamma-secret\n\n")
    h = Harness(SERVICE_INI + f"[auth]\nkeys_file = {keys}\n")
    d = h.request("GET", "/api/ai/x", headers={"X-API-Key": "gamma-secret"})
    answer(h)
    assert result_of(d).code == 200


def test_a_bad_keys_file_line_is_named(tmp_path):
    from txgateway.config.gateway import ConfigError

    keys = tmp_path / "keys"
    keys.write_text("team-c:gamma\nbroken\n")
    with pytest.raises(ConfigError, match=rf"test.ini: \[auth\] keys_file: {keys} line 2: expected name:secret"):
        parse_config(SERVICE_INI + f"[auth]\nkeys_file = {keys}\n", "test.ini", environ={})


# -- reload


def make_service(tmp_path, ini: str) -> tuple[GatewayService, MemoryReactorClock, object]:
    path = tmp_path / "gateway.ini"
    path.write_text(ini)
    config = parse_config(ini, str(path), environ={})
    reactor = MemoryReactorClock()
    service = GatewayService(config, reactor, stdout=io.StringIO(), config_path=str(path))
    return service, reactor, path


RELOADABLE = """
[gateway]
listen = tcp:0
[logging]
file =
[responses]
store = memory
[service:ai]
url = http://ai.backend:8000
breaker_threshold = 1
[service:data]
url = http://data.backend:8001
breaker_threshold = 1
"""


def test_a_valid_reload_swaps_the_config_and_keeps_breakers_of_unchanged_services(tmp_path):
    service, reactor, path = make_service(tmp_path, RELOADABLE)
    old = service.gateway
    for name in ("ai", "data"):
        breaker = old.broker.routes[name].breaker
        breaker.failed(breaker.admit("r"), "boom")
    path.write_text(RELOADABLE.replace("http://data.backend:8001", "http://data2.backend:8001") + "[service:rag]\nurl = http://rag:1\n")
    assert service.reload() is True
    new = service.gateway
    assert service.front.gateway is new
    assert set(new.broker.routes) == {"ai", "data", "rag"}
    assert new.broker.routes["ai"].breaker is old.broker.routes["ai"].breaker
    assert new.broker.routes["ai"].breaker.status().state == "open"
    assert new.broker.routes["data"].breaker.status().state == "closed"
    assert new.started_at == old.started_at


def test_a_broken_file_on_reload_is_rejected_and_the_old_config_keeps_running(tmp_path):
    service, reactor, path = make_service(tmp_path, RELOADABLE)
    old = service.gateway
    path.write_text(RELOADABLE.replace("breaker_threshold = 1", "breaker_threshold = many", 1))
    with capture_logs() as logs:
        assert service.reload() is False
    assert service.gateway is old and service.front.gateway is old
    rejected = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert "[service:ai] breaker_threshold" in rejected[0]["reason"]


def test_a_reload_retires_what_the_new_config_dropped(tmp_path):
    service, reactor, path = make_service(tmp_path, RELOADABLE)
    dropped = service.gateway.broker.routes["data"].breaker
    dropped.failed(dropped.admit("r"), "boom")
    service.sink.flush()  # the transition's log line waits for its batch otherwise
    cooldown = [call for call in reactor.getDelayedCalls() if call.active()]
    assert len(cooldown) == 1  # the open circuit's timer, nothing else
    path.write_text(RELOADABLE.split("[service:data]")[0])
    assert service.reload()
    assert not cooldown[0].active()


def test_a_reload_that_changes_the_rate_limit_gets_a_new_store_and_keeps_unchanged_ones(tmp_path):
    service, reactor, path = make_service(tmp_path, RELOADABLE + "[ratelimit]\nrequests = 5\n")
    first_store = service.gateway.store
    path.write_text(RELOADABLE + "[ratelimit]\nrequests = 5\n[service:rag]\nurl = http://rag:1\n")
    assert service.reload()
    assert service.gateway.store is first_store  # [ratelimit] unchanged: the buckets go on
    path.write_text(RELOADABLE + "[ratelimit]\nrequests = 7\n")
    assert service.reload()
    assert service.gateway.store is not first_store
    assert service.gateway.broker.limiter.default.capacity == 7


def test_services_sharing_a_url_have_pools_of_their_own_and_each_is_closed_with_its_service(tmp_path):
    shared = RELOADABLE.replace("http://data.backend:8001", "http://ai.backend:8000")
    service, reactor, path = make_service(tmp_path, shared)
    ai, data = (service.gateway.broker.routes[name].endpoints[0].upstream for name in ("ai", "data"))
    assert ai is not data
    path.write_text(shared.split("[service:data]")[0])
    assert service.reload()
    assert data.closed and not ai.closed
    result_of(service.stopService())
    assert ai.closed
