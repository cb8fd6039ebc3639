"""
The HTTP server side: a request that enforces the body size limit while
the body arrives, and a site that does not write Twisted's own access log
(the gateway writes its JSON one).
"""

from __future__ import annotations

from io import BytesIO

from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from txgateway.context import RequestContext

__all__ = ["GatewayRequest", "GatewaySite"]


class GatewayRequest(Request):
    """
    A request whose body is refused (dropped as it arrives, never spooled)
    once it exceeds the site's C{max_body_size}.

    @ivar body_too_large: set when the body was refused.
    @ivar context: the gateway's L{RequestContext}, set by the root resource.
    """

    # A proxy adds no Content-Type of its own to a backend's answer.
    defaultContentType = None
    body_too_large = False
    context: RequestContext | None = None
    _body_received = 0

    def _max_body_size(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_size", 10 * 1024 * 1024)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body_size():
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self._max_body_size():
            self.body_too_large = True
            self.content.close()
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


class GatewaySite(Site):
    """
    The gateway's L{Site}.

    @ivar max_body_size: the largest request body accepted, in bytes.
    """

    requestFactory = GatewayRequest
    noisy = False

    def __init__(self, resource: IResource, max_body_size: int, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.max_body_size = max_body_size

    def log(self, request: Request) -> None:
        """The gateway writes its own JSON access line per request."""
