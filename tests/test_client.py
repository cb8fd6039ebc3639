"""
The upstream client byte by byte: L{UpstreamPool} on a
MemoryReactorClock, its connections on StringTransports, answers fed in
pieces, broken ones included.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tests.fakes import cyclic_garbage_of, result_of
from txgateway.dataplane.client import StreamEnded, UpstreamConnectionLost, UpstreamPool, UpstreamProtocolError


class Body:
    """An IBodyConsumer that records."""

    def __init__(self) -> None:
        self.control = None
        self.chunks: list[bytes] = []
        self.ended = False
        self.error = None

    def body_started(self, control) -> None:
        self.control = control

    def body_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def body_ended(self, error) -> None:
        self.ended = True
        self.error = error

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Backend:
    """The endpoint under test and the connections it opened."""

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", **kwargs) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(url, self.reactor, **kwargs)
        self.transports: list[StringTransport] = []
        self.protocols: list = []

    def accept(self):
        """Complete the newest connection attempt; returns its transport."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[len(self.transports)]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return transport

    def refuse(self) -> None:
        host, port, factory, timeout, bind = self.reactor.tcpClients[len(self.transports)]
        self.transports.append(None)
        self.protocols.append(None)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def answer(self, index: int, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocols[index].dataReceived(piece)

    def lose(self, index: int, reason=None) -> None:
        self.transports[index].disconnecting = True
        self.protocols[index].connectionLost(Failure(reason or ConnectionDone()))


def get(backend: Backend, method: bytes = b"GET", target: bytes = b"/v1/x", headers=None, body: bytes = b""):
    return backend.pool.request(method, target, headers or [(b"Accept", b"*/*")], body)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_the_request_goes_out_with_host_and_content_length_and_the_answer_comes_back():
    backend = Backend("http://127.0.0.1:8000/v1")
    d = get(backend, b"POST", b"/v1/chat", [(b"X-Request-ID", b"r1")], b'{"a":1}')
    transport = backend.accept()
    assert transport.value() == (
        b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nX-Request-ID: r1\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    )
    backend.answer(0, OK)
    response = result_of(d)
    assert (response.code, response.reason, response.length) == (200, b"OK", 5)
    assert response.header(b"content-type") == b"text/plain"
    body = Body()
    response.deliver_body(body)
    assert body.data == b"hello" and body.ended and body.error is None


def test_a_default_port_is_left_out_of_host():
    backend = Backend("http://127.0.0.1")
    get(backend)
    assert b"\r\nHost: 127.0.0.1\r\n" in backend.accept().value()


@pytest.mark.parametrize("split", range(1, len(OK)))
def test_an_answer_split_at_any_byte_is_the_same_answer(split):
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, OK[:split], OK[split:])
    body = Body()
    result_of(d).deliver_body(body)
    assert body.data == b"hello" and body.ended and body.error is None
    assert backend.pool.idle_connections == 1


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)


@pytest.mark.parametrize("split", range(1, len(CHUNKED), 3))
def test_chunk_extensions_and_trailers_are_understood_at_any_split(split):
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, CHUNKED[:split], CHUNKED[split:])
    response = result_of(d)
    assert response.length is None
    body = Body()
    response.deliver_body(body)
    assert body.data == b"hello world" and body.ended and body.error is None
    assert all(name.lower() != b"x-trailer" for name, _ in response.headers)


def test_a_kept_connection_serves_the_next_request():
    backend = Backend()
    first = get(backend)
    backend.accept()
    backend.answer(0, OK)
    result_of(first).deliver_body(Body())
    backend.transports[0].clear()
    second = get(backend, target=b"/v1/again")
    assert len(backend.reactor.tcpClients) == 1
    assert backend.transports[0].value().startswith(b"GET /v1/again HTTP/1.1\r\n")
    backend.answer(0, OK)
    assert result_of(second).code == 200


def test_an_answer_to_head_has_no_body_whatever_its_content_length_says():
    backend = Backend()
    d = get(backend, b"HEAD")
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    response = result_of(d)
    assert response.length == 1000
    body = Body()
    response.deliver_body(body)
    assert body.ended and body.error is None and body.data == b""
    # The connection is reused, with a parser that expects no HEAD body.
    again = get(backend)
    backend.answer(0, OK)
    body = Body()
    result_of(again).deliver_body(body)
    assert body.data == b"hello"


