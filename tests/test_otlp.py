"""
The OTLP encoding of spans: what the gateway writes decodes with the
official C{opentelemetry-proto} classes into exactly what the
OpenTelemetry SDK's own encoder writes for the same spans.
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from txgateway.observability.otlp import SpanEncoder, SpanRecord

RESOURCE = Resource({"service.name": "gw-under-test"})
SCOPE = InstrumentationScope("txgateway")


def sdk_span(record: SpanRecord) -> ReadableSpan:
    """The same span as the SDK holds it."""
    sampled = TraceFlags(TraceFlags.SAMPLED)
    state = TraceState.from_header([record.tracestate.decode()]) if record.tracestate else None
    context = SpanContext(int(record.trace_id, 16), int(record.span_id, 16), False, sampled, state)
    remote = record.kind == "server"
    parent = SpanContext(int(record.trace_id, 16), int(record.parent_id, 16), remote, sampled) if record.parent_id else None
    return ReadableSpan(
        name=record.name,
        context=context,
        parent=parent,
        resource=RESOURCE,
        attributes=record.attributes,
        events=[Event(name, attributes, round(at * 1e9)) for at, name, attributes in record.events],
        kind=SpanKind.SERVER if record.kind == "server" else SpanKind.CLIENT,
        status=Status(StatusCode.ERROR) if record.error else Status(StatusCode.UNSET),
        start_time=round(record.start * 1e9),
        end_time=round(record.end * 1e9),
        instrumentation_scope=SCOPE,
    )


RECORDS = [
    SpanRecord(
        "POST llm", "server", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "b7ad6b7169203331",
        1764770000.123456, 1764770000.623999,
        (
            ("http.request.method", "POST"), ("http.response.status_code", 200), ("gen_ai.request.stream", True),
            ("gen_ai.response.finish_reasons", ("stop", "length")), ("txgateway.service", "llm"),
            ("txgateway.note", "naïve ünïcode ✓"), ("big", 2**62), ("negative", -5), ("off", False),
        ),
        {"gen_ai.response.time_to_first_chunk": 0.125, "gen_ai.usage.output_tokens": 300_000, "ratio": -1.5e-9,
         "listed": ["a", "b"]},
        False,
        [(1764770000.2, "fallback", {"txgateway.gave_up": "primary", "txgateway.attempt": 2}), (1764770000.3, "commit_point", {}),
         (1764770000.4, "odd", {"delay": 0.5, "names": ["x"]})],
        b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    ),
    SpanRecord(
        "chat model-" + "x" * 200, "client", "4bf92f3577b34da6a3ce929d0e0e4736", "1111111111111111", "00f067aa0ba902b7",
        1764770000.2, 1764770000.25, (("server.address", "10.0.0.1"), ("server.port", 8001), ("error.type", "503")), {}, True,
    ),
    SpanRecord("GET", "server", "0af7651916cd43dd8448eb211c80319c", "2222222222222222", None, 1.0, 2.0, error=True),
]


def decoded(body: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(body)


def test_the_encoding_is_the_sdks():
    ours = decoded(SpanEncoder("gw-under-test").encode(RECORDS))
    theirs = decoded(encode_spans([sdk_span(record) for record in RECORDS]).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 3  # not two empty messages alike


def test_kept_encodings_give_the_same_bytes_and_are_forgotten_when_many():
    encoder = SpanEncoder("gw-under-test")
    first = encoder.encode(RECORDS)
    assert encoder.encode(RECORDS) == first  # the second time from what was kept
    many = [
        SpanRecord("GET", "server", "0af7651916cd43dd8448eb211c80319c", "2222222222222222", None, 1.0, 2.0, (("path", f"/{n}"),))
        for n in range(5000)
    ]
    spans = decoded(encoder.encode(many)).resource_spans[0].scope_spans[0].spans
    assert [span.attributes[0].value.string_value for span in spans] == [f"/{n}" for n in range(5000)]
    assert len(encoder._kept) <= 4096
    assert decoded(encoder.encode(RECORDS)) == decoded(first)
