"""
The data plane's client side: HTTP/1.1 to one backend URL, answers
parsed by llhttp (C{httptools.HttpResponseParser}), over keep-alive
connections kept in a pool (L{UpstreamPool}: one per service endpoint).

The broker talks to an L{IUpstream} (L{UpstreamPool} here, a fake in
unit tests) and never to twisted.web's C{Agent}: a transparent proxy wants
no cookie jar, redirects or decompression, and the Agent's per-request
machinery cost more than the rest of the gateway together (see the README's
benchmark).

What llhttp does not do on its own is done here: an answer to HEAD has no
body whatever its headers say (the connection's parser is replaced after
one), a body delimited by the end of the connection is complete when the
connection ends, 1xx interim answers are skipped, and a pooled connection
that the backend closed just as it was reused is retried once on a fresh
connection when no byte of the answer had arrived.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import weakref
from typing import Any
from urllib.parse import urlsplit

import httptools
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IResolutionReceiver
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from zope.interface import Attribute, Interface, implementer

from txgateway.dataplane.eager import no_delay, writer_for
from txgateway.dataplane.flow import ReadingControl
from txgateway.dataplane.parsing import SharedCallbacks

__all__ = [
    "IBodyConsumer",
    "IUpstream",
    "UpstreamConnectionLost",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "out_of_files",
]

#: Methods whose request carries a body (an empty one is sent as Content-Length: 0).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Seconds before the next address of a name is tried while one is still connecting.
ATTEMPT_DELAY = 0.3
#: Seconds a resolved name is kept.
RESOLUTION_TTL = 30.0
#: Seconds a TCP connection attempt may take (Twisted's client endpoints' default).
CONNECT_TIMEOUT = 30


class UpstreamConnectionLost(ConnectError):
    """The backend's connection ended before its answer's headers were complete."""


class UpstreamProtocolError(ConnectError):
    """The backend's bytes are not an HTTP/1.1 answer."""


#: What a socket the process cannot open says: its own open files, or the system's, are all taken.
_NO_FILES = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_files(error: BaseException) -> bool:
    """
    Whether a connection failed because this process could not open a
    socket (C{EMFILE}, C{ENFILE}): the gateway's own shortage, no failure
    of the backend.  Twisted reports it as a L{ConnectError} holding the
    errno (C{osError}); an L{OSError} holds it as C{errno}.
    """
    number = error.osError if isinstance(error, ConnectError) else getattr(error, "errno", None)
    return number in _NO_FILES


class StreamEnded(Exception):
    """Why a body ended early: the connection was lost or the answer was malformed."""


class IBodyConsumer(Interface):
    """What an answer's body is delivered to (the gateway's relay)."""

    def body_started(control: "BodyControl") -> None:
        """The body begins; C{control} pauses, resumes or stops its delivery."""

    def body_received(data: bytes) -> None:
        """Some bytes of the body."""

    def body_ended(error: Exception | None) -> None:
        """The body is complete (L{None}) or broke (the reason)."""


class IUpstream(Interface):
    """One backend URL the broker sends requests to (a routing endpoint's connections)."""

    base_path = Attribute("The path of the backend's URL (C{b'/v1'}, or C{b''}): targets start with it.")
    url = Attribute("The backend's URL, as configured.")

    def request(method: bytes, target: bytes, headers: list, body: bytes) -> Deferred:
        """
        Send a request (C{target} is the path and query the backend sees;
        C{headers} are (name, value) pairs, without Host and Content-Length,
        which are written here); the Deferred fires with an
        L{UpstreamResponse} once its headers arrived.  Cancelling it drops
        the connection.
        """

    def close() -> Deferred:
        """Close the idle connections; requests in flight finish."""


