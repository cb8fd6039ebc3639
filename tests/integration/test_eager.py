"""Eager writes on real loopback TCP connections: at once when nothing waits, in order always."""

from __future__ import annotations

import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from txgateway.dataplane.eager import writer_for

pytestmark = pytest.mark.integration


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.got: defer.Deferred | None = None
        self.expected = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.got is not None and len(self.received) >= self.expected:
            got, self.got = self.got, None
            got.callback(self.received)

    def wait_for(self, size: int) -> defer.Deferred:
        self.expected = size
        self.got = defer.Deferred()
        if len(self.received) >= size:
            self.dataReceived(b"")
        return self.got


@pytest_twisted.ensureDeferred
async def test_an_empty_buffer_sends_at_once_and_a_busy_one_keeps_the_order():
    server_side: list[Collect] = []

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            server_side.append(Collect())
            return server_side[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    try:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol())
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            write = writer_for(client.transport)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert write is not client.transport.write  # the eager path is there on this Twisted
        assert held < 160  # a connection holds it as long as it lasts (a closure was 350 bytes)
        write(b"first")
        assert client.transport.dataBuffer == b"" and not client.transport._tempDataBuffer  # sent, not buffered
        client.transport.write(b"-queued-")  # Twisted's buffer now holds bytes...
        write(b"last")  # ...so this one must wait behind them
        while not server_side:
            await defer.succeed(None)
            await deferLater(0.01)
        assert await server_side[0].wait_for(17) == b"first-queued-last"
        client.transport.loseConnection()
    finally:
        await port.stopListening()


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
