"""
W3C trace context (traceparent / tracestate): a valid incoming trace is
continued with the gateway's own span as the new parent; otherwise a new
trace starts.  Every attempt carries the same trace context.
"""

from __future__ import annotations

import re

import attrs

from txgateway.ids import random_hex

__all__ = ["TraceContext", "trace_context_for"]

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

    def headers(self) -> list[tuple[bytes, bytes]]:
        """C{traceparent}, and C{tracestate} when the client sent one."""
        headers = [(b"traceparent", self.traceparent)]
        if self.tracestate:
            headers.append((b"tracestate", self.tracestate))
        return headers


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