class BodyControl:
    """Flow control of one answer's body, for its consumer."""

    __slots__ = ("_exchange",)

    def __init__(self, exchange: "_Exchange") -> None:
        self._exchange = exchange

    def pauseProducing(self) -> None:
        """Stop reading the backend until L{resumeProducing} (idempotent)."""
        connection = self._exchange.connection
        if connection is not None and connection.reading is not None:
            connection.reading.pause_reading()

    def resumeProducing(self) -> None:
        """Read the backend again (idempotent)."""
        connection = self._exchange.connection
        if connection is not None and connection.reading is not None:
            connection.reading.resume_reading()

    def stopProducing(self) -> None:
        """The body is not wanted any more: the connection is dropped."""
        self._exchange.stop()


class UpstreamResponse:
    """
    A backend's answer, once its headers arrived.

    @ivar code: the status.
    @ivar reason: the reason phrase as sent.
    @ivar headers: (name, value) pairs as sent.
    @ivar length: the body's length from C{Content-Length}, or L{None} when
        it is chunked or delimited by the end of the connection.
    """

    __slots__ = ("code", "reason", "headers", "length", "_exchange")

    def __init__(self, code: int, reason: bytes, headers: list, length: int | None, exchange: "_Exchange") -> None:
        self.code = code
        self.reason = reason
        self.headers = headers
        self.length = length
        self._exchange = exchange

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header C{name} (lower case), or L{None}."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def head_relayed(self) -> None:
        """
        The status and headers went on to the client: of the headers only
        C{Content-Type} is kept (how an answer cut short is ended depends on
        it), not the rest for as long as a stream lasts.
        """
        content_type = self.header(b"content-type")
        self.headers = [] if content_type is None else [(b"content-type", content_type)]

    def deliver_body(self, consumer: Any) -> None:
        """Deliver the body to an L{IBodyConsumer}, with what already arrived first."""
        self._exchange.deliver(consumer)

    def discard(self) -> None:
        """The body is not wanted: a short one is read and dropped, else the connection closes."""
        self._exchange.discard()


