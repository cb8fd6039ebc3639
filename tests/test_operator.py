"""
What an operator sees: the status document and who may read it, the 60 s
window against /metrics, probes kept out of the logs and counts, and the
rough edges a new user met (reason phrases, Date, Server, drain_delay, a
key without '=').
"""

from __future__ import annotations

import io
import json
from email.utils import formatdate

import pytest
import treq

from txgateway.admin.page import STATUS_PAGE, status_page_with
from structlog.testing import capture_logs
from twisted.internet.testing import MemoryReactorClock

from tests.fakes import SERVICE_INI, DataPlaneAgent, FakeResponse, Harness, result_of
from txgateway.config.gateway import ConfigError, parse_config
from txgateway.daemon.service import GatewayService
from txgateway.observability.logs import AccessLog
from txgateway.observability.window import RecentWindow, percentile_of

JSON = {b"content-type": b"application/json"}


def body_json(response) -> dict:
    return json.loads(result_of(treq.content(response)))


def test_the_status_document_shows_endpoints_their_last_minute_stores_and_events():
    h = Harness(SERVICE_INI.replace("timeout = 10", "timeout = 10\nbreaker_threshold = 1\nretries = 0"))
    d = h.request("GET", "/api/ai/x")
    h.advance(0.02)
    h.agents["ai"].last.respond(FakeResponse(200, JSON, b"{}"))
    h.flush()
    result_of(d)
    d = h.request("GET", "/api/ai/x", headers={"X-Request-ID": "the-failing-one"})
    h.agents["ai"].last.respond(FakeResponse(502, JSON, b"{}"))
    h.flush()
    result_of(d)
    status = body_json(result_of(h.request("GET", "/status.json")))
    [endpoint] = status["services"]["ai"]["endpoints"]
    assert endpoint["circuit"] == "open" and endpoint["consecutive_failures"] == 1
    assert endpoint["requests_per_s"] == round(2 / 60, 3) and endpoint["error_rate"] == 0.5
    assert endpoint["p50_ms"] <= 1.0 and 10 < endpoint["p99_ms"] <= 25  # one attempt took 20 ms, one no time
    [event] = status["events"]
    assert (event["kind"], event["from"], event["to"], event["request_id"]) == ("circuit", "closed", "open", "the-failing-one")
    assert status["stores"] == [{"name": "rate limit", "backend": "memory", "healthy": True}]
    assert status["config"] == "test.ini" and status["last_reload"] is None


