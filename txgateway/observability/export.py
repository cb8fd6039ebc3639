"""
OpenTelemetry spans, exported over OTLP/HTTP (protobuf) by the
OpenTelemetry SDK's own exporter, without touching a request: the
reactor thread only appends a plain record of the request's span to a
bounded queue; a thread of the exporter's own turns the records into SDK
spans and sends them in batches.  A full queue or a collector that is
down or slow costs dropped spans (counted, and logged once each way),
never a slower or failed request.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

import attrs

from txgateway.observability.context import RequestContext

__all__ = ["SpanExport", "SpanRecord", "server_span"]

#: Spans waiting to leave at most; more are dropped (and counted).
MAX_QUEUE = 4096
#: Spans in one export.
BATCH = 512
#: Seconds between two exports while spans wait.
INTERVAL = 1.0


@attrs.define
class SpanRecord:
    """One span as plain data (made on the reactor thread, cheap): turned into an SDK span by the export thread."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: float
    end: float
    attributes: dict
    error: bool = False
    events: list = attrs.Factory(list)


def server_span(ctx: RequestContext, method: str, path: str, status: int, end: float) -> SpanRecord:
    """The SERVER span of one request, from what its context knows at its end."""
    trace = ctx.trace
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "http.response.status_code": status,
        "client.address": ctx.client,
        "txgateway.request_id": ctx.request_id,
        "txgateway.attempts": ctx.attempts,
    }
    if ctx.service is not None:
        attributes["txgateway.service"] = ctx.service
    if ctx.served_by is not None and ctx.served_by != ctx.service:
        attributes["txgateway.served_by"] = ctx.served_by
    if ctx.cache is not None:
        attributes["txgateway.cache"] = ctx.cache
    if status >= 400 and ctx.outcome:
        attributes["error.type"] = ctx.outcome
    facts = ctx.completion
    if facts is not None:
        attributes["gen_ai.operation.name"] = facts.operation or "other"
        if facts.requested_model is not None:
            attributes["gen_ai.request.model"] = facts.requested_model
        if facts.model is not None:
            attributes["gen_ai.response.model"] = facts.model
        if facts.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = facts.max_tokens
        if facts.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = facts.prompt_tokens
        if facts.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = facts.completion_tokens
    events = [(ctx.started_at, "fallback", {"txgateway.gave_up": gave_up}) for gave_up in ctx.fallback_from]
    name = f"{method} {ctx.service}" if ctx.service is not None else method
    return SpanRecord(
        name, "server", trace.trace_id, trace.span_id, trace.parent_id, ctx.started_at, end, attributes, status >= 500, events,
    )


class SpanExport:
    """
    The bounded queue of spans and the thread that exports them.

    @param exporter: an OpenTelemetry C{SpanExporter} (the OTLP/HTTP one in production).
    @param service_name: the C{service.name} of the spans' resource.
    @param call_in_reactor: runs a function on the reactor thread (for the log lines).
    @param log: where the export's failures and recoveries are said, once each way.
    """

    def __init__(
        self, exporter: Any, service_name: str, call_in_reactor: Callable[..., Any], log: Any,
        max_queue: int = MAX_QUEUE, interval: float = INTERVAL,
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._exporter = exporter
        self._resource = Resource.create({"service.name": service_name})
        self._scope = InstrumentationScope("txgateway")
        self._call_in_reactor = call_in_reactor
        self._log = log
        self._max_queue = max_queue
        self._interval = interval
        self._queue: deque[SpanRecord] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        #: Spans that never left: the queue was full, or the collector did not take them.
        self.dropped = 0
        self.exported = 0
        self._thread = threading.Thread(target=self._run, name="txgateway-spans", daemon=True)

    def start(self) -> None:
        """Start the export thread."""
        self._thread.start()

    def add(self, record: SpanRecord) -> None:
        """Queue one span (reactor thread); dropped and counted when the queue is full."""
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            if not self._failing:
                self._failing = True
                self._log.warning("spans_dropped", reason="the export queue is full", queue=self._max_queue)
            return
        self._queue.append(record)
        if len(self._queue) >= BATCH:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._export(batch)
            if self._stopping:
                return

    def _export(self, batch: list[SpanRecord]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._exporter.export([self._span(record) for record in batch])
        except Exception as error:  # an exporter must not end the thread
            result = error
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
            if self._failing:
                self._failing = False
                self._call_in_reactor(self._log.warning, "spans_export_recovered")
            return
        self.dropped += len(batch)
        if not self._failing:
            self._failing = True
            self._call_in_reactor(self._log.warning, "spans_export_failed", reason=str(result), dropped=len(batch))

    def _span(self, record: SpanRecord) -> Any:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        sampled = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(int(record.trace_id, 16), int(record.span_id, 16), False, sampled)
        parent = SpanContext(int(record.trace_id, 16), int(record.parent_id, 16), True, sampled) if record.parent_id else None
        return ReadableSpan(
            name=record.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=record.attributes,
            events=[Event(name, attributes, int(at * 1e9)) for at, name, attributes in record.events],
            kind=SpanKind.SERVER if record.kind == "server" else SpanKind.CLIENT,
            status=Status(StatusCode.ERROR) if record.error else Status(StatusCode.UNSET),
            start_time=int(record.start * 1e9),
            end_time=int(record.end * 1e9),
            instrumentation_scope=self._scope,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Export what waits (for C{timeout} seconds at most), then stop the thread and the exporter."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._exporter.shutdown()