class _Exchange:
    """One request and its answer on one connection."""

    __slots__ = (
        "request_bytes",
        "idempotent",
        "head_only",
        "answered",
        "connection",
        "retried",
        "cancelled",
        "ended",
        "_consumer",
        "_early",
        "_early_end",
        "_discarding",
        "_pending_connect",
        "__weakref__",
    )

    def __init__(self, request_bytes: bytes, head_only: bool) -> None:
        self.request_bytes = request_bytes
        self.head_only = head_only
        # The canceller holds the exchange weakly: no reference cycle for the
        # garbage collector to find on every request.  Let go once it fired
        # (L{answer}, L{fail}): a stream's exchange lasts minutes.
        self.answered: Deferred | None = Deferred(functools.partial(_cancel_exchange, weakref.ref(self)))
        self.connection: _UpstreamConnection | None = None
        self.retried = False
        self.cancelled = False
        self.ended = False
        self._consumer: Any = None
        self._early: list[bytes] | None = None
        self._early_end: Any = False
        self._discarding = False
        self._pending_connect: Deferred | None = None

    # -- from the connection

    @property
    def unanswered(self) -> bool:
        """Nothing told whoever waits for the answer yet (neither its head, nor a failure, nor their cancel)."""
        return self.answered is not None and not self.answered.called

    def answer(self, response: Any) -> None:
        """The answer's head came: whoever waits gets it."""
        answered, self.answered = self.answered, None
        answered.callback(response)

    def fail(self, error: Any) -> None:
        """No answer: whoever waits gets C{error} (an exception, or a L{Failure})."""
        answered, self.answered = self.answered, None
        answered.errback(error)

    def body_data(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is not None:
            self._consumer.body_received(data)
        elif self._early is None:
            self._early = [data]
        else:
            self._early.append(data)

    def body_end(self, error: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.body_ended(error)
        elif not self._discarding:
            self._early_end = error if error is not None else None
            if self._early_end is None:
                self._early_end = True

    # -- from the response's reader

    def deliver(self, consumer: Any) -> None:
        self._consumer = consumer
        consumer.body_started(BodyControl(self))
        early, self._early = self._early, None
        for data in early or ():
            consumer.body_received(data)
        if self._early_end is not False:
            end, self._early_end = self._early_end, False
            self._consumer = None
            consumer.body_ended(None if end is True else end)

    def discard(self) -> None:
        self._discarding = True
        self._early = None
        connection = self.connection
        if not self.ended and connection is not None and not connection.feeding:
            # Nothing is being read now: waiting for the rest could take forever.
            self.stop()

    def stop(self) -> None:
        """The body is not wanted: the connection goes, unless the answer is complete."""
        if not self.ended and self.connection is not None:
            self.connection.abandon()

    def cancel(self, answered: Deferred) -> None:
        """The request's Deferred was cancelled (a timeout, or the client left)."""
        self.cancelled = True
        if self._pending_connect is not None:
            self._pending_connect.cancel()
        if self.connection is not None:
            self.connection.abandon()


def _cancel_exchange(exchange: "weakref.ref[_Exchange]", answered: Deferred) -> None:
    alive = exchange()
    if alive is not None:
        alive.cancel(answered)


class _ResponseParsing(SharedCallbacks):
    """
    What every backend connection's response parser calls
    (L{SharedCallbacks}: the connection is L{_UpstreamConnection}).  They
    record.
    """

    CALLBACKS = ("on_message_begin", "on_status", "on_header", "on_headers_complete", "on_body", "on_message_complete")
    connection: _UpstreamConnection

    def on_message_begin(self) -> None:
        connection = self.connection
        connection._headers = []
        connection._reason = b""
        connection._in_headers = True

    def on_status(self, reason: bytes) -> None:
        connection = self.connection
        connection._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        connection = self.connection
        if connection._in_headers:
            connection._headers.append((name, value))

    def on_headers_complete(self) -> None:
        connection = self.connection
        connection._in_headers = False
        code = connection._parser.get_status_code()
        if code < 200 and code != 101:
            connection._interim = True  # 100 Continue and the like: the answer follows
            return
        exchange = connection._exchange
        connection.keep_alive = connection._parser.should_keep_alive()
        length = None
        chunked = False
        for name, value in connection._headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = True
        bodiless = exchange.head_only or code in (204, 304)
        connection._framing_by_close = not bodiless and length is None and not chunked
        if code in (204, 304):
            length = 0
        response = UpstreamResponse(code, connection._reason, connection._headers, length, exchange)
        connection._headers = ()  # the answer's now: the connection holds them no longer (the next answer's begin makes a list)
        # Answered: nothing sends the request again, so its bytes (a prompt of
        # tens of KB) are not held for as long as a stream lasts.
        exchange.request_bytes = b""
        if bodiless and exchange.head_only:
            # llhttp cannot be told the answer was to HEAD: it would wait for
            # a body of Content-Length bytes.  The answer is complete now, and
            # the next exchange gets a new parser.
            connection._complete = True
            connection._fresh_parser_needed = True
        connection._response = response

    def on_body(self, data: bytes) -> None:
        connection = self.connection
        exchange = connection._exchange
        if exchange is None or connection._complete:
            connection.drop_after_exchange = True  # bytes past the end of the answer
            return
        exchange.body_data(data)

    def on_message_complete(self) -> None:
        connection = self.connection
        if connection._interim:
            connection._interim = False
            return
        connection._complete = True


_RESPONSE_PARSING = _ResponseParsing()


class _UpstreamConnection(Protocol):
    """One keep-alive connection to a backend; one exchange at a time."""

    def __init__(self, pool: "UpstreamPool", dialing: "_Dialing | None" = None) -> None:
        self._pool = pool
        #: The attempt told when the connection is made (L{None}: made through a TLS endpoint, which tells its own).
        self._dialing = dialing
        self._parser = httptools.HttpResponseParser(_RESPONSE_PARSING)
        self._exchange: _Exchange | None = None
        self._response: UpstreamResponse | None = None
        self._reused = False
        self._received = False
        self._interim = False
        self._headers: list | tuple = []
        self._reason = b""
        self._in_headers = True
        self._complete = False
        self._fresh_parser_needed = False
        self._framing_by_close = False
        self.keep_alive = True
        self.drop_after_exchange = False
        self.feeding = False
        self.idle_since = 0.0
        self.lost = False
        #: Pauses and resumes reading the backend (a slow client's backpressure).
        self.reading: ReadingControl | None = None

    def connectionMade(self) -> None:
        self._write = writer_for(self.transport)
        self.reading = ReadingControl(self.transport)
        no_delay(self.transport)
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.made(self)

    def abandon(self) -> None:
        """This connection cannot be reused: drop it now."""
        self.drop_after_exchange = True
        if self.transport is not None:
            self.transport.abortConnection()

    def send(self, exchange: _Exchange, reused: bool) -> None:
        """Write C{exchange}'s request on this connection."""
        self._exchange = exchange
        exchange.connection = self
        self._reused = reused
        self._received = False
        self._complete = False
        self._in_headers = True
        self._headers = []
        self._reason = b""
        if self._fresh_parser_needed:
            self._parser = httptools.HttpResponseParser(_RESPONSE_PARSING)
            self._fresh_parser_needed = False
        self._write(exchange.request_bytes)

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes nobody asked for: this connection cannot be trusted again.
            self.drop_after_exchange = True
            self.transport.loseConnection()
            return
        self._received = True
        self.feeding = True
        parsing = _RESPONSE_PARSING
        outer, parsing.connection = parsing.connection, self
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.feeding = False
            self.abandon()
            message = f"the backend's answer is malformed: {error}"
            response, self._response = self._response, None
            if response is None and exchange.unanswered:
                self._fail(exchange, UpstreamProtocolError(message))
            else:
                self._exchange = None
                exchange.body_end(StreamEnded(message))
                if response is not None:
                    exchange.answer(response)
            return
        finally:
            parsing.connection = outer
        self.feeding = False
        # The answer is told once the whole read is parsed: a body that came
        # with its headers is then delivered whole, with its end.
        response, self._response = self._response, None
        if self._complete and self._exchange is exchange:
            self._exchange = None
            exchange.connection = None
            # Back to the pool before the end is told: whoever the answer's
            # end sets going may reuse this connection.
            self._pool.release(self)
            exchange.body_end(None)
        if response is not None:
            exchange.answer(response)
        if exchange._discarding and not self._complete and self._exchange is exchange:
            self.abandon()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self._pool.forget(self)
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        if self._in_headers or exchange.unanswered:
            if exchange.cancelled:
                return
            if self._reused and not self._received and not exchange.retried:
                # The backend closed this idle connection as it was reused:
                # the request never reached it.  Once more, on a new connection.
                exchange.retried = True
                self._pool.connect_for(exchange)
                return
            self._fail(exchange, UpstreamConnectionLost(f"the connection was lost before the answer: {_why(reason)}"))
        elif self._complete or self._framing_by_close:
            exchange.body_end(None)
        else:
            exchange.body_end(StreamEnded(f"the connection was lost mid-answer: {_why(reason)}"))

    def _fail(self, exchange: _Exchange, error: Exception) -> None:
        self._exchange = None
        if exchange.unanswered:
            exchange.fail(error)


def _why(reason: Any) -> str:
    if reason is None:
        return "closed"
    message = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
    return message or type(reason).__name__


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects one name's resolution into a Deferred list of addresses."""

    def __init__(self) -> None:
        self.found: list = []
        self.done: Deferred = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.found.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: "UpstreamPool") -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> _UpstreamConnection:
        return _UpstreamConnection(self._pool)


class _Dialing(ClientFactory):
    """
    One plain TCP connection attempt: L{connected} fires with the
    connection once it is made, or fails with why it could not be
    (cancelling it stops the attempt).  Twisted's client endpoint does the
    same with a protocol wrapped around the connection, which would stand
    between every read of a stream and its connection (a call a chunk, and
    about 0.2 KB a connection for as long as it lives).
    """

    noisy = False

    def __init__(self, pool: "UpstreamPool") -> None:
        self._pool = pool
        self._connector: Any = None
        self.connected: Deferred[_UpstreamConnection] = Deferred(self._cancel)

    def startedConnecting(self, connector: Any) -> None:
        self._connector = connector

    def buildProtocol(self, addr: Any) -> _UpstreamConnection:
        return _UpstreamConnection(self._pool, self)

    def made(self, connection: _UpstreamConnection) -> None:
        """C{connection} is made (its C{connectionMade})."""
        self.connected.callback(connection)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connected.called:
            self.connected.errback(reason)

    def _cancel(self, connected: Deferred) -> None:
        connected.errback(ConnectingCancelledError(self._connector.getDestination()))
        self._connector.stopConnecting()


@implementer(IUpstream)
class UpstreamPool:
    """
    One backend base URL: its address, its keep-alive pool, and the
    requests sent to it.

    @param url: C{http://host:port/base} or C{https://...}.
    @param reactor: connects, resolves, and times idle connections.
    @param tls_policy: an C{IPolicyForHTTPS} for https URLs (certificates
        checked like a browser by default).
    @param max_idle: idle connections kept; more are closed.
    @param idle_seconds: an idle connection older than this is not reused.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        tls_policy: Any = None,
        max_idle: int = 64,
        idle_seconds: float = 60.0,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = parts.port is None or parts.port == (443 if parts.scheme == "https" else 80)
        host_for_header = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host_for_header if default_port else f"{host_for_header}:{self.port}").encode("ascii")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.origin = f"{parts.scheme}://{parts.netloc}".encode("ascii")
        self._reactor = reactor
        self._tls_creator = None
        if parts.scheme == "https":
            if tls_policy is None:
                from twisted.web.client import BrowserLikePolicyForHTTPS

                tls_policy = BrowserLikePolicyForHTTPS()
            self._tls_creator = tls_policy.creatorForNetloc(self.host.encode("idna"), self.port)
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: list[_UpstreamConnection] = []
        self._factory = _ConnectionFactory(self)
        #: The backend's addresses as text (made once, not a string a connection).
        self._addresses: list[str] | None = None
        self._resolved_at = 0.0
        self._closed = False
        try:
            literal = ipaddress.ip_address(self.host)
        except ValueError:
            literal = None
        if literal is not None:
            self._addresses = [str(literal)]
            self._resolved_at = float("inf")

    # -- IUpstream

    def request(self, method: bytes, target: bytes, headers: list, body: bytes) -> Deferred:
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, self.host_header)]
        for name, value in headers:
            lines.append(b"%s: %s\r\n" % (name, value))
        if body or method in _BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        exchange = _Exchange(b"".join(lines), head_only=method == b"HEAD")
        answered = exchange.answered
        connection = self._take_idle()
        if connection is not None:
            connection.send(exchange, reused=True)
        else:
            self.connect_for(exchange)
        return answered

    def close(self) -> Deferred:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.transport.loseConnection()
        return succeed(None)

    @property
    def closed(self) -> bool:
        """L{close} was called: no new request is sent."""
        return self._closed

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    # -- the pool

    def _take_idle(self) -> _UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        oldest_kept = self._reactor.seconds() - self.idle_seconds
        while idle:
            connection = idle.pop()
            if connection.idle_since >= oldest_kept and not connection.lost:
                return connection
            connection.transport.loseConnection()
        return None

    def release(self, connection: _UpstreamConnection) -> None:
        """An exchange ended cleanly: keep the connection for the next, or close it."""
        if (
            not connection.keep_alive
            or connection.drop_after_exchange
            or self._closed
            or len(self._idle) >= self.max_idle
        ):
            connection.transport.loseConnection()
            return
        connection.idle_since = self._reactor.seconds()
        if connection.reading.paused:
            connection.reading.resume_reading()  # an idle connection is read: its close is seen at once
        self._idle.append(connection)

    def forget(self, connection: _UpstreamConnection) -> None:
        """The connection is gone."""
        if connection in self._idle:
            self._idle.remove(connection)

    def connect_for(self, exchange: _Exchange) -> None:
        """Open a new connection and send C{exchange} on it."""
        connecting = self._connect()
        exchange._pending_connect = connecting

        def connected(connection: _UpstreamConnection) -> None:
            exchange._pending_connect = None
            if exchange.cancelled:
                connection.transport.loseConnection()
                return
            connection.send(exchange, reused=False)

        def failed(failure: Any) -> None:
            exchange._pending_connect = None
            if exchange.cancelled or not exchange.unanswered:
                return
            exchange.fail(failure)

        connecting.addCallbacks(connected, failed)

    def _connect(self) -> Deferred:
        if self._addresses is not None and self._reactor.seconds() - self._resolved_at < RESOLUTION_TTL:
            return self._connect_any(self._addresses)
        receiver = _Addresses()
        self._reactor.nameResolver.resolveHostName(receiver, self.host, self.port)

        def resolved(addresses: list) -> Deferred:
            if not addresses:
                raise DNSLookupError(f"no address for {self.host}")
            self._addresses = [str(ipaddress.ip_address(address.host)) for address in addresses]
            self._resolved_at = self._reactor.seconds()
            return self._connect_any(self._addresses)

        return receiver.done.addCallback(resolved)

    def _dial(self, address: str) -> Deferred:
        """A connection to C{address} (an IP address as text): a L{Deferred} of its L{_UpstreamConnection}."""
        if self._tls_creator is not None:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            return wrapClientTLS(self._tls_creator, kind(self._reactor, address, self.port)).connect(self._factory)
        dialing = _Dialing(self)
        self._reactor.connectTCP(address, self.port, dialing, timeout=CONNECT_TIMEOUT)
        return dialing.connected

    def _connect_any(self, addresses: list) -> Deferred:
        """
        Connect to the first address that answers: the next one is tried
        at once when one fails, or after L{ATTEMPT_DELAY} while one is still
        connecting (an address that drops packets must not stall the rest).
        """
        if len(addresses) == 1:
            return self._dial(addresses[0])
        def cancel(_: Deferred) -> None:
            remaining.clear()
            for attempt in list(pending):
                attempt.cancel()

        won: Deferred = Deferred(cancel)
        pending: list[Deferred] = []
        failures: list = []
        remaining = list(addresses)
        timer: list[IDelayedCall] = []

        def next_attempt() -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            timer.clear()
            if won.called or not remaining:
                if not pending and not won.called:
                    won.errback(failures[-1])
                return
            attempt = self._dial(remaining.pop(0))
            pending.append(attempt)
            attempt.addCallbacks(succeeded, failed, callbackArgs=(attempt,), errbackArgs=(attempt,))
            if remaining and not won.called and attempt in pending:
                timer.append(self._reactor.callLater(ATTEMPT_DELAY, next_attempt))

        def succeeded(connection: Any, attempt: Deferred) -> None:
            pending.remove(attempt)
            if won.called:
                connection.transport.loseConnection()
                return
            if timer and timer[0].active():
                timer[0].cancel()
            for other in list(pending):
                other.cancel()
            won.callback(connection)

        def failed(failure: Any, attempt: Deferred) -> None:
            pending.remove(attempt)
            failures.append(failure)
            if not won.called and (remaining or not pending):
                next_attempt()

        next_attempt()
        return won