def test_interim_answers_are_skipped():
    backend = Backend()
    d = get(backend, b"POST", body=b"x")
    backend.accept()
    backend.answer(0, b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert result_of(d).code == 200


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_complete_with_their_headers(status):
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 %d Nothing\r\n\r\n" % status)
    response = result_of(d)
    body = Body()
    response.deliver_body(body)
    assert response.length == 0 and body.ended and body.error is None
    assert backend.pool.idle_connections == 1


def test_a_body_delimited_by_the_end_of_the_connection_is_complete_when_it_ends():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.0 200 OK\r\n\r\nall of", b" it")
    response = result_of(d)
    body = Body()
    response.deliver_body(body)
    assert not body.ended
    backend.lose(0)
    assert body.data == b"all of it" and body.ended and body.error is None
    assert backend.pool.idle_connections == 0


def test_a_connection_lost_mid_body_ends_it_with_an_error():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    body = Body()
    result_of(d).deliver_body(body)
    backend.lose(0, ConnectionLost())
    assert body.ended and isinstance(body.error, StreamEnded)
    assert body.data == b"half"


def test_garbage_from_the_backend_fails_the_request():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"THIS IS NOT HTTP\r\n\r\n")
    with pytest.raises(UpstreamProtocolError):
        result_of(d)
    assert backend.transports[0].disconnecting


def test_a_connection_lost_before_the_headers_fails_the_request():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Le")
    backend.lose(0, ConnectionLost())
    with pytest.raises(UpstreamConnectionLost):
        result_of(d)


def test_a_refused_connection_fails_the_request():
    backend = Backend()
    d = get(backend)
    backend.refuse()
    with pytest.raises(ConnectionRefusedError):
        result_of(d)


def test_a_pooled_connection_closed_as_it_is_reused_is_retried_once_on_a_fresh_one():
    backend = Backend()
    first = get(backend)
    backend.accept()
    backend.answer(0, OK)
    result_of(first).deliver_body(Body())
    second = get(backend)  # goes out on the pooled connection...
    backend.lose(0)  # ...which the backend had just closed: no byte of an answer came
    assert len(backend.reactor.tcpClients) == 2
    transport = backend.accept()
    assert transport.value().startswith(b"GET /v1/x HTTP/1.1\r\n")
    backend.answer(1, OK)
    assert result_of(second).code == 200


def test_a_fresh_connection_lost_before_an_answer_is_not_retried():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.lose(0)
    with pytest.raises(UpstreamConnectionLost):
        result_of(d)
    assert len(backend.reactor.tcpClients) == 1


def test_a_pooled_connection_that_answered_partly_is_not_retried():
    backend = Backend()
    first = get(backend)
    backend.accept()
    backend.answer(0, OK)
    result_of(first).deliver_body(Body())
    second = get(backend)
    backend.answer(0, b"HTTP/1.1 20")
    backend.lose(0, ConnectionLost())
    with pytest.raises(UpstreamConnectionLost):
        result_of(second)
    assert len(backend.reactor.tcpClients) == 1


def test_the_pool_keeps_at_most_max_idle_connections():
    backend = Backend(max_idle=1)
    pending = [get(backend), get(backend)]
    backend.accept()
    backend.accept()
    backend.answer(0, OK)
    backend.answer(1, OK)
    for d in pending:
        result_of(d).deliver_body(Body())
    assert backend.pool.idle_connections == 1
    assert [t.disconnecting for t in backend.transports] == [False, True]


def test_an_idle_connection_older_than_idle_seconds_is_not_reused():
    backend = Backend(idle_seconds=60)
    first = get(backend)
    backend.accept()
    backend.answer(0, OK)
    result_of(first).deliver_body(Body())
    backend.reactor.advance(61)
    get(backend)
    assert backend.transports[0].disconnecting
    assert len(backend.reactor.tcpClients) == 2


def test_a_backend_that_closes_after_answering_is_not_kept():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    result_of(d).deliver_body(Body())
    assert backend.pool.idle_connections == 0
    assert backend.transports[0].disconnecting


def test_cancelling_while_connecting_stops_the_attempt():
    backend = Backend()
    d = get(backend)
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    connector = backend.reactor.connectors[0]
    assert connector.stoppedConnecting


