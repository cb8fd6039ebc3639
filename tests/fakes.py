"""
In-memory stand-ins for unit tests: an agent whose every request the test
answers by hand, and responses whose body the test pushes chunk by chunk.
Integration tests use real sockets instead.
"""

from __future__ import annotations

import json
import random
from urllib.parse import urlsplit

import attrs
import structlog
from treq.client import HTTPClient
from treq.testing import _SynchronousProducer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from zope.interface import implementer

from txgateway.config.gateway import parse_config
from txgateway.daemon.service import build_gateway, build_server_factory
from txgateway.dataplane.client import IUpstream, StreamEnded
from txgateway.front.door import GatewayFront
from txgateway.observability.logs import AccessLog
from txgateway.observability.metrics import GatewayMetrics
from txgateway.ratelimit.memory import MemoryRateLimitStore


class FakeBodyTransport:
    """The flow control of a fake response's body: records what the relay asks."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """
    A backend response; the test feeds its body with L{send}, L{finish}
    and L{fail} once the gateway has asked for it.
    """

    def __init__(self, code: int = 200, headers: dict | None = None, body: bytes | None = None) -> None:
        self.code = code
        self.reason = b"Fine" if code < 400 else b"Trouble"
        self.headers = list((headers or {}).items())
        self.length = len(body) if body is not None else None
        self._body = body
        self.consumer = None
        self.transport = FakeBodyTransport()
        self.discarded = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def head_relayed(self) -> None:
        content_type = self.header(b"content-type")
        self.headers = [] if content_type is None else [(b"content-type", content_type)]

    def deliver_body(self, consumer) -> None:
        self.consumer = consumer
        consumer.body_started(self.transport)
        if self._body is not None and not self.transport.stopped:
            self.send(self._body)
            self.finish()
        elif self.transport.stopped:
            consumer.body_ended(StreamEnded("stopped"))

    def discard(self) -> None:
        self.discarded = True
        self.transport.stopped = True

    def send(self, data: bytes) -> None:
        self.consumer.body_received(data)

    def finish(self) -> None:
        self.consumer.body_ended(None)

    def fail(self, reason: str = "connection reset") -> None:
        self.consumer.body_ended(StreamEnded(reason))


@attrs.define
class SentRequest:
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    answer: Deferred

    def respond(self, response: FakeResponse) -> FakeResponse:
        self.answer.callback(response)
        return response

    def refuse(self) -> None:
        self.answer.errback(ConnectionRefusedError("refused"))


@implementer(IUpstream)
class FakeUpstream:
    """An upstream that records every request and lets the test answer it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self._origin = f"{parts.scheme}://{parts.netloc}".encode("ascii")
        self.requests: list[SentRequest] = []
        self.cancelled: list[SentRequest] = []
        self.closed = False

    def request(self, method: bytes, target: bytes, headers: list, body: bytes) -> Deferred:
        assert isinstance(method, bytes) and isinstance(target, bytes) and target.startswith(b"/")
        assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in headers)
        recorded = Headers()
        for name, value in headers:
            recorded.addRawHeader(name, value)

        def cancel(d: Deferred) -> None:
            # Like the real client: the Deferred fails with CancelledError.
            self.cancelled.append(sent)

        sent = SentRequest(method, self._origin + target, recorded, body, Deferred(cancel))
        self.requests.append(sent)
        return sent.answer

    def close(self) -> Deferred:
        self.closed = True
        return Deferred.fromCoroutine(_nothing())

    @property
    def last(self) -> SentRequest:
        return self.requests[-1]


async def _nothing() -> None:
    return None


