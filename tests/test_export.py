"""
Spans on their way out: the SERVER span a request's context makes, the
bounded queue that drops (and counts) rather than waits, and the export
thread handing SDK spans to an exporter.
"""

from __future__ import annotations

import threading

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.observability.export import OTLPHttpPost, SpanExport, request_spans, server_span
from txgateway.observability.tracing import SpanNotes, trace_context_for


class RecordingCollector:
    """Stands in for the OTLP/HTTP POST: decodes what it is sent."""

    def __init__(self, failure: str | None = None) -> None:
        self.failure = failure
        self.exports: list[ExportTraceServiceRequest] = []
        self.exported = threading.Event()
        self.closed = False

    def __call__(self, body: bytes) -> str | None:
        self.exports.append(ExportTraceServiceRequest.FromString(body))
        self.exported.set()
        return self.failure

    def close(self) -> None:
        self.closed = True


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
                                     operation="chat", max_tokens=100, stream=True, response_id="chatcmpl-7",
                                     finish_reasons=("stop",))
    ctx.attempts = 2
    ctx.span_notes = notes = SpanNotes()
    notes.event(100.05, "fallback", **{"txgateway.gave_up": "primary"})
    notes.committed(100.125, notes.attempt(100.1, "llm", "http://127.0.0.1:9/v1", "gpt-4o"), "first token")
    span = server_span(ctx, "POST", "/v1/chat/completions", 200, 100.25)
    assert (span.kind, span.trace_id, span.parent_id, span.span_id) == ("server", "a" * 32, "b" * 16, ctx.trace.span_id)
    assert span.attributes == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "http.response.status_code": 200,
        "client.address": "10.0.0.9", "txgateway.request_id": "req-1", "txgateway.attempts": 2, "txgateway.service": "llm",
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.stream": True,
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024",
        "gen_ai.request.max_tokens": 100, "gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.id": "chatcmpl-7", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.response.time_to_first_chunk": 0.125,
    }
    assert [(at, name) for at, name, _ in span.events] == [(100.05, "fallback"), (100.125, "commit_point")]
    assert not span.error


def test_the_server_span_says_who_the_call_is_for():
    ctx = context()
    ctx.completion = CompletionFacts(requested_model="m", operation="chat", end_user="dev-1", session="sess-9")
    span = server_span(ctx, "POST", "/v1/messages", 200, 100.25)
    assert (span.attributes["enduser.id"], span.attributes["session.id"]) == ("dev-1", "sess-9")
    ctx.completion = CompletionFacts(requested_model="m", operation="chat")
    assert "enduser.id" not in server_span(ctx, "POST", "/v1/messages", 200, 100.25).attributes


def test_each_attempt_is_a_client_span_under_the_request_with_its_outcome():
    ctx = context()
    ctx.completion = CompletionFacts(requested_model="m", operation="chat")
    ctx.span_notes = notes = SpanNotes()
    first = notes.attempt(100.0, "llm", "http://10.1.1.1:8001/v1", "m-large")
    first.end(100.5, "answered", 503)
    first.retry_delay = 0.2
    second = notes.attempt(100.7, "llm", "https://api.example/v1", "m-large")
    second.end(100.9, "upstream_timeout")
    third = notes.attempt(101.0, "backup", "http://10.1.1.2/", None)
    notes.committed(101.1, third, "first byte")
    third.status_code = 200
    server, *attempts = request_spans(ctx, "POST", "/v1/chat/completions", 200, 102.0)
    assert [span.parent_id for span in attempts] == [server.span_id] * 3
    assert len({server.span_id, *(span.span_id for span in attempts)}) == 4
    assert [span.span_id for span in attempts] == [first.span_id, second.span_id, third.span_id]
    assert [(span.kind, span.name, span.start, span.end, span.error) for span in attempts] == [
        ("client", "chat m-large", 100.0, 100.5, True),
        ("client", "chat m-large", 100.7, 100.9, True),
        ("client", "chat m", 101.0, 102.0, False),  # the committed one ends with its answer
    ]
    one, two, three = (span.attributes for span in attempts)
    assert (one["server.address"], one["server.port"], one["txgateway.attempt"], one["http.response.status_code"]) == (
        "10.1.1.1", 8001, 1, 503,
    )
    assert (one["txgateway.retry_delay_s"], one["error.type"], one["gen_ai.request.model"]) == (0.2, "503", "m-large")
    assert (two["server.address"], two["server.port"], two["txgateway.outcome"], two["error.type"]) == (
        "api.example", 443, "upstream_timeout", "upstream_timeout",
    )
    assert (three["server.port"], three["txgateway.outcome"], three["txgateway.service"]) == (80, "answered", "backup")
    assert "error.type" not in three and "txgateway.retry_delay_s" not in two