def test_cancelling_while_waiting_for_the_answer_drops_the_connection():
    backend = Backend()
    d = get(backend)
    backend.accept()
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert backend.transports[0].disconnected or backend.transports[0].disconnecting
    backend.lose(0)
    assert backend.pool.idle_connections == 0


def test_a_discarded_answer_whose_body_came_whole_keeps_its_connection():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    result_of(d).discard()
    assert backend.pool.idle_connections == 1


def test_a_discarded_answer_still_arriving_drops_its_connection():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 503 Busy\r\nContent-Length: 4000\r\n\r\nbusy")
    result_of(d).discard()
    assert backend.transports[0].disconnected or backend.transports[0].disconnecting
    assert backend.pool.idle_connections == 0


def test_body_flow_control_reaches_the_connection():
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
    body = Body()
    result_of(d).deliver_body(body)
    body.control.pauseProducing()
    assert backend.transports[0].producerState == "paused"
    body.control.resumeProducing()
    assert backend.transports[0].producerState == "producing"
    body.control.stopProducing()
    assert backend.transports[0].disconnected or backend.transports[0].disconnecting


def test_an_https_url_speaks_tls_and_names_its_host():
    from twisted.internet.address import IPv4Address

    backend = Backend("https://backend.example:8443")

    class Resolver:
        def resolveHostName(self, receiver, host, port=0, *args, **kwargs):
            receiver.resolutionBegan(None)
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", port))
            receiver.resolutionComplete()

    backend.reactor.nameResolver = Resolver()
    get(backend)
    host, port, factory, timeout, bind = backend.reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8443)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    hello = transport.value()
    assert hello[:2] == b"\x16\x03"  # a TLS handshake record: the ClientHello
    assert b"backend.example" in hello  # with the name the certificate must carry (SNI)


def test_a_name_is_resolved_and_its_addresses_tried_in_turn_without_waiting_after_a_refusal():
    from twisted.internet.address import IPv4Address, IPv6Address

    backend = Backend("http://backend.example:8000")

    class Resolver:
        def resolveHostName(self, receiver, host, port=0, *args, **kwargs):
            receiver.resolutionBegan(None)
            receiver.addressResolved(IPv6Address("TCP", "::1", port))
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", port))
            receiver.resolutionComplete()

    backend.reactor.nameResolver = Resolver()
    d = get(backend)
    assert [client[:2] for client in backend.reactor.tcpClients] == [("::1", 8000)]
    backend.refuse()  # ::1 refuses at once: 127.0.0.1 is tried now, not 0.3 s later
    assert [client[:2] for client in backend.reactor.tcpClients] == [("::1", 8000), ("127.0.0.1", 8000)]
    backend.accept()
    backend.answer(1, OK)
    assert result_of(d).code == 200
    assert b"\r\nHost: backend.example:8000\r\n" in backend.transports[1].value()


