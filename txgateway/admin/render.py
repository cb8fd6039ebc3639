"""
Klein, served straight into the data plane's answer.

An admin request (probes, C{/metrics}, C{/status}) arrives whole from the
data plane as an L{IncomingRequest}.  L{ResourceRenderer} makes a
twisted.web request of it (method, target, headers and body, set as
values: nothing is serialised), lets the Klein resource render it, and
hands what that request writes (status, headers, body) to the
L{IncomingRequest}, which frames it for the client.  No HTTP bytes are
written and parsed back in between.

The request's L{RequestContext} is a component of the twisted.web request:
routes read it with C{IRequestContext(request)}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from txgateway.dataplane.server import IncomingRequest
from txgateway.observability.context import IRequestContext, RequestContext

__all__ = ["ResourceRenderer"]

#: Answer headers the data plane writes itself (framing, Date from the
#: injected clock) or not at all (Server: the gateway names no software).
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"server", b"date"})
#: The gateway's listener, as the twisted.web request sees it (nothing reads it but URL building).
_LISTENER = IPv4Address("TCP", "127.0.0.1", 0)


class _AdminRequest(Request):
    """A twisted.web request whose routes set their own Content-Type."""

    defaultContentType = None


class _AnswerChannel:
    """
    The channel a twisted.web request writes its answer to: it passes the
    status, headers and body to the data plane's L{IncomingRequest}.
    """

    factory = None  # nobody to log to: the front writes the access line
    transport = None

    def __init__(self, site: Site, answer: IncomingRequest) -> None:
        self.site = site
        self.answer = answer
        self.request: Request | None = None

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", self.answer.client_host, 0)

    def getHost(self) -> IPv4Address:
        return _LISTENER

    def isSecure(self) -> bool:
        return self.answer.secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        length = None
        relayed = []
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower == b"content-length":
                length = int(values[0])
            elif lower not in _FRAMING:
                relayed.extend((name, value) for value in values)
        # The data plane frames the body; twisted.web must not chunk it too.
        self.request.chunked = 0
        self.answer.start(int(code), reason, relayed, length)

    def write(self, data: bytes) -> None:
        self.answer.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.answer.write(b"".join(data))

    def requestDone(self, request: Request) -> None:
        self.answer.finish()


class ResourceRenderer:
    """
    Renders a twisted.web resource (the admin routes' Klein resource) into
    data-plane answers.

    @param resource: the resource every admin request goes to.
    @param clock: the site's time source (it arms no timer for these requests).
    """

    def __init__(self, resource: Any, clock: IReactorTime) -> None:
        self._site = Site(resource, reactor=clock)
        self._site.timeOut = None

    def serve(self, answer: IncomingRequest, context: RequestContext) -> None:
        """Answer C{answer} from the resource; C{context} is the request's, for the routes."""
        channel = _AnswerChannel(self._site, answer)
        request = channel.request = _AdminRequest(channel)
        request.setComponent(IRequestContext, context)
        for name, value in answer.headers:
            request.requestHeaders.addRawHeader(name, value)
        request.content = BytesIO(answer.body)
        target = answer.path + (b"?" + answer.query if answer.query else b"")
        # HTTP/1.1 or 1.0 as the client spoke: the data plane decides the framing.
        request.requestReceived(answer.method, target, b"HTTP/1.0" if answer.http10 else b"HTTP/1.1")