def test_a_broken_stream_ends_its_attempt_and_the_resume_is_a_new_one():
    ctx = context()
    ctx.span_notes = notes = SpanNotes()
    first = notes.attempt(100.0, "llm", "http://127.0.0.1:1/", None)
    notes.committed(100.1, first, "first token")
    notes.broke(100.4, "the connection was lost")
    resumed = notes.attempt(100.5, "llm", "http://127.0.0.1:1/", None, resume=True)
    notes.committed(100.6, resumed, "first token")
    assert notes.first_chunk_at == 100.1
    _, one, two = request_spans(ctx, "GET", "/api/llm/x", 200, 101.0)
    assert (one.end, one.attributes["txgateway.outcome"], one.error) == (100.4, "stream_broke", True)
    assert (one.name, two.end, two.attributes["txgateway.resume"], two.error) == ("GET llm", 101.0, True, False)


def test_the_backend_is_sent_the_attempts_span_as_its_parent():
    trace = trace_context_for(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", b"k=v")
    assert trace.headers() == [(b"traceparent", trace.traceparent), (b"tracestate", b"k=v")]
    assert trace.headers("c" * 16) == [(b"traceparent", b"00-" + b"a" * 32 + b"-" + b"c" * 16 + b"-01"), (b"tracestate", b"k=v")]


def test_a_refused_request_says_its_error_type():
    ctx = context()
    ctx.outcome = "budget_exceeded"
    span = server_span(ctx, "POST", "/v1/chat/completions", 429, 100.1)
    assert span.attributes["error.type"] == "budget_exceeded" and span.parent_id is None and not span.error


def test_spans_leave_in_batches_from_the_export_thread():
    collector = RecordingCollector()
    export = SpanExport(collector, "gw-test", lambda f, *a, **k: f(*a, **k), Log(), interval=0.01)
    export.start()
    ctx = context(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")
    ctx.span_notes = SpanNotes()
    ctx.span_notes.attempt(100.5, "llm", "http://127.0.0.1:1/", None).end(100.75, "answered", 502)
    export.add(ctx, "GET", "/api/llm/x", 502, 101.0)
    assert collector.exported.wait(5)
    export.stop()
    [request] = collector.exports
    [resource] = request.resource_spans
    assert resource.resource.attributes[0].key == "service.name"
    assert resource.resource.attributes[0].value.string_value == "gw-test"
    [scope] = resource.scope_spans
    span, attempt = scope.spans
    assert scope.scope.name == "txgateway" and span.name == "GET llm"
    assert attempt.kind == Span.SPAN_KIND_CLIENT and attempt.parent_span_id == span.span_id
    assert (attempt.start_time_unix_nano, attempt.end_time_unix_nano) == (100_500_000_000, 100_750_000_000)
    assert span.kind == Span.SPAN_KIND_SERVER and span.trace_id.hex() == "a" * 32 and span.parent_span_id.hex() == "b" * 16
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (100_000_000_000, 101_000_000_000)
    assert span.status.code == Status.STATUS_CODE_ERROR and collector.closed and export.exported == 2


def test_a_full_queue_drops_and_counts_and_says_so_once():
    log = Log()
    export = SpanExport(RecordingCollector(), "gw", lambda f, *a, **k: f(*a, **k), log, max_queue=2)
    for _ in range(5):
        ctx = context()
        ctx.span_notes = SpanNotes()
        ctx.span_notes.attempt(100.0, "llm", "http://127.0.0.1:1/", None)
        export.add(ctx, "GET", "/api/llm/x", 200, 100.1)  # the thread never started
    assert export.dropped == 3 * 2 and log.lines == ["spans_dropped"]


def test_a_failing_collector_costs_dropped_spans_logged_once_each_way():
    collector = RecordingCollector("the collector answered 503")
    log = Log()
    export = SpanExport(collector, "gw", lambda f, *a, **k: f(*a, **k), log)
    ended = export._queue
    for _ in range(3):
        export.add(context(), "GET", "/x", 200, 100.1)
    export._export([ended.popleft(), ended.popleft()])
    export._export([ended.popleft()])
    collector.failure = None
    export.add(context(), "GET", "/x", 200, 100.1)
    export._export([ended.popleft()])
    assert export.dropped == 3 and export.exported == 1
    assert log.lines == ["spans_export_failed", "spans_export_recovered"]


def test_a_new_trace_is_sampled_as_told_and_a_clients_flag_wins():
    assert not trace_context_for(None, sampled=False).sampled
    assert trace_context_for(None).sampled
    assert trace_context_for(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", sampled=False).sampled
    assert not trace_context_for(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00", sampled=True).sampled


def test_the_post_sends_protobuf_to_the_traces_path_with_the_headers_and_says_why_it_failed():
    import http.server

    seen: list = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers["Content-Type"], self.headers["x-team"],
                         self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200 if len(seen) == 1 else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        post = OTLPHttpPost(f"http://127.0.0.1:{server.server_port}", (("x-team", "k"),), 2.0)
        assert post(b"\x0a\x00") is None
        assert post(b"\x0a\x00") == "the collector answered 503"
        post.close()
        assert seen == [("/v1/traces", "application/x-protobuf", "k", b"\x0a\x00")] * 2
    finally:
        server.shutdown()
        server.server_close()
    assert OTLPHttpPost(f"http://127.0.0.1:{server.server_port}/v1/traces", (), 0.5)(b"").startswith("ConnectionRefusedError")
