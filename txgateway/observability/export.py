"""
OpenTelemetry spans, exported over OTLP/HTTP (protobuf) without touching
a request: the reactor thread only appends the ended request to a
bounded queue; a thread of the export's own makes its spans (the
gateway's SERVER span, a CLIENT span per attempt), encodes them in
batches (L{txgateway.observability.otlp}) and POSTs them to the
collector.  A full queue or a collector that is down or slow costs
dropped spans (counted, and logged once each way), never a slower or
failed request.
"""

from __future__ import annotations

import functools
import http.client
import threading
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs

from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.observability.otlp import SpanEncoder, SpanRecord
from txgateway.observability.tracing import AttemptSpan

__all__ = ["OTLPHttpPost", "SpanExport", "SpanRecord", "request_spans", "server_span"]

#: Requests whose spans wait to leave at most; more are dropped (and counted).
MAX_QUEUE = 4096
#: Requests in one export (each one span, and one more per attempt).
BATCH = 256
#: Seconds between two exports while spans wait.
INTERVAL = 1.0
#: Requests whose spans are made and encoded between two yields of the interpreter
#: (the reactor thread waits for the export thread at most that long).
_SLICE = 16


def request_spans(ctx: RequestContext, method: str, path: str, status: int, end: float) -> list[SpanRecord]:
    """
    The spans of one request, from what its context knows at its end: the
    gateway's SERVER span, then a CLIENT span per attempt under it.
    """
    notes = ctx.span_notes
    server = server_span(ctx, method, path, status, end)
    if notes is None:
        return [server]
    return [server, *(_attempt_span(ctx, method, attempt, end) for attempt in notes.attempts)]


def server_span(ctx: RequestContext, method: str, path: str, status: int, end: float) -> SpanRecord:
    """The SERVER span of one request, from what its context knows at its end."""
    trace = ctx.trace
    common: list[tuple[str, Any]] = [
        ("http.request.method", method),
        ("url.path", path),
        ("http.response.status_code", status),
        ("txgateway.attempts", ctx.attempts),
        ("client.address", ctx.client),
    ]
    if ctx.service is not None:
        common.append(("txgateway.service", ctx.service))
    if ctx.served_by is not None and ctx.served_by != ctx.service:
        common.append(("txgateway.served_by", ctx.served_by))
    if ctx.cache is not None:
        common.append(("txgateway.cache", ctx.cache))
    if status >= 400 and ctx.outcome:
        common.append(("error.type", ctx.outcome))
    if ctx.caller is not None:
        common.append(("txgateway.api_key_name", ctx.caller.name))
    own: dict[str, Any] = {"txgateway.request_id": ctx.request_id}
    notes = ctx.span_notes
    facts = ctx.completion
    if facts is not None:
        _add_gen_ai_attributes(facts, common, own)
        if notes is not None and notes.first_chunk_at is not None and facts.stream:
            own["gen_ai.response.time_to_first_chunk"] = round(notes.first_chunk_at - ctx.started_at, 6)
    events = notes.events if notes is not None else []
    name = f"{method} {ctx.service}" if ctx.service is not None else method
    return SpanRecord(
        name, "server", trace.trace_id, trace.span_id, trace.parent_id, ctx.started_at, end, tuple(common), own,
        status >= 500, events, trace.tracestate if trace.continued else None,
    )


def _add_gen_ai_attributes(facts: CompletionFacts, common: list[tuple[str, Any]], own: dict[str, Any]) -> None:
    """The GenAI semantic conventions' attributes of an OpenAI request (never its text)."""
    common.append(("gen_ai.operation.name", facts.operation or "other"))
    common.append(("gen_ai.provider.name", facts.target_api))
    common.append(("gen_ai.request.stream", facts.stream))
    if facts.requested_model is not None:
        common.append(("gen_ai.request.model", facts.requested_model))
    if facts.model is not None:
        common.append(("gen_ai.response.model", facts.model))
    if facts.max_tokens is not None:
        common.append(("gen_ai.request.max_tokens", facts.max_tokens))
    if facts.finish_reasons:
        common.append(("gen_ai.response.finish_reasons", facts.finish_reasons))
    if facts.end_user is not None:
        common.append(("enduser.id", facts.end_user))
    if facts.session is not None:
        common.append(("session.id", facts.session))
    if facts.prompt_tokens is not None:
        own["gen_ai.usage.input_tokens"] = facts.prompt_tokens
    if facts.completion_tokens is not None:
        own["gen_ai.usage.output_tokens"] = facts.completion_tokens
    if facts.response_id is not None:
        own["gen_ai.response.id"] = facts.response_id


def _attempt_span(ctx: RequestContext, method: str, attempt: AttemptSpan, end: float) -> SpanRecord:
    """The CLIENT span of one attempt, a child of the request's span (the parent its backend was sent)."""
    host, port = _server_address(attempt.url)
    outcome = attempt.outcome or ("client_disconnected" if ctx.client_gone else "answered")
    common: list[tuple[str, Any]] = [
        ("server.address", host),
        ("server.port", port),
        ("txgateway.service", attempt.service),
        ("txgateway.attempt", attempt.number),
        ("txgateway.outcome", outcome),
    ]
    if attempt.status_code is not None:
        common.append(("http.response.status_code", attempt.status_code))
    if attempt.resume:
        common.append(("txgateway.resume", True))
    facts = ctx.completion
    model = attempt.model or (facts.requested_model if facts is not None else None)
    if facts is not None:
        common.append(("gen_ai.operation.name", facts.operation or "other"))
        common.append(("gen_ai.provider.name", attempt.target_api))
        if model is not None:
            common.append(("gen_ai.request.model", model))
        name = f"{facts.operation or 'other'} {model}" if model is not None else facts.operation or "other"
    else:
        name = f"{method} {attempt.service}"
    failed = outcome not in ("answered", "client_disconnected") or (attempt.status_code or 0) >= 500
    if failed:
        common.append(("error.type", outcome if outcome != "answered" else str(attempt.status_code)))
    own = {"txgateway.retry_delay_s": round(attempt.retry_delay, 6)} if attempt.retry_delay is not None else {}
    trace = ctx.trace
    return SpanRecord(
        name, "client", trace.trace_id, attempt.span_id, trace.span_id, attempt.started_at,
        attempt.ended_at if attempt.ended_at is not None else end, tuple(common), own, failed,
    )