ANSWERS = [OK, CHUNKED, b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n" + OK]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ANSWERS), st.lists(st.integers(min_value=1, max_value=200), max_size=12))
def test_random_splits_of_valid_answers_give_the_same_answer(answer, cuts):
    backend = Backend()
    d = get(backend)
    backend.accept()
    pieces, rest = [], answer
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    backend.answer(0, *[p for p in pieces if p])
    body = Body()
    result_of(d).deliver_body(body)
    assert body.ended and body.error is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_no_bytes_from_a_backend_raise_out_of_the_client(data, then_lose):
    backend = Backend()
    d = get(backend)
    backend.accept()
    backend.answer(0, data)
    if then_lose:
        backend.lose(0, ConnectionLost())
    outcome = []
    d.addBoth(outcome.append)
    if outcome and not isinstance(outcome[0], Failure):
        outcome[0].deliver_body(Body())
    elif outcome:
        assert outcome[0].check(UpstreamProtocolError, UpstreamConnectionLost)


def test_an_exchange_leaves_no_reference_cycle_behind():
    from twisted.internet.task import Clock

    from txgateway.dataplane.relay import BodyRelay

    class Request:
        def write(self, data): pass
        def register_producer(self, producer): pass
        def unregister_producer(self): pass

    backend = Backend()

    def one():
        d = get(backend)
        if not backend.transports:
            backend.accept()
        backend.answer(0, OK)
        relay = BodyRelay(Request(), Clock(), 5.0)
        result_of(d).deliver_body(relay)
        assert result_of(relay.done) is None

    assert cyclic_garbage_of(one) == []


def test_an_answered_request_is_not_held_while_its_answer_streams():
    # A stream lasts minutes and its request (a prompt of tens of KB) can never be
    # sent again once its answer began: the exchange lets go of its bytes.
    import tracemalloc

    backend = Backend()
    body = b"x" * 1_000_000
    tracemalloc.start()
    try:
        answered = get(backend, b"POST", body=body)
        backend.accept()
        backend.transports[0].clear()  # the bytes the "backend" read
        holding = tracemalloc.get_traced_memory()[0]
        backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        let_go = holding - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    response = result_of(answered)
    assert response.code == 200
    assert let_go > 900_000


def test_an_answers_headers_once_relayed_are_let_go_but_its_content_type():
    # How an answer cut short is ended depends on its content type; the rest of
    # its headers are not held, by the answer or by its connection, while it streams.
    import tracemalloc

    backend = Backend()
    answered = get(backend)
    backend.accept()
    many = b"".join(b"X-Backend-%d: %s\r\n" % (n, b"v" * 2000) for n in range(20))
    tracemalloc.start()
    try:
        backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + many + b"Transfer-Encoding: chunked\r\n\r\n")
        response = result_of(answered)
        holding = tracemalloc.get_traced_memory()[0]
        response.head_relayed()
        let_go = holding - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert response.headers == [(b"content-type", b"text/event-stream")]
    assert response.header(b"content-type") == b"text/event-stream"
    assert let_go > 38_000


def test_a_streams_exchange_lets_go_of_the_deferred_that_told_its_answer():
    # A stream lasts minutes: what waited for its head is not held by its exchange after.
    import gc
    import weakref

    backend = Backend()
    answered = get(backend)
    told = weakref.ref(answered)
    backend.accept()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    response = result_of(answered)
    del answered
    gc.collect()
    assert told() is None
    assert response.code == 200


def test_connections_parsers_share_their_callbacks():
    # A thousand open streams would otherwise hold six bound methods each, twice.
    import gc
    import inspect

    backend = Backend()
    get(backend), get(backend)
    backend.accept(), backend.accept()
    connections = backend.protocols
    held = [[r for r in gc.get_referents(connection._parser) if inspect.ismethod(r)] for connection in connections]
    assert len(held[0]) == 6
    assert [id(method) for method in held[0]] == [id(method) for method in held[1]]


def test_an_answer_relayed_while_another_connection_parses_leaves_each_connection_its_own():
    # Every connection's parser calls one shared object, told whose bytes it parses: a
    # chunk relayed from inside one connection's parse may set another one parsing.
    backend = Backend()
    first_answer, second_answer = get(backend), get(backend)
    backend.accept()
    backend.accept()
    backend.answer(1, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
    second = Body()
    result_of(second_answer).deliver_body(second)

    class ParsesAnotherOnItsFirstChunk(Body):
        def body_received(self, data: bytes) -> None:
            super().body_received(data)
            if len(self.chunks) == 1:
                backend.answer(1, b"3\r\ntwo\r\n0\r\n\r\n")

    first = ParsesAnotherOnItsFirstChunk()
    backend.answer(0, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
    response = result_of(first_answer)
    response.deliver_body(first)
    backend.answer(0, b"3\r\none\r\n5\r\nthree\r\n0\r\n\r\n")
    assert (first.data, first.ended, first.error) == (b"onethree", True, None)
    assert (second.data, second.ended, second.error) == (b"two", True, None)


def test_a_plain_connections_reads_reach_it_with_no_protocol_between():
    # Twisted's endpoint would wrap each connection in a protocol that forwards every read.
    from txgateway.dataplane.client import _UpstreamConnection

    backend = Backend()
    answered = get(backend)
    transport = backend.accept()
    assert type(backend.protocols[0]) is _UpstreamConnection
    assert transport.value().startswith(b"GET /v1/x HTTP/1.1\r\n")  # told it was made: the request went
    backend.answer(0, OK)
    assert result_of(answered).code == 200
