"""
What a sampled request's spans say, from the whole gateway in memory
driven by a Clock: an attempt span per attempt whose id is the parent the
backend was sent, the backoff that followed each, a fallback and an open
circuit as events; and an unsampled request that records nothing.
"""

from __future__ import annotations

from tests.fakes import SERVICE_INI, FakeResponse, Harness, result_of
from txgateway.observability.export import request_spans

TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


class Spans:
    """Stands in for the export: makes the spans of every request the gateway adds, as its thread would."""

    dropped = 0

    def __init__(self) -> None:
        self.records: list = []

    def add(self, ctx, method, path, status, end) -> None:
        self.records.extend(request_spans(ctx, method, path, status, end))


def traced(ini: str) -> tuple[Harness, Spans]:
    spans = Spans()
    return Harness(ini, spans=spans), spans


def sent_parent(request) -> str:
    [traceparent] = request.headers.getRawHeaders(b"traceparent")
    version, trace_id, parent, flags = traceparent.decode().split("-")
    assert (version, trace_id, flags) == ("00", "a" * 32, "01")
    return parent


def test_each_attempt_is_a_span_whose_id_the_backend_was_sent_with_the_backoff_that_followed():
    h, spans = traced(SERVICE_INI)
    d = h.request("GET", "/api/data/x", headers={"traceparent": TRACEPARENT})
    h.agents["data"].last.respond(FakeResponse(503, {}, b"busy"))
    h.advance(1)  # the first backoff: 1 s
    h.agents["data"].last.refuse()
    h.advance(2)
    h.agents["data"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200
    server, *attempts = spans.records
    assert server.kind == "server" and server.parent_id == "b" * 16
    assert [sent_parent(sent) for sent in h.agents["data"].requests] == [span.span_id for span in attempts]
    assert {span.parent_id for span in attempts} == {server.span_id} and server.span_id not in [a.span_id for a in attempts]
    assert [(span.start, span.end) for span in attempts] == [(0, 0), (1, 1), (3, 3)]
    assert [span.attributes.get("txgateway.retry_delay_s") for span in attempts] == [1.0, 2.0, None]
    assert [span.attributes["txgateway.outcome"] for span in attempts] == ["answered", "upstream_unavailable", "answered"]
    assert [span.attributes.get("http.response.status_code") for span in attempts] == [503, None, 200]
    assert [span.error for span in attempts] == [True, True, False]
    assert [name for _, name, _ in server.events] == ["commit_point"] and server.events[0][0] == 3


FALLBACK = SERVICE_INI + """retries = 0
breaker_threshold = 1
fallback = ai
"""


def test_a_fallback_and_an_open_circuit_are_events_of_the_request():
    h, spans = traced(FALLBACK)
    first = h.request("GET", "/api/data/x", headers={"traceparent": TRACEPARENT})
    h.agents["data"].last.refuse()
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ai"))
    h.flush()
    assert result_of(first).code == 200
    server, refused, answered = spans.records
    [(_, name, attributes), (_, committed, _)] = server.events
    assert (name, attributes["txgateway.gave_up"], attributes["txgateway.to"], committed) == ("fallback", "data", "ai", "commit_point")
    assert (refused.attributes["txgateway.service"], answered.attributes["txgateway.service"]) == ("data", "ai")
    assert (refused.attributes["server.address"], refused.attributes["server.port"]) == ("data.backend", 8001)
    spans.records.clear()
    second = h.request("GET", "/api/data/x")  # data's circuit is open: straight to ai
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ai"))
    h.flush()
    assert result_of(second).code == 200
    server, answered = spans.records
    assert [name for _, name, _ in server.events] == ["circuit_open", "fallback", "commit_point"]
    assert server.events[0][2] == {"txgateway.service": "data"}


def test_an_unsampled_request_records_no_span_and_sends_the_clients_flag_on():
    h, spans = traced(SERVICE_INI)
    d = h.request("GET", "/api/data/x", headers={"traceparent": TRACEPARENT[:-2] + "00"})
    h.agents["data"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200 and spans.records == []
    [traceparent] = h.agents["data"].last.headers.getRawHeaders(b"traceparent")
    assert traceparent.endswith(b"-00") and traceparent.split(b"-")[1] == b"a" * 32


def test_a_client_that_leaves_ends_its_attempt_as_abandoned():
    h, spans = traced(SERVICE_INI)
    d = h.request("GET", "/api/ai/x", headers={"traceparent": TRACEPARENT})
    h.advance(0.5)
    d.addErrback(lambda failure: None)  # the client's own cancellation
    d.cancel()
    h.flush()
    server, attempt = spans.records
    assert server.attributes["http.response.status_code"] == 499
    assert (attempt.attributes["txgateway.outcome"], attempt.end, attempt.error) == ("abandoned", 0.5, True)