class DataPlaneAgent:
    """
    An C{IAgent} whose every connection is an in-memory pipe (C{iosim}) to
    a protocol of the gateway's own data plane: the production server side,
    driven by a real twisted.web client.
    """

    def __init__(self, server_factory, peer: str = "127.0.0.1") -> None:
        self._reactor = MemoryReactorClock()
        self._agent = Agent(self._reactor)
        self._server_factory = server_factory
        self._peer = peer
        self._pumps: set = set()
        self.server_protocols: list = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        answer = self._agent.request(method, uri, headers, bodyProducer)
        host, port, factory, timeout, bind = self._reactor.tcpClients[-1]
        server_address = IPv4Address("TCP", "127.0.0.1", port)
        client_address = IPv4Address("TCP", self._peer, 31337)
        server = self._server_factory.buildProtocol(client_address)
        self.server_protocols.append(server)
        server_transport = iosim.FakeTransport(server, isServer=True, hostAddress=server_address, peerAddress=client_address)
        client = factory.buildProtocol(None)
        client_transport = iosim.FakeTransport(client, isServer=False, hostAddress=client_address, peerAddress=server_address)
        self._pumps.add(iosim.connect(server, server_transport, client, client_transport))
        return answer

    def flush(self) -> None:
        pumps, self._pumps = self._pumps, set()
        for pump in pumps:
            pump.flush()
            if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                self._pumps.add(pump)


class ListSink:
    """A log sink that keeps each line as a decoded object."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def msg(self, line: str) -> None:
        self.lines.append(json.loads(line))


class Harness:
    """
    A whole gateway in memory: a L{Clock}, one L{FakeUpstream} per service,
    the in-memory rate limit store, the production data plane, and a treq
    client talking to it over in-memory connections.
    """

    def __init__(self, ini: str, environ: dict | None = None, spans=None) -> None:
        self.config = parse_config(ini, "test.ini", environ or {})
        self.clock = Clock()
        self.agents: dict[str, FakeUpstream] = {}
        self.endpoints: dict[str, FakeUpstream] = {}
        self.store = MemoryRateLimitStore(self.clock)
        self.log = structlog.get_logger("test")
        self.access = ListSink()
        self.gateway = build_gateway(
            self.config,
            self.clock,
            self._upstream_for,
            self.store,
            self.log,
            GatewayMetrics(self.clock),
            AccessLog(self.access),
            random.Random(7),
            spans=spans,
        )
        self.front = GatewayFront(self.gateway)
        self.server_factory = build_server_factory(self.front, self.clock, self.config.gateway.max_connections)
        self.agent = DataPlaneAgent(self.server_factory)
        self.client = HTTPClient(self.agent, data_to_body_producer=_SynchronousProducer)

    def _upstream_for(self, service, url: str) -> FakeUpstream:
        upstream = self.endpoints[url] = FakeUpstream(url)
        self.agents.setdefault(service.name, upstream)  # a service's first endpoint
        return upstream

    def request(self, method: str, path: str, **kwargs) -> Deferred:
        """Start a request; the returned Deferred fires once it is answered."""
        d = self.client.request(method, "http://gateway.test" + path, **kwargs)
        self.flush()
        return d

    def flush(self) -> None:
        self.agent.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()


def cyclic_garbage_of(run) -> list[str]:
    """
    The txgateway objects that only the garbage collector frees after
    C{run()} (once to warm up, then five times): the types of those in
    reference cycles, or reachable only from one.
    """
    import gc

    run()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            run()
        gc.collect()
        return [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("txgateway")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def result_of(d: Deferred):
    """The result of a Deferred that has already fired (unit tests never wait)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


#: A gateway on any port, logging nowhere, with a rate limit no test reaches by accident.
GATEWAY_HEAD = """
[gateway]
listen = tcp:0
[logging]
file =
[ratelimit]
requests = 1000
[responses]
store = memory
"""

SERVICE_INI = GATEWAY_HEAD + """[service:ai]
url = http://ai.backend:8000/v1
timeout = 10
idle_timeout = 5
[service:data]
url = http://data.backend:8001
"""


class FakeDate:
    def value(self) -> bytes:
        return b"Fri, 04 Dec 2026 12:00:00 GMT"


class FakeChannel:
    """The client's connection, as an L{IncomingRequest} writes to it."""

    date = FakeDate()

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.written: list[bytes] = []
        self.finished = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def answer_done(self, request) -> None:
        self.finished = True

    def abort_answer(self, request) -> None:
        self.aborted = True

    def body_released(self, length: int) -> None:
        pass

    def streaming(self, request) -> None:
        pass

    @property
    def body(self) -> bytes:
        head, _, body = b"".join(self.written).partition(b"\r\n\r\n")
        return body
