"""
The data plane's server side: HTTP/1.1 from clients, parsed by llhttp
(C{httptools.HttpRequestParser}), one L{HTTPServerProtocol} per connection.

The parser's callbacks only record (the request line, headers, body
chunks); L{HTTPServerProtocol} enforces what llhttp does not (the size of a
header line and of all headers, their count, the header deadline, the body
limit while it arrives) and turns every refusal into the gateway's JSON
error shape on the wire, then closes lingering (the answer and a FIN, then
the rest of the client's body read and dropped), so that a client still
sending reads its answer instead of a reset.

Complete requests are handed, one at a time and in order, to the handler
(the gateway's L{GatewayFront}); pipelined requests wait in a queue, and
reading pauses while it is long.  Each L{IncomingRequest} is also the
writer of its answer: L{IncomingRequest.start}, L{IncomingRequest.write},
L{IncomingRequest.finish}; the framing (Content-Length, chunked, or
close-delimited for HTTP/1.0), keep-alive, HEAD and the bodiless statuses
are decided here and nowhere else.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable, Iterable

import httptools
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol

from txgateway import errors
from txgateway.dataplane.eager import no_delay, writer_for
from txgateway.dataplane.flow import ReadingControl
from txgateway.dataplane.idle import IdleTimer
from txgateway.dataplane.parsing import SharedCallbacks
from txgateway.errors import ErrorKind, error_answer
from txgateway.ids import request_id_for

__all__ = [
    "AnswerRecorder",
    "HTTPServerFactory",
    "HTTPServerProtocol",
    "IncomingRequest",
    "LINGER_IDLE",
    "LINGER_TOTAL",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_LINE",
    "reason_phrase",
]

#: Longest request line or single header line (431 past it).
MAX_LINE = 16384
#: Most bytes of all header lines together (400 past it, like Twisted's).
MAX_HEADER_BYTES = 16384
#: Most header lines in one request.
MAX_HEADER_COUNT = 500
#: Complete pipelined requests queued before reading pauses.
MAX_QUEUED = 8
#: After a refusal, how long to keep reading (and dropping) what the client
#: still sends: at most LINGER_TOTAL seconds, or until it is silent for
#: LINGER_IDLE seconds.
LINGER_TOTAL = 30.0
LINGER_IDLE = 2.0

_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 304})
_ABSOLUTE_FORM = (b"http://", b"https://")
_NO_HEADERS: dict = {}
# A request line whose only fault is a method llhttp does not know.
_TOKEN_METHOD_LINE = re.compile(rb"(?:^|\n)[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/\d\.\d\r?\n")


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of C{status} (C{b"Unknown"} for none)."""
    return _PHRASES.get(status, b"Unknown")


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is on the protocol."""


class _DateHeader:
    """C{Date} header values, formatted once a second."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


#: The refusal of a body past C{max_bodies_held} (its limit filled in).
_BUSY_MESSAGE = "the gateway holds as many request body bytes (%d) as it may at once; retry shortly"
_FULL_MESSAGE = "the gateway holds as many client connections (%s, [gateway] max_connections) as it may at once; retry shortly"