def test_the_status_page_is_one_self_contained_html_page():
    h = Harness(SERVICE_INI)
    response = result_of(h.request("GET", "/status"))
    page = result_of(treq.content(response)).decode()
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert "status.json" in page and "setInterval(refresh,2000)" in page
    assert "http://" not in STATUS_PAGE and "https://" not in STATUS_PAGE  # no external asset: works offline
    assert 'src="http' not in page and "<link" not in page
    # It holds its first data: painted before any fetch (no "loading" in a first screenshot).
    initial = page.split('<script id="initial" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(initial)["status"]["services"]["ai"]["url"] == "http://ai.backend:8000/v1"
    assert page.index('id="initial"') < page.index('"use strict"')


def test_the_first_data_cannot_end_its_script_element():
    page = status_page_with(json.dumps({"status": {"config": "</script><script>alert(1)</script>"}, "spend": None}))
    initial = page.split('<script id="initial" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(initial)["status"]["config"] == "</script><script>alert(1)</script>"


def test_only_allowed_networks_see_the_status_page():
    h = Harness(SERVICE_INI + "[status]\nallow = 10.9.0.0/16\n")
    assert result_of(h.request("GET", "/status.json")).code == 404  # 127.0.0.1 is not allowed here
    h.agent = DataPlaneAgent(h.server_factory, peer="10.9.1.1")
    h.client = treq.client.HTTPClient(h.agent, data_to_body_producer=treq.testing._SynchronousProducer)
    assert result_of(h.request("GET", "/status.json")).code == 200
    assert result_of(h.request("GET", "/status")).code == 200


def histogram_quantile(fraction: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs, written out independently."""
    total = cumulative[-1][1]
    rank = fraction * total
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    raise AssertionError("no bucket holds the rank")


def test_the_window_agrees_with_the_metrics_histogram_of_the_same_attempts():
    from prometheus_client.parser import text_string_to_metric_families

    h = Harness(SERVICE_INI.replace("timeout = 10", "timeout = 10\nretries = 0"))
    for took in (0.003, 0.004, 0.004, 0.02, 0.2, 0.2, 0.7, 2.0):
        d = h.request("GET", "/api/ai/x")
        h.advance(took)
        h.agents["ai"].last.respond(FakeResponse(200, JSON, b"{}"))
        h.flush()
        result_of(d)
    families = text_string_to_metric_families(result_of(treq.content(result_of(h.request("GET", "/metrics")))).decode())
    [histogram] = [f for f in families if f.name == "txgateway_upstream_duration_seconds"]
    buckets = sorted(
        (float(sample.labels["le"]), sample.value) for sample in histogram.samples
        if sample.name.endswith("_bucket") and sample.labels["service"] == "ai"
    )
    [count] = [s.value for s in histogram.samples if s.name.endswith("_count") and s.labels["service"] == "ai"]
    [endpoint] = body_json(result_of(h.request("GET", "/status.json")))["services"]["ai"]["endpoints"]
    assert count == 8 and endpoint["requests_per_s"] == round(count / 60, 3)
    assert endpoint["p50_ms"] == round(histogram_quantile(0.5, buckets) * 1000, 1)
    assert endpoint["p99_ms"] == round(histogram_quantile(0.99, buckets) * 1000, 1)
    assert endpoint["p50_ms"] != endpoint["p99_ms"]  # the two quantiles are told apart, not one default


def test_the_window_forgets_what_is_older_than_its_minute():
    from twisted.internet.task import Clock

    clock = Clock()
    window = RecentWindow(clock)
    for seconds in (0.004, 0.004, 0.02, 0.2):
        window.observe("s", "e", False)
        window.time("s", "e", seconds)
    assert window.summary("s", "e")["p50_ms"] == 5.0  # the 0.005 bucket's upper bound, as histogram_quantile says
    clock.advance(61)
    assert window.summary("s", "e")["requests_per_s"] == 0.0  # the minute has passed
    assert percentile_of([0, 0], 0, 0.5) is None


def test_probes_and_scrapes_are_debug_lines_and_not_counted():
    h = Harness(SERVICE_INI)
    for path in ("/health", "/health/live", "/metrics", "/status.json"):
        result_of(h.request("GET", path))
    assert h.access.lines == []  # the harness logs at info
    exposition = h.gateway.metrics.exposition().decode()
    assert 'service="none"' not in exposition
    assert "_created" not in exposition


def test_a_debug_access_log_keeps_the_probes():
    sink = type("Sink", (), {"lines": [], "msg": lambda self, line: self.lines.append(json.loads(line))})()
    log = AccessLog(sink, "debug")
    ctx = type("Ctx", (), {"request_id": "r", "trace": None, "caller": None, "service": None, "served_by": None,
                           "fallback_from": [], "client": "c", "attempts": 0, "outcome": None, "cache": None,
                           "completion": None, "spend": None})()
    log.request("request_completed", ctx, level="debug", path="/health")
    [line] = sink.lines
    assert list(line)[:3] == ["timestamp", "level", "event"] and line["level"] == "debug"


def test_every_structlog_line_starts_with_timestamp_level_and_event():
    from txgateway.observability.logs import configure_logging

    lines = []
    write = lambda self, line: lines.append(json.loads(line))  # noqa: E731
    sink = type("Sink", (), {name: write for name in ("msg", "debug", "info", "warning", "error", "critical")})()
    configure_logging(sink, "info", cache=False)
    try:
        import structlog

        structlog.get_logger("t").bind(request_id="r1", service="ai").warning("attempt_failed", reason="x")
    finally:
        structlog.reset_defaults()
    assert list(lines[0])[:3] == ["timestamp", "level", "event"]


def test_a_rate_limited_answer_carries_its_reason_phrase_and_the_time_it_was_sent():
    h = Harness(SERVICE_INI.replace("requests = 1000", "requests = 1"))
    h.advance(90)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(200, JSON, b"{}"))
    h.flush()
    result_of(d)
    refused = result_of(h.request("GET", "/api/ai/x"))
    assert (refused.code, refused.phrase) == (429, b"Too Many Requests")
    assert refused.headers.getRawHeaders("server") is None


def test_the_date_of_a_slow_answer_is_when_it_was_sent():
    h = Harness(SERVICE_INI.replace("timeout = 10", "timeout = 10\nretries = 0"))
    d = h.request("GET", "/api/ai/x")
    h.advance(10)  # the attempt times out: the 504 goes out now
    response = result_of(d)
    assert response.code == 504
    assert response.headers.getRawHeaders("date") == [formatdate(10, usegmt=True)]


def test_a_proxied_answer_keeps_the_backends_server_header():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(200, {b"server": b"vllm"}, b"{}"))
    h.flush()
    assert result_of(d).headers.getRawHeaders("server") == ["vllm"]
    assert result_of(h.request("GET", "/health")).headers.getRawHeaders("server") is None


def test_a_key_without_its_equals_sign_is_named_as_such():
    with pytest.raises(ConfigError) as caught:
        parse_config("[service:ai]\nurl http://x:1\n", "g.ini", {})
    assert str(caught.value) == "g.ini: [service:ai] url: a key and its value need '=' between them (write url = ...)"


def test_drain_delay_keeps_accepting_with_ready_at_503_before_the_listener_closes(tmp_path):
    ini = SERVICE_INI.replace("listen = tcp:0", "listen = tcp:0\ndrain_delay = 5")
    config = parse_config(ini, "g.ini", {})
    reactor = MemoryReactorClock()
    service = GatewayService(config, reactor, stdout=io.StringIO())
    service.privilegedStartService()
    service.startService()
    [port] = [p for p in reactor.tcpServers]
    stopping = service.stopService()
    assert not stopping.called and service.gateway.accepting is False
    listener = service.services[0]
    assert listener.running  # still accepting during drain_delay
    reactor.advance(5)
    assert not listener.running
    reactor.advance(1)
    result_of(stopping)


def test_a_reload_is_shown_with_its_time_and_outcome(tmp_path):
    from tests.test_operations import RELOADABLE, make_service

    service, reactor, path = make_service(tmp_path, RELOADABLE)
    reactor.advance(100)
    path.write_text(RELOADABLE.replace("breaker_threshold = 1", "breaker_threshold = x", 1))
    with capture_logs():
        assert service.reload() is False
    assert service.gateway.status()["last_reload"]["outcome"].startswith("rejected: ")
    path.write_text(RELOADABLE)
    assert service.reload()
    assert service.gateway.status()["last_reload"] == {"time": 100.0, "outcome": "applied"}


def test_the_service_leaves_structlog_alone_and_its_destination_follows_a_reload(tmp_path):
    import structlog

    from tests.test_operations import RELOADABLE, make_service
    from txgateway.observability.logs import LogDestination, configure_logging

    structlog.reset_defaults()
    service, reactor, path = make_service(tmp_path, RELOADABLE)
    assert not structlog.is_configured()  # only the entry point (makeService) configures it
    destination = LogDestination()
    lines = []
    write = lambda self, line: lines.append(json.loads(line))  # noqa: E731
    first = type("Sink", (), {"msg": write})()
    destination.use(first, "warning")
    configure_logging(destination, cache=False)
    try:
        log = structlog.get_logger("t")
        log.info("dropped")
        log.warning("kept")
        destination.use(first, "debug")  # what a reload to level = debug does
        log.debug("now kept")
    finally:
        structlog.reset_defaults()
    assert [line["event"] for line in lines] == ["kept", "now kept"]


def test_twisteds_own_lines_start_with_timestamp_level_and_event_too():
    from txgateway.observability.logs import TwistedJsonObserver

    lines = []
    sink = type("Sink", (), {"msg": lambda self, line: lines.append(json.loads(line)), "sync": lambda self: None})()
    TwistedJsonObserver(sink, "info")({"log_format": "reactor started", "log_level": None, "log_namespace": "twisted"})
    assert list(lines[0])[:3] == ["timestamp", "level", "event"]


def test_the_last_minute_a_second_at_a_time_with_the_open_circuit_as_a_band():
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1000)
    window = RecentWindow(clock)
    for _ in range(3):
        window.observe("ai", "http://a", failed=False)
        window.time("ai", "http://a", 0.02)
    window.observe("ai", "http://b", failed=True)
    clock.advance(10)
    window.transition("ai", "http://a", "closed", "open")
    clock.advance(5)
    window.transition("ai", "http://a", "open", "half_open")
    clock.advance(5)
    window.observe("ai", "http://a", failed=False)
    series = window.series("ai", {"http://a": "half_open", "http://b": "closed"})
    assert all(len(values) == 60 for values in series.values())
    assert series["requests_per_s"][-21] == 4 and series["error_rate"][-21] == 0.25 and series["requests_per_s"][-1] == 1
    assert 10.0 < series["p99_ms"][-21] <= 25.0 and series["p99_ms"][-2] is None
    # Open from the transition's second (1010) until the half-open one (1015): seconds -11 to -6.
    assert [index - 60 for index, opened in enumerate(series["open"]) if opened] == [-11, -10, -9, -8, -7]


def test_the_status_document_has_each_services_last_minute_as_series():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(200, JSON, b"{}"))
    h.flush()
    result_of(d)
    last = body_json(result_of(h.request("GET", "/status.json")))["services"]["ai"]["last_60s"]
    assert last["requests_per_s"][-1] == 1 and sum(last["requests_per_s"]) == 1 and not any(last["open"])
