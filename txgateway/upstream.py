"""
The wire toward a backend: which headers cross the gateway in each
direction, the request body producer, and the relay that streams a
backend's answer to the client as it arrives.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IRequest, IResponse
from zope.interface import implementer

__all__ = [
    "pooled_agent",
    "BytesProducer",
    "BodyRelay",
    "StreamIdle",
    "StreamBroken",
    "request_headers_for_upstream",
    "copy_response_headers",
    "discard_body",
]

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
}
#: Response headers the gateway writes itself for the client.
_NOT_FORWARDED_TO_CLIENT = _HOP_BY_HOP | {b"content-length"}


@implementer(IAgentEndpointFactory)
class _ReusedEndpoints:
    """
    One endpoint per backend address, made once: Agent's own factory builds
    (and IDNA-encodes) a new endpoint for every request, pooled or not.
    """

    def __init__(self, reactor, tls_policy) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            self._endpoints[key] = endpoint
        return endpoint


def pooled_agent(reactor, pool: HTTPConnectionPool) -> IAgent:
    """
    The agent a service's requests go through: keep-alive connections from
    C{pool}, certificates checked like a browser would for https backends,
    no cookies, no redirects, no decompression: bytes pass through.
    """
    return Agent.usingEndpointFactory(reactor, _ReusedEndpoints(reactor, BrowserLikePolicyForHTTPS()), pool=pool)


class StreamIdle(Exception):
    """The backend's body went silent for longer than C{idle_timeout}."""


class StreamBroken(Exception):
    """The backend's body ended before it was complete."""


def _connection_named(headers: Headers) -> frozenset[bytes]:
    """Header names listed in C{Connection}: hop-by-hop for this message."""
    named = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                named.add(token)
    return frozenset(named)


def _end_to_end(headers: Headers, excluded: frozenset[bytes]) -> Iterable[tuple[bytes, list[bytes]]]:
    excluded = excluded | _connection_named(headers)
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in excluded:
            yield name, values


def request_headers_for_upstream(
    request: IRequest,
    request_id: str,
    client_address: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
    withheld: Iterable[bytes] = (),
) -> Headers:
    """
    The headers a backend gets: the client's end-to-end headers (less the
    C{withheld} ones), the request id, the C{X-Forwarded-*} trio and the
    C{extra} ones (trace context).  The backend's own C{Host} comes from its
    URL (the agent writes it).
    """
    incoming = request.requestHeaders
    outgoing = Headers()
    extra = list(extra)
    excluded = _NOT_FORWARDED_TO_UPSTREAM | {name.lower() for name in withheld}
    excluded |= {name.lower() for name, _ in extra}
    for name, values in _end_to_end(incoming, excluded):
        if name.lower() == b"x-forwarded-for":
            continue
        outgoing.setRawHeaders(name, values)
    forwarded_for = incoming.getRawHeaders(b"x-forwarded-for", [])
    outgoing.setRawHeaders(
        b"x-forwarded-for", [b", ".join([*forwarded_for, client_address.encode("ascii")])]
    )
    outgoing.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    host = incoming.getRawHeaders(b"host", [None])[0]
    if host is not None:
        outgoing.setRawHeaders(b"x-forwarded-host", [host])
    outgoing.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
    for name, value in extra:
        outgoing.setRawHeaders(name, [value])
    return outgoing


def copy_response_headers(response: IResponse, request: IRequest) -> None:
    """
    Put a backend's status and end-to-end headers on the client response.
    Twisted's client moves C{Content-Length} into C{response.length}; it is
    set again here, or every answer would go out chunked.
    """
    request.setResponseCode(response.code, response.phrase or None)
    for name, values in _end_to_end(response.headers, _NOT_FORWARDED_TO_CLIENT):
        request.responseHeaders.setRawHeaders(name, values)
    if isinstance(response.length, int) and response.code not in NO_BODY_CODES:
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory (bounded by C{max_body_size}), written
    at once, so that every attempt can replay it.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._body:
            consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    def makeConnection(self, transport) -> None:  # type: ignore[override]
        # Closing the connection is cheaper than reading an error body of
        # unknown size that nobody will see.
        transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


def discard_body(response: IResponse) -> None:
    """Drop a response that will not be relayed, closing its connection."""
    response.deliverBody(_Discard())


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """
    Streams a backend's body to the client chunk by chunk, registered as the
    client's push producer (a slow client pauses the backend read), with an
    idle timer between chunks that stands still while the client is the
    slow one.

    C{done} fires with L{None} when the body is complete, or fails with
    L{StreamIdle} or L{StreamBroken} (the backend's doing) or
    L{CancelledError} (the client went away); cancelling it stops the
    backend transport.
    """

    def __init__(self, request: IRequest, clock: IReactorTime, idle_timeout: float) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle_call: IDelayedCall | None = None
        self._watching = False
        self._idled = False
        self._client_left = False
        self.bytes_relayed = 0
        self.done: Deferred[None] = Deferred(self._cancel)

    def watch_idle(self) -> None:
        """
        Become the client's producer and start the idle timer, unless the
        body is already complete: a small answer usually arrives with its
        headers and needs neither.
        """
        if not self.done.called:
            self._watching = True
            self._request.registerProducer(self, True)
            self._arm_idle_timer()

    # IPushProducer, toward the client: pass flow control to the backend.

    def pauseProducing(self) -> None:
        self._disarm_idle_timer()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()
        if self._watching:
            self._arm_idle_timer()

    def stopProducing(self) -> None:
        # Only the client side calls this: its connection is gone.
        self._client_left = True
        self._disarm_idle_timer()
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.bytes_relayed += len(data)
        self._request.write(data)
        if self._watching:
            self._arm_idle_timer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarm_idle_timer()
        if self._watching:
            self._request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        elif self._client_left:
            # Not the backend's fault: the client went away mid-answer.
            self.done.errback(CancelledError())
        elif self._idled:
            self.done.errback(StreamIdle(f"no data for {self._idle_timeout:g} s"))
        else:
            self.done.errback(StreamBroken(reason.getErrorMessage()))

    def _arm_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._went_idle)

    def _disarm_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _went_idle(self) -> None:
        self._idle_call = None
        self._idled = True
        self.transport.stopProducing()

    def _cancel(self, done: Deferred[None]) -> None:
        self._disarm_idle_timer()
        if self.transport is not None:
            self.transport.stopProducing()