class AnswerRecorder:
    """
    Keeps a copy of the answer a request writes (its C{recorder}): the
    status, reason and headers, and up to C{limit} body bytes (past them,
    C{overflowed} and nothing kept).
    """

    __slots__ = ("code", "reason", "headers", "parts", "size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.code = 0
        self.reason = b""
        self.headers: list | tuple = ()
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False

    def started(self, code: int, reason: bytes | None, headers: list) -> None:
        """The answer's status line and headers were decided."""
        self.code = code
        self.reason = reason or b""
        self.headers = headers

    def wrote(self, data: bytes) -> None:
        """Body bytes were written."""
        if self.counted(data):
            self.parts.append(data)

    def counted(self, data: bytes) -> bool:
        """
        Count C{data} against the limit: whether it is to be kept (past the
        limit, C{overflowed}, and what was kept is let go).
        """
        if self.overflowed:
            return False
        self.size += len(data)
        if self.size > self.limit:
            self.overflowed = True
            self.parts = []
            return False
        return True


class IncomingRequest:
    """
    One client request, complete with its body, and the writer of its answer.

    @ivar method: e.g. C{b"GET"}.
    @ivar target: the request target as sent (C{/api/ai/x?y=1}).
    @ivar path: the target's path (an absolute-form target's host is dropped:
        it is never contacted).
    @ivar query: what follows C{?}, without it.
    @ivar headers: the header lines as sent, in order: (name, value) pairs.
    @ivar body: the whole body (bounded by C{max_body_size}), until the
        answer starts: then C{b""} (nothing sends the request again).
    @ivar client_host: the socket peer's address.
    @ivar secure: it came over TLS.
    @ivar context: the gateway's L{RequestContext}, set by the handler.
    @ivar on_end: called once with (request, aborted) when the answer is
        complete, or when the connection ended before it was.
    @ivar code: the status of the answer, once started.
    @ivar bytes_sent: body bytes written to the client.
    @ivar gone: the client connection ended.
    """

    __slots__ = (
        "_channel",
        "method",
        "target",
        "path",
        "query",
        "http10",
        "headers",
        "_lookup",
        "body",
        "client_host",
        "secure",
        "keep_alive",
        "context",
        "on_end",
        "code",
        "bytes_sent",
        "gone",
        "finished",
        "_own",
        "_head",
        "_chunked",
        "_bodiless",
        "_producer",
        "_ended",
        "_cut",
        "_held",
        "recorder",
    )

    def __init__(
        self,
        channel: "HTTPServerProtocol | None",
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        client_host: str = "unknown",
        http10: bool = False,
        keep_alive: bool = True,
        secure: bool = False,
    ) -> None:
        self._channel = channel
        self.method = method
        self.target = target
        #: Given C{started(code, reason, headers)} and C{wrote(data)} for the answer (the response cache).
        self.recorder = None
        path_and_query = target
        if target.startswith(_ABSOLUTE_FORM):
            # RFC 9112 3.2.2: accept the absolute form, route by the path.
            after_scheme = target.split(b"://", 1)[1]
            slash = after_scheme.find(b"/")
            path_and_query = after_scheme[slash:] if slash >= 0 else b"/"
        self.path, _, self.query = path_and_query.partition(b"?")
        self.headers = headers
        self._lookup: dict[bytes, list[bytes]] | None = None
        self.body = body
        #: The body bytes the connection holds for this request (as read, before any decoding).
        self._held = len(body)
        self.client_host = client_host
        self.http10 = http10
        self.keep_alive = keep_alive
        self.secure = secure
        self.context: Any = None
        self.on_end: Callable[["IncomingRequest", bool], None] | None = None
        self.code = 0
        self.bytes_sent = 0
        self.gone = False
        self.finished = False
        #: The gateway's own answer headers, until the answer starts (L{None}: none yet, or started).
        self._own: dict[bytes, tuple[bytes, bytes]] | None = None
        self._head: bytes | None = None
        self._chunked = False
        self._bodiless = False
        self._producer: IPushProducer | None = None
        self._ended = False
        self._cut = False

    # -- the request

    def replace_body(self, body: bytes, dropped_header: bytes) -> None:
        """
        The body as the gateway decoded it (a compressed request's), and
        the header that described the old one (C{Content-Encoding}) gone:
        what a backend is sent from now on.  The bytes the connection holds
        are still the ones it read.
        """
        self.body = body
        self.headers = [(name, value) for name, value in self.headers if name.lower() != dropped_header]
        self._lookup = None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of the header C{name} (lower case), in order."""
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = {}
            for key, value in self.headers:
                lookup.setdefault(key.lower(), []).append(value)
        return lookup.get(name, [])

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header C{name} (lower case), or L{None}."""
        values = self.header_values(name)
        return values[0] if values else None

    # -- the answer

    @property
    def started(self) -> bool:
        """The status line is decided (it may still wait for the first body bytes)."""
        return self.code != 0

    def set_header(self, name: bytes, value: bytes) -> None:
        """
        A header of the gateway's own for the answer (C{X-Request-ID},
        C{X-Gateway-*}, C{RateLimit-*}); it replaces one of the same name,
        the backend's included.
        """
        own = self._own
        if own is None:
            own = self._own = {}
        own[name.lower()] = (name, value)

    def start(
        self,
        code: int,
        reason: bytes | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        length: int | None = None,
    ) -> None:
        """
        Decide the answer's status line and headers (end-to-end ones only:
        the framing headers are written here).  They go out with the first
        body bytes, at L{finish}, or at once with L{send_head}.

        @param length: the body's length, or L{None} when unknown (a stream:
            chunked to HTTP/1.1 clients, close-delimited to HTTP/1.0 ones).
        """
        if self.code:
            raise RuntimeError("the answer was already started")
        if self.recorder is not None:
            headers = list(headers)
            self.recorder.started(code, reason, headers)
        channel = self._channel
        self.code = code
        # What only the head needed is let go as it is made: a stream lasts
        # minutes, and a thousand of them hold it a thousand times.  Nothing
        # sends the request again once its answer starts (a resumed stream is
        # sent from its parsed call), so its body goes too.
        own, self._own = self._own or _NO_HEADERS, None
        self.body = b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, reason or reason_phrase(code))]
        has_date = False
        for name, value in headers:
            lower = name.lower()
            if lower in own:
                continue
            if lower == b"date":
                has_date = True
            lines.append(b"%s: %s\r\n" % (name, value))
        for name, value in own.values():
            lines.append(b"%s: %s\r\n" % (name, value))
        if not has_date and channel is not None:
            lines.append(b"Date: %s\r\n" % channel.date.value())
        bodiless = self.method == b"HEAD" or code in _NO_BODY_STATUSES or code < 200
        if bodiless:
            if length is not None and self.method == b"HEAD" and code not in _NO_BODY_STATUSES:
                lines.append(b"Content-Length: %d\r\n" % length)
        elif length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
        elif self.http10:
            self.keep_alive = False  # close-delimited: the end of the body is the end of the connection
        else:
            self._chunked = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self._bodiless = bodiless
        self._head = b"".join(lines)

    def send_head(self) -> None:
        """Send the status line and headers now (a stream's first token may be slow)."""
        if self._head is not None and not self.gone:
            head, self._head = self._head, None
            self._channel.write(head)
        self._channel.streaming(self)
        # A stream's headers are rarely read again (a resumed stream's
        # attempt reads them anew): the lookup is made again if they are.
        self._lookup = None

    def write(self, data: bytes) -> None:
        """Write body bytes (dropped once the client is gone)."""
        if self.gone or self.finished or self._cut or not data:
            return
        if self._bodiless:
            self.send_head()
            return
        self.bytes_sent += len(data)
        if self.recorder is not None:
            self.recorder.wrote(data)
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._head is not None:
            data = self._head + data
            self._head = None
        self._channel.write(data)

    def finish(self) -> None:
        """The answer is complete; the connection serves the next request, or closes."""
        if self.finished or self.gone or self._cut:
            return
        self.finished = True
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._head is not None:
            tail = self._head + tail
            self._head = None
        if tail:
            self._channel.write(tail)
        self._channel.answer_done(self)

    def respond(self, code: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A whole answer of the gateway's own in one call."""
        self.start(code, None, headers, len(body))
        self.write(body)
        self.finish()

    def abort(self) -> None:
        """
        End the connection without the end of the answer: a client must
        never take a cut answer for a complete one.
        """
        if not self.gone and not self._cut:
            self._cut = True
            self._channel.abort_answer(self)

    def register_producer(self, producer: IPushProducer) -> None:
        """Make C{producer} the client connection's push producer (backpressure)."""
        if not self.gone and self._producer is None:
            self._producer = producer
            self._channel.transport.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        """Undo L{register_producer}."""
        if self._producer is not None:
            self._producer = None
            if not self.gone:
                self._channel.transport.unregisterProducer()

    def _end(self, aborted: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self._channel is not None and self._held:
            self._channel.body_released(self._held)
        if self.on_end is not None:
            self.on_end(self, aborted)


class _Reading:
    """The request being parsed: what the callbacks recorded so far."""

    __slots__ = ("url", "headers", "header_bytes", "in_headers", "body", "body_size")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.in_headers = True
        self.body: list[bytes] = []
        self.body_size = 0


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request with these C{headers} has a body still to come (a C{Content-Length} above 0, or chunked)."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding" or (lowered == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _RequestParsing(SharedCallbacks):
    """
    What every connection's request parser calls (L{SharedCallbacks}: the
    connection is L{HTTPServerProtocol}).  They record, and stop the parser
    on a refusal.
    """

    CALLBACKS = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete")
    connection: HTTPServerProtocol

    def on_message_begin(self) -> None:
        connection = self.connection
        connection._reading = _Reading()

    def on_url(self, part: bytes) -> None:
        connection = self.connection
        reading = connection._reading
        reading.url += part
        if len(reading.url) > MAX_LINE:
            connection._stop_parsing(errors.HEADER_TOO_LARGE, "a request line or header is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        connection = self.connection
        reading = connection._reading
        if not reading.in_headers:
            return  # a trailer of a chunked body: the body is relayed whole, without it
        size = len(name) + len(value) + 4
        if size > MAX_LINE:
            connection._stop_parsing(errors.HEADER_TOO_LARGE, "a request line or header is too long")
        reading.header_bytes += size
        if reading.header_bytes > MAX_HEADER_BYTES or len(reading.headers) >= MAX_HEADER_COUNT:
            connection._stop_parsing(errors.BAD_REQUEST, "the request headers are too many or too large in all")
        reading.headers.append((name, value))

    def on_headers_complete(self) -> None:
        connection = self.connection
        reading = connection._reading
        reading.in_headers = False
        _cancel(connection._header_timer)
        connection._header_timer = None
        factory = connection.factory
        if not connection.serving and not connection._answered_when_full(reading):
            # Opened past [gateway] max_connections: its request is answered 503 (its own id on it), never served.
            connection._stop_parsing(errors.GATEWAY_BUSY, factory.full_message())
        limit = factory.max_body_size
        for name, value in reading.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                # Refused before the body arrives: it is never read.
                declared = int(value)
                if declared > limit:
                    connection._stop_parsing(errors.BODY_TOO_LARGE, f"the request body is larger than {limit} bytes")
                if factory.bodies_held + declared > factory.max_bodies_held:
                    connection._stop_parsing(errors.GATEWAY_BUSY, _BUSY_MESSAGE % factory.max_bodies_held)
        if connection._current is None and not connection._queue:
            for name, value in reading.headers:
                if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
                    if connection._parser.get_http_version() == "1.1":
                        connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        connection = self.connection
        reading = connection._reading
        size = len(data)
        reading.body_size += size
        factory = connection.factory
        if reading.body_size > factory.max_body_size:
            connection._stop_parsing(errors.BODY_TOO_LARGE, f"the request body is larger than {factory.max_body_size} bytes")
        connection._body_bytes += size
        factory.bodies_held += size
        if factory.bodies_held > factory.max_bodies_held:
            connection._stop_parsing(errors.GATEWAY_BUSY, _BUSY_MESSAGE % factory.max_bodies_held)
        reading.body.append(data)

    def on_message_complete(self) -> None:
        connection = self.connection
        reading, connection._reading = connection._reading, None
        parser = connection._parser
        request = IncomingRequest(
            connection,
            parser.get_method(),
            reading.url,
            reading.headers,
            b"".join(reading.body),
            connection._peer,
            http10=parser.get_http_version() == "1.0",
            # One opened past the limit (a probe answered all the same) closes after its answer.
            keep_alive=parser.should_keep_alive() and connection.serving,
            secure=connection._secure,
        )
        if connection._current is None:
            connection._dispatch(request)
        else:
            connection._queue.append(request)
            if len(connection._queue) >= MAX_QUEUED:
                connection._flow.pause_reading()


_REQUEST_PARSING = _RequestParsing()


class HTTPServerProtocol(Protocol):
    """
    One client connection.  See the module docstring.

    @ivar refused: set once the connection answered with a refusal and is
        closing; nothing more it receives is processed.
    """

    refused = False
    #: Counted among the factory's L{HTTPServerFactory.serving} (not opened past its C{max_connections}).
    serving = False

    def __init__(self, factory: "HTTPServerFactory") -> None:
        self.factory = factory
        self.clock = factory.clock
        self.date = factory.date
        self._parser = httptools.HttpRequestParser(_REQUEST_PARSING)
        self._reading: _Reading | None = None
        self._phase_bytes = 0  # bytes received since the current request began, while in its headers
        # A list, not a deque: an empty deque holds a 64-slot block (760 bytes
        # a connection, measured with tracemalloc), and the queue is rarely
        # longer than one pipelined request.
        self._queue: list[IncomingRequest] = []
        self._current: IncomingRequest | None = None
        self._flow: ReadingControl | None = None
        self._closing = False
        #: Closes the connection after C{idle_timeout} without a read, unless it is answering.
        self.idle_timer = IdleTimer(self.clock, self.factory.idle_timeout, self._went_idle)
        self._header_timer: IDelayedCall | None = None
        self._linger_ends: IDelayedCall | None = None
        self._linger_idle: IDelayedCall | None = None
        self._refusal: tuple[ErrorKind, str] | None = None
        self._pending_refusal: bytes | None = None
        self._peer = "unknown"
        self._secure = False
        #: Request body bytes this connection holds (being read, queued, or of the request answered now).
        self._body_bytes = 0

    # -- connection

    def connectionMade(self) -> None:
        self.write = writer_for(self.transport)
        self._flow = ReadingControl(self.transport)
        no_delay(self.transport)
        self.factory.connections.add(self)
        self.serving = self.factory.admit()
        if not self.serving:
            # Its request is refused once its headers are read (its own id on the answer), or now if they are slow.
            self._header_timer = self.clock.callLater(LINGER_IDLE, self._refuse_past_limit)
        peer = self.transport.getPeer()
        self._peer = getattr(peer, "host", None) or "unknown"
        self._secure = self.factory.secure
        self.idle_timer.start()

    def connectionLost(self, reason: Any = None) -> None:
        if self.serving:
            self.serving = False
            self.factory.release()
        self.factory.connection_closed(self)
        self._closing = True
        # Everything it held goes back at once (its requests' ends then find nothing to give).
        self.factory.bodies_held -= self._body_bytes
        self._body_bytes = 0
        self.idle_timer.close()
        for call in (self._header_timer, self._linger_ends, self._linger_idle):
            _cancel(call)
        self._header_timer = self._linger_ends = self._linger_idle = None
        self._queue.clear()
        current, self._current = self._current, None
        if current is not None:
            current.gone = True
            current._producer = None
            current._end(aborted=not current.finished)

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            # Lingering after a refusal: drop it, and wait a while longer.
            if self._linger_idle is not None and self._linger_idle.active():
                self._linger_idle.reset(LINGER_IDLE)
            return
        if self._closing:
            return
        self.idle_timer.seen()
        before = self._reading
        in_headers_before = before is not None and before.in_headers
        parsing = _REQUEST_PARSING
        outer, parsing.connection = parsing.connection, self
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request is complete; what follows is another protocol,
            # which the gateway does not relay: answer, then close.
            self._closing_after_current()
        except httptools.HttpParserError as error:
            self._parser_failed(error, data)
            return
        finally:
            parsing.connection = outer
        reading = self._reading
        if reading is not None and reading.in_headers and not self.refused:
            if reading is before and in_headers_before:
                self._phase_bytes += len(data)
            else:
                # Begun in this read: at most all of it is this request's.
                self._phase_bytes = len(data)
            accounted = len(reading.url) + reading.header_bytes
            if self._phase_bytes - accounted > MAX_LINE + 2:
                self.refuse(errors.HEADER_TOO_LARGE, "a request line or header is too long")
            elif self._header_timer is None:
                # Headers that arrive whole in one read (nearly all) need no
                # timer; the deadline starts with the read that left them partial.
                self._header_timer = self.clock.callLater(self.factory.header_timeout, self._headers_too_slow)

    def _parser_failed(self, error: Exception, data: bytes) -> None:
        if self.refused or self._closing:
            return
        if self._refusal is not None:
            kind, message = self._refusal
            self.refuse(kind, message)
        elif isinstance(error, httptools.HttpParserInvalidMethodError) and _TOKEN_METHOD_LINE.search(data):
            self.refuse(errors.NOT_IMPLEMENTED, "the request method is not one the gateway knows")
        else:
            reason = str(error) or type(error).__name__
            self.refuse(errors.BAD_REQUEST, f"the request is malformed (request line, headers or framing): {reason}")

    def body_released(self, size: int) -> None:
        """A request of this connection ended: its body's C{size} bytes go back (unless the connection gave all back)."""
        if self._body_bytes >= size:
            self._body_bytes -= size
            self.factory.bodies_held -= size

    def _stop_parsing(self, kind: ErrorKind, message: str) -> None:
        self._refusal = (kind, message)
        raise _Refused(message)

    # -- answering, in order

    def _dispatch(self, request: IncomingRequest) -> None:
        self._current = request
        self.factory.handler.handle(request)

    def streaming(self, request: IncomingRequest) -> None:
        """
        C{request}'s answer is a stream (its head went before its body):
        while it lasts the connection holds no idle timer (answering is not
        idleness, and a thousand streams would hold a thousand timers);
        L{answer_done} arms it again.
        """
        if request is self._current:
            self.idle_timer.stop()

    def answer_done(self, request: IncomingRequest) -> None:
        """Called by L{IncomingRequest.finish}: the next request, or close."""
        if request is not self._current:
            return
        self._current = None
        request._producer = None
        request._end(aborted=False)
        if self._closing:
            return
        if not request.keep_alive or (self.factory.draining and not self._queue):
            self._closing = True
            self.transport.loseConnection()
            return
        self.idle_timer.start()  # from now (a stream's connection had none while it lasted)
        if self._queue:
            self._dispatch(self._queue.pop(0))
        elif self._pending_refusal is not None:
            self.transport.write(self._pending_refusal)
            self._pending_refusal = None
            self._linger()
            return
        if self._flow.paused and len(self._queue) < MAX_QUEUED:
            self._flow.resume_reading()

    def close_when_idle(self) -> None:
        """Close now if no answer is in progress, else right after it (a drain)."""
        if self._closing:
            return
        if self._current is None:
            self._closing = True
            self.transport.loseConnection()
            return
        last = self._queue[-1] if self._queue else self._current
        if not last.started:
            last.keep_alive = False  # its answer says Connection: close

    def abort_answer(self, request: IncomingRequest) -> None:
        """Close at once, the answer unfinished (see L{IncomingRequest.abort})."""
        self._closing = True
        self._queue.clear()
        self.transport.loseConnection()

    def _closing_after_current(self) -> None:
        # Answer the requests already complete, then close; read nothing more.
        last = self._queue[-1] if self._queue else self._current
        if last is not None:
            last.keep_alive = False
        else:
            self._closing = True
            self.transport.loseConnection()
            return
        self._flow.pause_reading()

    # -- timers

    def _went_idle(self) -> None:
        """No read for C{idle_timeout}: the connection closes, unless it is answering."""
        if self._closing or self.refused:
            return
        if self._current is not None:
            self.idle_timer.start()  # answering is not idleness; look again later
            return
        self._closing = True
        self.transport.loseConnection()

    def _answered_when_full(self, reading: _Reading) -> bool:
        """
        Whether the request of a connection opened past the limit is served
        all the same: a C{GET} or C{HEAD} without a body of one of the
        factory's C{answered_when_full} paths (the probes and the scrape:
        a full gateway is when its operator looks).
        """
        paths = self.factory.answered_when_full
        return (
            bool(paths)
            and reading.url.split(b"?", 1)[0] in paths
            and self._parser.get_method() in (b"GET", b"HEAD")
            and not _has_body(reading.headers)
        )

    def _refuse_past_limit(self) -> None:
        self._header_timer = None
        self.refuse(errors.GATEWAY_BUSY, self.factory.full_message())

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.refuse(
            errors.REQUEST_TIMEOUT,
            f"the request headers did not arrive within {self.factory.header_timeout:g} s",
        )

    # -- refusals

    def refuse(self, kind: ErrorKind, message: str) -> None:
        """
        Answer with the JSON error shape straight on the wire and close: for
        refusals that happen before (or instead of) a route.
        """
        if self.refused:
            return
        self.refused = True
        _cancel(self._header_timer)
        self._header_timer = None
        self.idle_timer.stop()
        reading = self._reading
        sent_id = None
        method = None
        if reading is not None:
            for name, value in reading.headers:
                if name.lower() == b"x-request-id":
                    sent_id = value
                    break
            if not reading.in_headers:
                method = self._parser.get_method().decode("ascii", "replace")
        request_id = request_id_for(sent_id)
        answer = error_answer(kind, message, request_id, [(b"X-Request-ID", request_id.encode("ascii"))])
        body = answer.body
        lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, reason_phrase(answer.status))]
        lines += [b"%s: %s\r\n" % header for header in answer.headers]
        lines.append(b"Content-Length: %d\r\nDate: %s\r\nConnection: close\r\n\r\n" % (len(body), self.date.value()))
        head = b"".join(lines)
        if self._current is None and not self._queue:
            self.transport.write(head + body)
            if not self.serving and reading is not None and not reading.in_headers and not _has_body(reading.headers):
                # Past the limit, its request read whole: closed at once (FIN after the answer), its
                # descriptor back now; a burst of such clients must not hold the files the served streams need.
                self.transport.loseConnection()
            else:
                self._linger()
        else:
            # Answers in progress or queued own the wire first: the refusal
            # of a later pipelined request follows them, in order.
            self._pending_refusal = head + body
        self.factory.log.info(
            "request_refused",
            request_id=request_id,
            status=kind.status,
            outcome=kind.type,
            reason=message,
            method=method,
            client=self._peer,
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
            self.transport.loseConnection()
            return
        half_close()
        self._linger_ends = self.clock.callLater(LINGER_TOTAL, self._end_linger)
        self._linger_idle = self.clock.callLater(LINGER_IDLE, self._end_linger)

    def _end_linger(self) -> None:
        _cancel(self._linger_ends)
        _cancel(self._linger_idle)
        self._linger_ends = self._linger_idle = None
        self.transport.loseConnection()


class HTTPServerFactory(Factory):
    """
    Makes an L{HTTPServerProtocol} per client connection and hands their
    complete requests to C{handler}.

    @ivar handler: has C{handle(request)}; it answers through the request.
    @ivar max_body_size: the largest request body accepted, in bytes.
    @ivar bodies_held: request body bytes held now, across every connection.
    @ivar header_timeout: seconds a client has to send its request line and
        headers once it started.
    @ivar idle_timeout: seconds a connection may stay silent while no
        answer is in progress.
    @ivar secure: the listener is TLS (C{X-Forwarded-Proto: https}).
    @ivar max_connections: the most client connections served at once; one
        opened past it has its request answered 503 C{gateway_busy} and is
        closed (L{None}: no limit).
    @ivar answered_when_full: the paths whose C{GET} or C{HEAD} (without a
        body) is answered even on a connection opened past
        C{max_connections}, which then closes after its answer: the
        probes and the scrape.
    @ivar serving: the client connections served now (those answered
        C{gateway_busy} are not counted).
    """

    noisy = False

    def __init__(
        self,
        handler: Any,
        clock: IReactorTime,
        log: Any,
        max_body_size: int,
        header_timeout: float,
        idle_timeout: float,
        secure: bool = False,
        max_bodies_held: int = 256 * 1024 * 1024,
        max_connections: int | None = None,
        answered_when_full: frozenset[bytes] = frozenset(),
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.log = log
        self.max_body_size = max_body_size
        #: The most request body bytes held across every connection at once
        #: (being received, or held by requests not yet answered); past it a
        #: new body is refused 503 C{gateway_busy}.
        self.max_bodies_held = max_bodies_held
        self.bodies_held = 0
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.secure = secure
        self.date = _DateHeader(clock)
        self.max_connections = max_connections
        self.answered_when_full = answered_when_full
        self.serving = 0
        #: A refusal for the connections' limit was logged, and the connections have not fallen well below it since.
        self._full = False
        self.connections: set[HTTPServerProtocol] = set()
        self.draining = False
        self._all_closed: list[Deferred[None]] = []

    def close_connections(self) -> Deferred[None]:
        """
        Close every client connection once its answer in progress is done
        (pending bytes are written first); fires when all are closed.
        """
        self.draining = True
        for connection in list(self.connections):
            connection.close_when_idle()
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._all_closed.append(waiter)
        return waiter

    def abort_connections(self) -> None:
        """Drop every client connection now (a drain that ran out of time)."""
        for connection in list(self.connections):
            connection.transport.abortConnection()

    def admit(self) -> bool:
        """
        A client connection opened: whether it is served (counted in
        L{serving}), or is past L{max_connections}.  The first refused
        logs C{client_connections_full} (a warning, once until they fall
        below nine tenths of the limit).
        """
        limit = self.max_connections
        if limit is None or self.serving < limit:
            self.serving += 1
            return True
        if not self._full:
            self._full = True
            self.log.warning(
                "client_connections_full", max_connections=limit,
                reason="more clients than [gateway] max_connections: the others are answered 503 gateway_busy",
            )
        return False

    def full_message(self) -> str:
        """What a connection opened past L{max_connections} is answered (503 C{gateway_busy})."""
        return _FULL_MESSAGE % self.max_connections

    def release(self) -> None:
        """A served connection closed."""
        self.serving -= 1
        limit = self.max_connections
        if self._full and (limit is None or self.serving < 0.9 * limit):
            self._full = False
            self.log.info("client_connections_below_limit", max_connections=limit, serving=self.serving)

    def connection_closed(self, connection: HTTPServerProtocol) -> None:
        """Called by a connection as it ends."""
        self.connections.discard(connection)
        if not self.connections and self._all_closed:
            waiters, self._all_closed = self._all_closed, []
            for waiter in waiters:
                waiter.callback(None)

    def buildProtocol(self, addr: Any) -> HTTPServerProtocol:
        return HTTPServerProtocol(self)
