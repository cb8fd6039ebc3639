"""
The HTTP server side, hardened: a channel that answers malformed, oversized
and too-slow requests with the JSON error shape before any route sees them,
a request that refuses an oversized body while it arrives (it is never
spooled), and a site that leaves access logging to the gateway's JSON lines.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from txgateway import errors
from txgateway.context import RequestContext, request_id_for
from txgateway.errors import ErrorKind, error_body

__all__ = ["GatewayChannel", "GatewayRequest", "GatewaySite"]

_ABSOLUTE_FORM = (b"http://", b"https://")
#: After a refusal, how long to keep reading (and dropping) what the client
#: still sends: at most LINGER_TOTAL seconds, or until it is silent for
#: LINGER_IDLE seconds.
LINGER_TOTAL = 30.0
LINGER_IDLE = 2.0


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


class GatewayRequest(Request):
    """
    A request that refuses its body once it exceeds the site's
    C{max_body_size}, and routes an absolute-form target
    (C{GET http://host/path}) by its path alone: the host it names is never
    contacted.

    @ivar context: the gateway's L{RequestContext}, set by the root resource.
    """

    # A proxy adds no Content-Type of its own to a backend's answer.
    defaultContentType = None
    context: RequestContext | None = None
    _body_received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel.refused:
            return
        self._body_received += len(data)
        if self._body_received > channel.site.max_body_size:
            channel.refuse(
                errors.BODY_TOO_LARGE,
                f"the request body is larger than {channel.site.max_body_size} bytes",
                self,
            )
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self.path.startswith(_ABSOLUTE_FORM):
            # RFC 9112 3.2.2: accept the absolute form, route by the path.
            after_scheme = self.uri.split(b"://", 1)[1]
            slash = after_scheme.find(b"/")
            self.uri = after_scheme[slash:] if slash >= 0 else b"/"
            self.path = self.uri.split(b"?", 1)[0]
        super().process()


class GatewayChannel(HTTPChannel):
    """
    An HTTP/1.1 channel whose every refusal is the gateway's JSON error
    shape (Twisted's own is a bare C{400 Bad Request}), with a deadline for
    the request line and headers so that slow-header clients cannot hold a
    connection by trickling bytes.

    @ivar refused: set once the channel answered with an error and is
        closing; nothing more it receives is processed.
    """

    refused = False
    _header_timer: IDelayedCall | None = None
    _linger_ends: IDelayedCall | None = None
    _linger_idle: IDelayedCall | None = None
    _reading_headers = True

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            # Lingering after a refusal: drop it, and wait a while longer.
            if self._linger_idle is not None and self._linger_idle.active():
                self._linger_idle.reset(LINGER_IDLE)
            return
        super().dataReceived(data)
        # Headers that arrive whole in one read (nearly all) need no timer;
        # the deadline starts with the first read that leaves them partial.
        if self._reading_headers and self._header_timer is None and not self.refused and self._partial_request():
            self._header_timer = self.callLater(self.site.header_timeout, self._headers_too_slow)

    def _partial_request(self) -> bool:
        """Whether part of a request's line or headers is waiting for more bytes."""
        return bool(self._buffer) or self._receivedHeaderSize > 0

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        limit = self.site.max_body_size
        if self.length is not None and self.length > limit:
            # Refused before the body arrives: it is never read, let alone spooled.
            self.refuse(errors.BODY_TOO_LARGE, f"the request body is larger than {limit} bytes", self.requests[-1])
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        self._reading_headers = True

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(errors.HEADER_TOO_LARGE, "a request line or header is too long")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's hook for every malformed request (bad request line or
        # header, Content-Length with Transfer-Encoding, too many headers).
        self.refuse(errors.BAD_REQUEST, "the request is malformed (request line, headers or framing)")

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.refuse(
            errors.REQUEST_TIMEOUT, f"the request headers did not arrive within {self.site.header_timeout:g} s"
        )

    def _cancel_header_timer(self) -> None:
        _cancel(self._header_timer)
        self._header_timer = None

    def refuse(self, kind: ErrorKind, message: str, request: Request | None = None) -> None:
        """
        Answer with the JSON error shape straight on the wire and close: for
        refusals that happen before (or instead of) a route.
        """
        if self.refused:
            return
        self.refused = True
        self._cancel_header_timer()
        self.setTimeout(None)
        sent_id = request.requestHeaders.getRawHeaders(b"x-request-id", [None])[0] if request else None
        request_id = request_id_for(sent_id)
        body = error_body(kind, message, request_id)
        head = b"HTTP/1.1 %d %s\r\n" % (kind.status, RESPONSES.get(kind.status, b"Error"))
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        head += b"Connection: close\r\nX-Request-ID: %s\r\n\r\n" % request_id.encode("ascii")
        self.transport.write(head + body)
        self._linger()
        peer = self.transport.getPeer()
        self.site.event_log.info(
            "request_refused",
            request_id=request_id,
            status=kind.status,
            outcome=kind.type,
            reason=message,
            method=request.method.decode("ascii", "replace") if request is not None and request.method else None,
            client=getattr(peer, "host", None),
        )

    def _linger(self) -> None:
        """
        Close after a refusal the way clients can read it: send the answer and
        a FIN, then read and drop what the client still sends (the rest of
        its body) until it stops for L{LINGER_IDLE} seconds or
        L{LINGER_TOTAL} seconds pass.  Closing at once would reset the
        connection under a client still writing, and it would never see the
        answer.
        """
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
            return
        half_close()
        self._linger_ends = self.callLater(LINGER_TOTAL, self._end_linger)
        self._linger_idle = self.callLater(LINGER_IDLE, self._end_linger)

    def _end_linger(self) -> None:
        self._cancel_linger_timers()
        self.transport.loseConnection()

    def _cancel_linger_timers(self) -> None:
        _cancel(self._linger_ends)
        _cancel(self._linger_idle)
        self._linger_ends = self._linger_idle = None

    def connectionLost(self, reason: Any) -> None:
        self._cancel_header_timer()
        self._cancel_linger_timers()
        super().connectionLost(reason)


class GatewaySite(Site):
    """
    The gateway's L{Site}.

    @ivar max_body_size: the largest request body accepted, in bytes.
    @ivar header_timeout: seconds a client has to send its request line and
        headers once it started.
    @ivar event_log: the structlog logger for refusals made before any route.
    """

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    noisy = False

    def __init__(
        self,
        resource: IResource,
        max_body_size: int,
        header_timeout: float,
        idle_timeout: float,
        log: Any,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.max_body_size = max_body_size
        self.header_timeout = header_timeout
        self.event_log = log

    def log(self, request: Request) -> None:  # type: ignore[override]
        """The gateway writes its own JSON access line per request."""
