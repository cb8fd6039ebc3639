"""
Which headers cross the gateway in each direction: the hop-by-hop ones
(RFC 9110 7.6.1, and any a C{Connection} header names) never do, and the
gateway writes the framing, the request id and C{X-Forwarded-*} itself.

The broker talks to an L{IUpstream} (L{txgateway.dataplane.client})
directly, not to twisted.web's C{Agent} through treq: a transparent proxy
must not have a cookie jar, a redirect follower or a decompressor between
the client and the backend; bytes pass through unchanged.
"""

from __future__ import annotations

from typing import Iterable

from txgateway.dataplane.client import UpstreamResponse
from txgateway.dataplane.server import IncomingRequest

__all__ = ["end_to_end", "is_event_stream", "request_headers_for_upstream", "response_headers_for_client"]

#: Hop-by-hop headers (RFC 9110 7.6.1) and those a proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Request headers the gateway writes itself for the backend.
_NOT_FORWARDED_TO_UPSTREAM = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-request-id",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-for",
    # The gateway answered 100-continue itself and sends the body whole.
    b"expect",
}
#: Response headers the gateway writes itself for the client.
_NOT_FORWARDED_TO_CLIENT = _HOP_BY_HOP | {b"content-length"}


def _connection_named(values: list[bytes]) -> frozenset[bytes]:
    """Header names listed in C{Connection}: hop-by-hop for this message."""
    named = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                named.add(token)
    return frozenset(named)


def end_to_end(headers: list[tuple[bytes, bytes]], excluded: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """C{headers} less the hop-by-hop ones, those named in C{Connection}, and C{excluded}."""
    connection = [value for name, value in headers if name.lower() == b"connection"]
    if connection:
        excluded = excluded | _connection_named(connection)
    return [(name, value) for name, value in headers if name.lower() not in excluded]


def request_headers_for_upstream(
    request: IncomingRequest,
    request_id: str,
    client_address: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
    withheld: Iterable[bytes] = (),
) -> list[tuple[bytes, bytes]]:
    """
    The headers a backend gets: the client's end-to-end headers (less the
    C{withheld} ones), the request id, the C{X-Forwarded-*} trio and the
    C{extra} ones (trace context).  The backend's own C{Host} and the
    C{Content-Length} are written by the upstream client.
    """
    extra = list(extra)
    excluded = _NOT_FORWARDED_TO_UPSTREAM
    if withheld or extra:
        excluded = excluded | {name.lower() for name in withheld} | {name.lower() for name, _ in extra}
    outgoing = end_to_end(request.headers, excluded)
    forwarded_for = request.header_values(b"x-forwarded-for")
    outgoing.append((b"X-Forwarded-For", b", ".join([*forwarded_for, client_address.encode("ascii")])))
    outgoing.append((b"X-Forwarded-Proto", b"https" if request.secure else b"http"))
    host = request.header(b"host")
    if host is not None:
        outgoing.append((b"X-Forwarded-Host", host))
    outgoing.append((b"X-Request-ID", request_id.encode("ascii")))
    outgoing.extend(extra)
    return outgoing


def response_headers_for_client(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """
    A backend's end-to-end answer headers; the framing ones
    (C{Content-Length}, C{Transfer-Encoding}) are the gateway's to write.
    """
    return end_to_end(response.headers, _NOT_FORWARDED_TO_CLIENT)


def is_event_stream(response: UpstreamResponse) -> bool:
    """The answer is a server-sent event stream (its C{Content-Type}, parameters aside)."""
    content_type = response.header(b"content-type") or b""
    return content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"