class OTLPHttpPost:
    """
    POSTs encoded spans to an OTLP/HTTP collector over one kept-alive
    connection (made again after a failure); used by the export thread only.

    @param endpoint: the traces URL (C{http://HOST:4318/v1/traces}; C{http://HOST:4318} means that).
    @param headers: sent with every export (an API key for a hosted backend).
    @param timeout: seconds an export may take.
    """

    def __init__(self, endpoint: str, headers: tuple[tuple[str, str], ...], timeout: float) -> None:
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        # A collector's base URL (nothing after the port) means its traces path, as OTLP's own defaults do.
        path = parts.path if parts.path not in ("", "/") else "/v1/traces"
        self._path = path + (f"?{parts.query}" if parts.query else "")
        self._headers = {**dict(headers), "Content-Type": "application/x-protobuf"}
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def __call__(self, body: bytes) -> str | None:
        """Send one export; L{None} when the collector took it, else why not."""
        try:
            if self._connection is None:
                kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._connection = kind(self._host, self._port, timeout=self._timeout)
            self._connection.request("POST", self._path, body, self._headers)
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            return f"{type(error).__name__}: {error}"
        if not 200 <= response.status < 300:
            if response.will_close:
                self.close()
            return f"the collector answered {response.status}"
        return None

    def close(self) -> None:
        """Close the connection (the next export makes a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@attrs.define(slots=True)
class _Ended:
    """A request whose spans are to be exported, as it ended (its spans are made on the export thread)."""

    ctx: RequestContext
    method: str
    path: str
    status: int
    end: float


class SpanExport:
    """
    The bounded queue of ended requests and the thread that exports their spans.

    @param post: sends one encoded export, returning L{None} or why it failed (an L{OTLPHttpPost}).
    @param service_name: the C{service.name} of the spans' resource.
    @param call_in_reactor: runs a function on the reactor thread (for the log lines).
    @param log: where the export's failures and recoveries are said, once each way.
    """

    def __init__(
        self, post: Callable[[bytes], str | None], service_name: str, call_in_reactor: Callable[..., Any], log: Any,
        max_queue: int = MAX_QUEUE, interval: float = INTERVAL,
    ) -> None:
        self._post = post
        self._encoder = SpanEncoder(service_name)
        self._call_in_reactor = call_in_reactor
        self._log = log
        self._max_queue = max_queue
        self._interval = interval
        self._queue: deque[_Ended] = deque()
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

    def add(self, ctx: RequestContext, method: str, path: str, status: int, end: float) -> None:
        """
        Queue the spans of a request that ended (reactor thread); dropped and
        counted when the queue is full.
        """
        if len(self._queue) >= self._max_queue:
            self.dropped += _span_count(ctx)
            if not self._failing:
                self._failing = True
                self._log.warning("spans_dropped", reason="the export queue is full", queue=self._max_queue)
            return
        self._queue.append(_Ended(ctx, method, path, status, end))
        if len(self._queue) >= BATCH:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._export(batch)
                if len(self._queue) < BATCH and not self._stopping:
                    break  # the rest waits for a whole batch or the interval: few, large exports
            if self._stopping and not self._queue:
                return

    def _export(self, batch: list[_Ended]) -> None:
        parts, count = [], 0
        try:
            for start in range(0, len(batch), _SLICE):
                records = [
                    record
                    for ended in batch[start:start + _SLICE]
                    for record in request_spans(ended.ctx, ended.method, ended.path, ended.status, ended.end)
                ]
                count += len(records)
                parts.append(self._encoder.spans(records))
                time.sleep(0)  # let the reactor thread have the interpreter between slices
            failed = self._post(self._encoder.request(parts))
        except Exception as error:  # nothing may end the thread
            count = count or len(batch)
            failed = f"{type(error).__name__}: {error}"
        if failed is None:
            self.exported += count
            if self._failing:
                self._failing = False
                self._call_in_reactor(self._log.warning, "spans_export_recovered")
            return
        self.dropped += count
        if not self._failing:
            self._failing = True
            self._call_in_reactor(self._log.warning, "spans_export_failed", reason=failed, dropped=count)

    def stop(self, timeout: float = 5.0) -> None:
        """Export what waits (for C{timeout} seconds at most), then stop the thread and close the connection."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        close = getattr(self._post, "close", None)
        if close is not None:
            close()


def _span_count(ctx: RequestContext) -> int:
    return 1 + (len(ctx.span_notes.attempts) if ctx.span_notes is not None else 0)


@functools.lru_cache(maxsize=256)
def _server_address(url: str) -> tuple[str, int]:
    address = urlsplit(url)
    return address.hostname or "", address.port or (443 if address.scheme == "https" else 80)
