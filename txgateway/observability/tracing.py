"""
W3C trace context (traceparent / tracestate): a valid incoming trace is
continued with the gateway's own span as the new parent; otherwise a new
trace starts.  When the request's spans are exported, each attempt is a
span of its own under the gateway's, and the backend is sent that span as
its parent; else every attempt carries the gateway's span.

L{SpanNotes} is what a sampled request's spans will say beyond its
context: its attempts, what happened on the way (fallbacks, resumes,
open circuits, the commit point), and when its first chunk came.
"""

from __future__ import annotations

import re

import attrs

from txgateway.ids import random_hex

__all__ = ["AttemptSpan", "SpanNotes", "TraceContext", "trace_context_for"]

# version-traceid-parentid-flags; a future version may append fields.
_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACESTATE_MAX = 512


@attrs.frozen
class TraceContext:
    """
    The trace a request belongs to and the gateway's span in it.

    @ivar continued: the client sent a valid C{traceparent}.
    """

    trace_id: str
    span_id: str
    flags: str
    tracestate: bytes | None = None
    continued: bool = False
    #: The client's span (the parent of the gateway's), when it sent one.
    parent_id: str | None = None

    @property
    def sampled(self) -> bool:
        """The trace's sampled flag: its spans are recorded and exported."""
        return bool(int(self.flags, 16) & 1)

    @property
    def traceparent(self) -> bytes:
        """The C{traceparent} header the backend gets."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}".encode("ascii")

    def headers(self, span_id: str | None = None) -> list[tuple[bytes, bytes]]:
        """
        C{traceparent} (naming C{span_id} as the parent, else the gateway's
        span), and C{tracestate} when the client sent one.
        """
        traceparent = self.traceparent if span_id is None else f"00-{self.trace_id}-{span_id}-{self.flags}".encode("ascii")
        headers = [(b"traceparent", traceparent)]
        if self.tracestate:
            headers.append((b"tracestate", self.tracestate))
        return headers


@attrs.define(eq=False)
class AttemptSpan:
    """
    One attempt's CLIENT span, as it is made (on the reactor thread; the
    export thread encodes it after the request ended).

    @ivar outcome: what the attempt came to (C{answered}, a failure's error
        type, C{abandoned}, C{stream_broke}); L{None} while it is relayed.
    @ivar retry_delay: the backoff that followed it, when another attempt did.
    """

    span_id: str
    number: int
    service: str
    url: str
    model: str | None
    started_at: float
    resume: bool = False
    #: The API the attempt's backend speaks (C{gen_ai.provider.name}).
    target_api: str = "openai"
    ended_at: float | None = None
    outcome: str | None = None
    status_code: int | None = None
    retry_delay: float | None = None

    def end(self, at: float, outcome: str, status_code: int | None = None) -> None:
        """The attempt is over at C{at} (the first end counts)."""
        if self.ended_at is None:
            self.ended_at = at
            self.outcome = outcome
            if status_code is not None:
                self.status_code = status_code


@attrs.define(eq=False)
class SpanNotes:
    """
    What a sampled, exported request's spans will say beyond its context.

    @ivar events: C{(time, name, attributes)} of the gateway's span.
    @ivar first_chunk_at: when the first token of a stream (or the first
        byte of any other answer) was let through to the client.
    """

    attempts: list[AttemptSpan] = attrs.Factory(list)
    events: list[tuple[float, str, dict]] = attrs.Factory(list)
    first_chunk_at: float | None = None

    def attempt(
        self, at: float, service: str, url: str, model: str | None, resume: bool = False, target_api: str = "openai"
    ) -> AttemptSpan:
        """A new attempt's span, started at C{at}."""
        span = AttemptSpan(_new_span_id(), len(self.attempts) + 1, service, url, model, at, resume, target_api)
        self.attempts.append(span)
        return span

    def event(self, at: float, name: str, **attributes: object) -> None:
        """Something that happened to the request at C{at}, as an event of the gateway's span."""
        self.events.append((at, name, attributes))

    def committed(self, at: float, span: AttemptSpan, waits_for: str) -> None:
        """C{span}'s answer passed its commit point at C{at}: it is the one the client gets."""
        if self.first_chunk_at is None:
            self.first_chunk_at = at
        self.event(at, "commit_point", **{"txgateway.attempt": span.number, "txgateway.waited_for": waits_for})

    def broke(self, at: float, reason: str) -> None:
        """The stream being relayed broke at C{at}: its attempt is over."""
        for span in reversed(self.attempts):
            if span.ended_at is None:
                span.end(at, "stream_broke")
                break
        self.event(at, "stream_broke", **{"txgateway.reason": reason})


def _new_span_id() -> str:
    span = random_hex(8)
    return span if span != "0" * 16 else _new_span_id()


def trace_context_for(traceparent: bytes | None, tracestate: bytes | None = None, sampled: bool = True) -> TraceContext:
    """
    The trace context of a request, from the client's headers if valid
    (their sampled flag honoured); a new trace is sampled as C{sampled} says.
    """
    if traceparent is not None:
        match = _TRACEPARENT.match(traceparent.strip())
        if match is not None:
            version, trace_id, parent_id, flags, rest = match.groups()
            valid = (
                version != b"ff"
                and (version != b"00" or rest is None)
                and trace_id != b"0" * 32
                and parent_id != b"0" * 16
            )
            if valid:
                state = tracestate.strip() if tracestate else None
                if state and (len(state) > _TRACESTATE_MAX or not state.isascii()):
                    state = None
                return TraceContext(trace_id.decode(), _new_span_id(), flags.decode(), state or None, True, parent_id.decode())
    fresh = random_hex(24)
    return TraceContext(fresh[:32], fresh[32:] if fresh[32:] != "0" * 16 else _new_span_id(), "01" if sampled else "00")
