"""
In-memory stand-ins for unit tests: an agent whose every request the test
answers by hand, and responses whose body the test pushes chunk by chunk.
Integration tests use real sockets instead.
"""

from __future__ import annotations

import random

import attrs
import structlog
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse, UNKNOWN_LENGTH
from treq.testing import StubTreq
from zope.interface import implementer

from txgateway.app import GatewayRoot
from txgateway.config import parse_config
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.service import build_gateway


class FakeBodyTransport:
    """The push producer a response body protocol is connected to."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """
    A backend response; the test feeds its body with L{send}, L{finish}
    and L{fail} once the gateway has asked for it.
    """

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, code: int = 200, headers: dict | None = None, body: bytes | None = None) -> None:
        self.code = code
        self.phrase = b"Fine" if code < 400 else b"Trouble"
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = len(body) if body is not None else UNKNOWN_LENGTH
        self._body = body
        self.protocol = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self._body is not None and not self.transport.stopped:
            self.send(self._body)
            self.finish()
        elif self.transport.stopped:
            protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("stopped"))])))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, reason: str = "connection reset") -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception(reason))])))

    def setPreviousResponse(self, response) -> None:
        pass


@attrs.define
class SentRequest:
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes | None
    answer: Deferred

    def respond(self, response: FakeResponse) -> FakeResponse:
        self.answer.callback(response)
        return response

    def refuse(self) -> None:
        self.answer.errback(ConnectionRefusedError("refused"))


@implementer(IAgent)
class FakeAgent:
    """An agent that records every request and lets the test answer it."""

    def __init__(self) -> None:
        self.requests: list[SentRequest] = []
        self.cancelled: list[SentRequest] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        body = None
        if bodyProducer is not None:
            chunks = []

            class Consumer:
                def write(self, data):
                    chunks.append(data)

            bodyProducer.startProducing(Consumer())
            body = b"".join(chunks)
        def cancel(d: Deferred) -> None:
            # Like twisted.web.client.Agent: a cancelled request fails with
            # ResponseNeverReceived wrapping the CancelledError.
            self.cancelled.append(sent)
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))

        sent = SentRequest(method, uri, headers, body, Deferred(cancel))
        self.requests.append(sent)
        return sent.answer

    @property
    def last(self) -> SentRequest:
        return self.requests[-1]


class Harness:
    """
    A whole gateway in memory: a L{Clock}, one L{FakeAgent} per service,
    the in-memory rate limit store, and a treq client talking to it.
    """

    def __init__(self, ini: str, environ: dict | None = None) -> None:
        self.config = parse_config(ini, "test.ini", environ or {})
        self.clock = Clock()
        self.agents: dict[str, FakeAgent] = {}
        self.store = MemoryRateLimitStore(self.clock)
        self.log = structlog.get_logger("test")
        self.gateway = build_gateway(
            self.config, self.clock, self._agent_for, self.store, self.log, random.Random(7)
        )
        self.client = StubTreq(GatewayRoot(self.gateway))

    def _agent_for(self, service) -> FakeAgent:
        agent = self.agents[service.name] = FakeAgent()
        return agent

    def request(self, method: str, path: str, **kwargs) -> Deferred:
        """Start a request; the returned Deferred fires once it is answered."""
        d = self.client.request(method, "http://gateway.test" + path, **kwargs)
        self.client.flush()
        return d

    def flush(self) -> None:
        self.client.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.client.flush()


def result_of(d: Deferred):
    """The result of a Deferred that has already fired (unit tests never wait)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


SERVICE_INI = """
[gateway]
listen = tcp:0
[logging]
file =
[ratelimit]
requests = 1000
[service:ai]
url = http://ai.backend:8000/v1
timeout = 10
idle_timeout = 5
[service:data]
url = http://data.backend:8001
"""
