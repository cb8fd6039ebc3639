"""
Spans on their way out: the SERVER span a request's context makes, the
bounded queue that drops (and counts) rather than waits, and the export
thread handing SDK spans to an exporter.
"""

from __future__ import annotations

import threading

from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.observability.export import SpanExport, server_span
from txgateway.observability.tracing import trace_context_for


class RecordingExporter:
    def __init__(self, result=SpanExportResult.SUCCESS) -> None:
        self.result = result
        self.batches: list = []
        self.exported = threading.Event()
        self.shut = False

    def export(self, spans):
        self.batches.append(list(spans))
        self.exported.set()
        return self.result

    def shutdown(self) -> None:
        self.shut = True


class Log:
    def __init__(self) -> None:
        self.lines: list = []

    def warning(self, event, **fields):
        self.lines.append(event)


def context(traceparent: bytes | None = None) -> RequestContext:
    ctx = RequestContext("req-1", "10.0.0.9", 100.0, None, trace=trace_context_for(traceparent))
    ctx.service = "llm"
    return ctx


def test_the_server_span_carries_http_the_request_and_the_genai_conventions():
    ctx = context(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")
    ctx.completion = CompletionFacts(requested_model="gpt-4o", model="gpt-4o-2024", prompt_tokens=9, completion_tokens=3,
                                     operation="chat", max_tokens=100)
    ctx.attempts = 2
    ctx.fallback_from.append("primary")
    span = server_span(ctx, "POST", "/v1/chat/completions", 200, 100.25)
    assert (span.kind, span.trace_id, span.parent_id, span.span_id) == ("server", "a" * 32, "b" * 16, ctx.trace.span_id)
    assert span.attributes == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "http.response.status_code": 200,
        "client.address": "10.0.0.9", "txgateway.request_id": "req-1", "txgateway.attempts": 2, "txgateway.service": "llm",
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024",
        "gen_ai.request.max_tokens": 100, "gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 3,
    }
    assert [event[1] for event in span.events] == ["fallback"] and not span.error


def test_a_refused_request_says_its_error_type():
    ctx = context()
    ctx.outcome = "budget_exceeded"
    span = server_span(ctx, "POST", "/v1/chat/completions", 429, 100.1)
    assert span.attributes["error.type"] == "budget_exceeded" and span.parent_id is None and not span.error


def test_spans_leave_as_sdk_spans_from_the_export_thread():
    exporter = RecordingExporter()
    export = SpanExport(exporter, "gw-test", lambda f, *a, **k: f(*a, **k), Log(), interval=0.01)
    export.start()
    ctx = context(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")
    export.add(server_span(ctx, "GET", "/api/llm/x", 502, 101.0))
    assert exporter.exported.wait(5)
    export.stop()
    [[span]] = exporter.batches
    assert span.kind == SpanKind.SERVER and span.name == "GET llm"
    assert span.context.trace_id == int("a" * 32, 16) and span.parent.span_id == int("b" * 16, 16)
    assert span.resource.attributes["service.name"] == "gw-test"
    assert (span.start_time, span.end_time) == (100_000_000_000, 101_000_000_000)
    assert not span.status.is_ok and exporter.shut and export.exported == 1


def test_a_full_queue_drops_and_counts_and_says_so_once():
    log = Log()
    export = SpanExport(RecordingExporter(), "gw", lambda f, *a, **k: f(*a, **k), log, max_queue=2)
    for _ in range(5):
        export.add(server_span(context(), "GET", "/api/llm/x", 200, 100.1))  # the thread never started
    assert export.dropped == 3 and log.lines == ["spans_dropped"]


def test_a_failing_collector_costs_dropped_spans_logged_once_each_way():
    exporter = RecordingExporter(SpanExportResult.FAILURE)
    log = Log()
    export = SpanExport(exporter, "gw", lambda f, *a, **k: f(*a, **k), log)
    export._export([server_span(context(), "GET", "/x", 200, 100.1)] * 2)
    export._export([server_span(context(), "GET", "/x", 200, 100.1)])
    exporter.result = SpanExportResult.SUCCESS
    export._export([server_span(context(), "GET", "/x", 200, 100.1)])
    assert export.dropped == 3 and export.exported == 1
    assert log.lines == ["spans_export_failed", "spans_export_recovered"]


def test_a_new_trace_is_sampled_as_told_and_a_clients_flag_wins():
    assert not trace_context_for(None, sampled=False).sampled
    assert trace_context_for(None).sampled
    assert trace_context_for(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", sampled=False).sampled
    assert not trace_context_for(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00", sampled=True).sampled
