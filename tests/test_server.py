"""
The data plane's server side byte by byte: the production protocol on a
StringTransport and a Clock, fed raw requests, hostile ones included.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.fakes import SERVICE_INI, FakeChannel, FakeResponse, Harness


class HalfClosableTransport(StringTransport):
    """A StringTransport that, like TCP, can close its writing side only."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Connection:
    def __init__(self, ini: str = SERVICE_INI) -> None:
        self.harness = Harness(ini)
        self.clock = self.harness.clock
        self.channel = self.harness.server_factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5555))
        self.transport = HalfClosableTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 5555))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.channel.dataReceived(data)
        return self.transport.value()

    @property
    def closing(self) -> bool:
        """The gateway is done answering: its side is closed or closing."""
        return self.transport.write_closed or self.transport.disconnecting

    def answer(self) -> tuple[int, dict, bytes]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.decode().lower(): v.decode() for k, v in (line.split(b": ", 1) for line in lines[1:])}
        return status, headers, body


def json_error(connection: Connection, status: int) -> dict:
    code, headers, body = connection.answer()
    assert code == status
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["request_id"] == headers["x-request-id"]
    return error


@pytest.mark.parametrize(
    "raw",
    [
        b"HELLO\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_a_malformed_request_gets_a_json_400_and_the_connection_closes(raw):
    connection = Connection()
    connection.send(raw)
    assert json_error(connection, 400)["type"] == "bad_request"
    assert connection.closing
    assert connection.harness.agents["ai"].requests == []


def test_an_overlong_header_line_gets_a_json_431():
    connection = Connection()
    connection.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert json_error(connection, 431)["type"] == "header_too_large"
    assert connection.closing


def test_too_many_header_bytes_in_all_get_a_json_error():
    connection = Connection()
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 1000) for n in range(20))
    connection.send(b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert json_error(connection, 400)["type"] == "bad_request"


def test_a_declared_body_over_the_limit_is_refused_before_it_arrives():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: big-1\r\nContent-Length: 101\r\n\r\n")
    error = json_error(connection, 413)
    assert error == {"type": "body_too_large", "message": "the request body is larger than 100 bytes", "request_id": "big-1"}
    assert connection.closing
    connection.send(b"x" * 101)
    assert connection.harness.agents["ai"].requests == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_of_exactly_max_body_size_is_accepted_and_sent_on_whole(framing):
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    body = b"x" * 100
    if framing == "length":
        connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + body)
    else:
        connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + body + b"\r\n0\r\n\r\n")
    assert connection.transport.value() == b""  # no refusal
    [sent] = connection.harness.agents["ai"].requests
    assert sent.body == body


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.send(b"64\r\n" + b"x" * 100 + b"\r\n")
    assert connection.transport.value() == b""
    connection.send(b"1\r\nx\r\n0\r\n\r\n")
    assert json_error(connection, 413)["type"] == "body_too_large"
    assert connection.harness.agents["ai"].requests == []
    assert connection.transport.value().count(b"HTTP/1.1") == 1


def test_an_expect_continue_request_over_the_limit_gets_413_not_100():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert connection.transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in connection.transport.value()


def test_headers_trickled_slower_than_header_timeout_get_408():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nheader_timeout = 10\n"))
    connection.send(b"GET /health HTTP/1.1\r\n")
    for _ in range(9):
        connection.clock.advance(1)
        connection.send(b"X-Slow: 1\r\n")
    assert connection.transport.value() == b""
    connection.clock.advance(1)
    assert json_error(connection, 408)["type"] == "request_timeout"
    assert connection.closing


def test_an_idle_connection_is_closed_after_client_idle_timeout():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nclient_idle_timeout = 30\n"))
    connection.clock.advance(29.9)
    assert not connection.closing
    connection.clock.advance(0.1)
    assert connection.closing


def test_a_keep_alive_connection_serves_the_next_request_after_the_header_deadline_was_met():
    connection = Connection()
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.transport.value().startswith(b"HTTP/1.1 200 ")
    connection.transport.clear()
    connection.clock.advance(25)  # idle between requests: not the header deadline
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.transport.value().startswith(b"HTTP/1.1 200 ")


def test_an_absolute_form_target_is_routed_by_its_path_and_never_to_its_host():
    connection = Connection()
    connection.send(b"GET http://evil.example/api/ai/models?x=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert connection.harness.agents["ai"].last.uri == b"http://ai.backend:8000/v1/models?x=1"


def test_an_injected_request_id_is_replaced():
    connection = Connection()
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\"b,c: d\r\n\r\n")
    status, headers, _ = connection.answer()
    assert status == 200
    assert len(headers["x-request-id"]) == 36


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_no_bytes_crash_the_channel(data):
    connection = Connection()
    connection.send(data)
    if connection.closing:
        connection.clock.advance(30)
        connection.channel.connectionLost(Failure(ConnectionDone()))
    connection.clock.advance(100)
    out = connection.transport.value()
    assert out == b"" or out.startswith(b"HTTP/1.")


def test_after_a_refusal_the_rest_of_the_body_is_read_and_dropped_until_the_client_stops():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    assert connection.transport.write_closed and not connection.transport.disconnecting
    answered = connection.transport.value()
    for _ in range(10):  # the client goes on sending its body for 15 s
        connection.clock.advance(1.5)
        connection.send(b"x" * 10000)
    assert connection.transport.value() == answered  # nothing more is said
    assert not connection.transport.disconnecting
    connection.clock.advance(2)  # silent for LINGER_IDLE: now it closes
    assert connection.transport.disconnecting


def test_lingering_ends_after_linger_total_whatever_the_client_does():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_body_size = 100\n"))
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    for _ in range(29):
        connection.clock.advance(1)
        connection.send(b"x" * 1000)
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert connection.transport.disconnecting
    connection.channel.connectionLost(Failure(ConnectionDone()))
    assert [call for call in connection.clock.getDelayedCalls() if call.active() and "linger" in repr(call.func)] == []


def test_a_method_the_parser_does_not_know_gets_a_json_501():
    connection = Connection()
    connection.send(b"BREW /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json_error(connection, 501)["type"] == "not_implemented"
    assert connection.closing
    assert connection.harness.agents["ai"].requests == []


# -- the protocol's framing and order


def answers(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Every answer on the wire, in order (bodies by Content-Length or chunked)."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.decode().lower(): v.decode() for k, v in (line.split(b": ", 1) for line in lines[1:])}
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, raw = rest[:size], rest[size:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    raw = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
        else:
            body, raw = rest, b""
        found.append((status, headers, body))
    return found


def test_pipelined_requests_are_answered_in_order():
    connection = Connection()
    connection.send(
        b"GET /api/ai/first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/ai/third HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    upstream = connection.harness.agents["ai"]
    assert [r.uri for r in upstream.requests] == [b"http://ai.backend:8000/v1/first"]  # one at a time
    assert connection.transport.value() == b""
    upstream.last.respond(FakeResponse(200, {}, b"one"))
    assert [r.uri.rsplit(b"/", 1)[1] for r in upstream.requests] == [b"first", b"third"]
    upstream.last.respond(FakeResponse(201, {}, b"three"))
    got = answers(connection.transport.value())
    assert [(status, body) for status, _, body in got] == [(200, b"one"), (200, b'{"status": "alive"}'), (201, b"three")]
    assert not connection.closing


REQUEST = b"POST /api/ai/x?q=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: split-1\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("split", range(1, len(REQUEST)))
def test_a_request_split_at_any_byte_is_the_same_request(split):
    connection = Connection()
    connection.send(REQUEST[:split])
    connection.send(REQUEST[split:])
    sent = connection.harness.agents["ai"].last
    assert (sent.method, sent.uri, sent.body) == (b"POST", b"http://ai.backend:8000/v1/x?q=1", b"hello")
    assert sent.headers.getRawHeaders(b"x-request-id") == [b"split-1"]


def test_a_chunked_body_with_extensions_and_trailers_arrives_whole():
    connection = Connection()
    connection.send(
        b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    sent = connection.harness.agents["ai"].last
    assert sent.body == b"hello world"
    assert not sent.headers.hasHeader(b"x-trailer")
    assert not sent.headers.hasHeader(b"transfer-encoding")


def test_expect_100_continue_gets_its_interim_answer_before_the_body():
    connection = Connection()
    connection.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert connection.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    connection.send(b"ok")
    sent = connection.harness.agents["ai"].last
    assert sent.body == b"ok"
    assert not sent.headers.hasHeader(b"expect")


def test_an_answer_to_head_has_headers_only_with_the_backends_length():
    connection = Connection()
    connection.send(b"HEAD /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.harness.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/plain"}, b""))
    raw = connection.transport.value()
    assert raw.endswith(b"\r\n\r\n")
    assert b"Content-Length: 0\r\n" in raw
    connection.transport.clear()
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
    assert connection.transport.value().startswith(b"HTTP/1.1 200 ")


def test_a_stream_to_an_http10_client_ends_with_the_connection():
    connection = Connection()
    connection.send(b"GET /api/ai/stream HTTP/1.0\r\nHost: x\r\n\r\n")
    response = connection.harness.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    response.send(b"data: 1\n\n")
    response.finish()
    raw = connection.transport.value()
    assert b"Transfer-Encoding" not in raw and b"Connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\ndata: 1\n\n")
    assert connection.transport.disconnecting


def test_a_stream_to_an_http11_client_is_chunked_and_the_connection_stays():
    connection = Connection()
    connection.send(b"GET /api/ai/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    response = connection.harness.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    assert connection.transport.value() == b""  # the commit point: held until the first byte
    response.send(b"data: 1\n\n")
    assert b"Transfer-Encoding: chunked\r\n\r\n" in connection.transport.value()
    response.finish()
    [(status, headers, body)] = answers(connection.transport.value())
    assert body == b"data: 1\n\n"
    assert not connection.closing


def test_connection_close_from_the_client_closes_after_the_answer():
    connection = Connection()
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Connection: close\r\n" in connection.transport.value()
    assert connection.transport.disconnecting


def test_an_upgrade_request_is_answered_then_the_connection_closes():
    connection = Connection()
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nfollowing bytes")
    assert connection.transport.value().startswith(b"HTTP/1.1 200 ")
    assert connection.transport.disconnecting


def test_a_refused_pipelined_request_is_answered_after_the_ones_before_it():
    connection = Connection()
    connection.send(b"GET /api/ai/first HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nBad Header\r\n\r\n")
    assert connection.transport.value() == b""
    connection.harness.agents["ai"].last.respond(FakeResponse(200, {}, b"one"))
    got = answers(connection.transport.value())
    assert [status for status, _, _ in got] == [200, 400]
    assert json.loads(got[1][2])["error"]["type"] == "bad_request"
    assert connection.closing


def test_a_long_pipeline_pauses_reading_until_it_shortens():
    connection = Connection()
    connection.send(b"GET /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n" * 12)
    assert connection.transport.producerState == "paused"
    upstream = connection.harness.agents["ai"]
    while connection.transport.producerState == "paused":
        upstream.last.respond(FakeResponse(200, {}, b"ok"))
    assert len(upstream.requests) < 12


def test_an_answer_in_progress_is_not_idleness():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nclient_idle_timeout = 30\n"))
    connection.send(b"GET /api/ai/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.clock.advance(9)  # the backend takes its time (its timeout is 10 s)
    assert not connection.closing
    connection.harness.agents["ai"].last.respond(FakeResponse(200, {}, b"late"))
    connection.clock.advance(29.9)
    assert not connection.closing
    connection.clock.advance(0.2)
    assert connection.closing


def test_every_status_the_gateway_writes_has_its_reason_phrase():
    connection = Connection(SERVICE_INI.replace("requests = 1000", "requests = 1"))
    connection.send(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.send(b"GET /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.harness.agents["ai"].last.respond(FakeResponse(200, {}, b"ok"))
    connection.transport.clear()
    connection.send(b"GET /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")


def test_pipelined_requests_before_an_upgrade_are_all_answered_then_it_closes():
    connection = Connection()
    connection.send(
        b"GET /api/ai/first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/ai/second HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    upstream = connection.harness.agents["ai"]
    upstream.last.respond(FakeResponse(200, {}, b"one"))
    assert not connection.closing
    upstream.last.respond(FakeResponse(200, {}, b"two"))
    got = answers(connection.transport.value())
    assert [body for _, _, body in got] == [b"one", b"two", b'{"status": "alive"}']
    assert got[-1][1]["connection"] == "close"
    assert connection.transport.disconnecting


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"]))
def test_every_answer_to_hostile_bytes_is_http_and_every_refusal_the_json_shape(data, before):
    connection = Connection()
    connection.send(before + data)
    connection.clock.advance(100)
    out = connection.transport.value()
    if not out:
        return
    assert out.startswith(b"HTTP/1.1 ")
    for status, headers, body in answers(out):
        if status >= 400:
            assert headers["content-type"] == "application/json"
            error = json.loads(body)["error"]
            assert error["request_id"] == headers["x-request-id"]
            assert set(error) == {"type", "message", "request_id"}


PIPELINE = (
    b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    b"HEAD /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE)), max_size=10))
def test_a_pipeline_split_anywhere_gets_the_same_answers_in_order(cuts):
    connection = Connection()
    position = 0
    for cut in sorted(set(cuts)):
        connection.send(PIPELINE[position:cut])
        position = cut
    connection.send(PIPELINE[position:])
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", connection.transport.value())
    assert statuses == [b"200", b"405", b"200", b"404"]  # HEAD's answer has no body


@pytest.mark.parametrize("raw", [b"HEAD /health/live HTTP/1.1\r\nHost: x\r\n\r\n", PIPELINE])
def test_admin_answers_leave_twisted_web_no_error_to_log(raw):
    from twisted.logger import globalLogPublisher

    failures = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        connection = Connection()
        connection.send(raw)
        assert connection.transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []


# -- the request bodies held across every connection ----------------------------------

BUSY_INI = SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_bodies_in_flight = 100\n")


def second_connection(first: Connection) -> Connection:
    """Another client connection to the same gateway as C{first}."""
    other = Connection.__new__(Connection)
    other.harness = first.harness
    other.clock = first.clock
    other.channel = first.harness.server_factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 5556))
    other.transport = HalfClosableTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 5556))
    other.channel.makeConnection(other.transport)
    return other


def test_a_body_past_what_all_connections_may_hold_is_503_before_it_arrives():
    first = Connection(BUSY_INI)
    first.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"x" * 80)  # still arriving
    second = second_connection(first)
    second.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
    error = json_error(second, 503)
    assert error["type"] == "gateway_busy" and "(100)" in error["message"]
    assert second.closing


def test_a_chunked_body_that_fills_what_all_may_hold_is_503_as_it_arrives():
    first = Connection(BUSY_INI)
    first.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"x" * 80)
    second = second_connection(first)
    second.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\n" + b"y" * 30 + b"\r\n")
    assert json_error(second, 503)["type"] == "gateway_busy"


def test_the_bytes_a_connection_held_come_back_when_it_goes_and_when_its_request_ends():
    first = Connection(BUSY_INI)
    factory = first.harness.server_factory
    first.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"x" * 80)
    assert factory.bodies_held == 80
    first.channel.connectionLost(Failure(ConnectionDone()))
    assert factory.bodies_held == 0
    second = second_connection(first)
    second.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"z" * 90)
    assert factory.bodies_held == 90  # held while its request is answered
    first.harness.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/plain"}, b"ok"))
    assert factory.bodies_held == 0
    third = second_connection(first)
    third.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"w" * 90)
    assert third.transport.value() == b""  # no refusal: everything came back


FULL_INI = SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_connections = 2\n")
HELD = b"GET /api/ai/x HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_connection_past_max_connections_is_answered_503_with_its_own_request_id_and_closed():
    first = Connection(FULL_INI)
    first.send(HELD)
    second = second_connection(first)
    second.send(HELD)
    third = second_connection(first)
    third.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine-1\r\nContent-Length: 2\r\n\r\nhi")
    error = json_error(third, 503)
    assert error["type"] == "gateway_busy" and error["request_id"] == "mine-1"
    assert "max_connections" in error["message"] and "(2," in error["message"]
    assert third.answer()[1]["retry-after"] == "1" and third.answer()[1]["connection"] == "close"
    assert third.closing
    assert len(first.harness.agents["ai"].requests) == 2  # the two served; the third never reached it
    assert first.harness.server_factory.serving == 2


def test_a_bodiless_request_past_the_limit_has_its_connection_closed_at_once_and_one_with_a_body_lingers():
    first = Connection(FULL_INI)
    second_connection(first)
    bodiless = second_connection(first)
    bodiless.send(HELD)
    assert json_error(bodiless, 503)["type"] == "gateway_busy"
    assert bodiless.transport.disconnecting and not bodiless.transport.write_closed  # its descriptor back at once
    uploading = second_connection(first)
    uploading.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert json_error(uploading, 503)["type"] == "gateway_busy"
    # Its body may still be coming: half-closed, read and dropped, so that the client reads its answer.
    assert uploading.transport.write_closed and not uploading.transport.disconnecting


def test_a_connection_past_the_limit_that_sends_nothing_is_refused_within_two_seconds():
    first = Connection(FULL_INI)
    second_connection(first)
    third = second_connection(first)
    first.clock.advance(1.9)
    assert third.transport.value() == b""
    first.clock.advance(0.1)
    assert json_error(third, 503)["type"] == "gateway_busy" and third.closing


@pytest.mark.parametrize("path", [b"/health", b"/health/live", b"/health/ready", b"/metrics", b"/status.json?x=1"])
def test_a_probe_past_the_limit_is_answered_all_the_same_and_its_connection_closed(path):
    first = Connection(FULL_INI)
    second_connection(first)
    probe = second_connection(first)
    probe.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = probe.answer()
    assert status != 503 and b"gateway_busy" not in body  # its route's answer (here 404 where it is off)
    assert status == 200 or path in (b"/metrics", b"/status.json?x=1")
    assert headers["connection"] == "close"
    assert probe.transport.disconnecting  # one request, then its descriptor back
    assert first.harness.server_factory.serving == 2  # never counted


def test_the_reads_answered_past_the_limit_are_the_operators_klein_routes_of_probes_scrape_and_status():
    from txgateway.front.door import OPERATOR_READS

    # Read from the routes themselves: every GET of them without an argument, nothing else (not /spend.json, not /admin).
    assert OPERATOR_READS == frozenset({b"/health", b"/health/live", b"/health/ready", b"/metrics", b"/status", b"/status.json"})


@pytest.mark.parametrize("request_bytes", [
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",  # not a read
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",  # a body may come
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # not an operator's path
    b"GET /api/ai/health HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_past_the_limit_only_the_operators_bodiless_reads_are_answered(request_bytes):
    first = Connection(FULL_INI)
    second_connection(first)
    refused = second_connection(first)
    refused.send(request_bytes)
    assert json_error(refused, 503)["type"] == "gateway_busy"
    assert first.harness.agents["ai"].requests == []


def test_a_request_pipelined_after_a_probe_past_the_limit_never_reaches_a_backend():
    first = Connection(FULL_INI)
    second_connection(first)
    probe = second_connection(first)
    probe.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + HELD + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = probe.transport.value()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1  # nothing after Connection: close
    assert probe.closing
    assert first.harness.agents["ai"].requests == []


def test_what_is_pipelined_after_an_answer_that_closes_the_connection_is_not_served():
    connection = Connection()
    connection.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + HELD)
    answer = connection.transport.value()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    assert connection.closing
    assert connection.harness.agents["ai"].requests == []


def test_a_probe_on_a_served_connection_keeps_it_open():
    first = Connection(FULL_INI)
    first.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = first.answer()
    assert status == 200 and "connection" not in headers and not first.closing


def test_a_served_connection_that_closes_makes_room_and_a_refused_one_takes_none():
    first = Connection(FULL_INI)
    factory = first.harness.server_factory
    second_connection(first)
    refused = second_connection(first)
    refused.send(HELD)
    refused.channel.connectionLost(Failure(ConnectionDone()))
    assert factory.serving == 2  # a refused connection was never counted, nor uncounted
    first.channel.connectionLost(Failure(ConnectionDone()))
    assert factory.serving == 1
    fourth = second_connection(first)
    fourth.send(HELD)
    assert fourth.transport.value() == b"" and factory.serving == 2
    assert len(first.harness.agents["ai"].requests) == 1


def test_the_full_limit_is_logged_once_until_the_connections_fall_well_below_it():
    from structlog.testing import capture_logs

    connections = [Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nmax_connections = 10\n"))]
    with capture_logs() as logs:
        connections += [second_connection(connections[0]) for _ in range(11)]  # the 11th and 12th are refused
        for connection in connections[:2]:
            connection.channel.connectionLost(Failure(ConnectionDone()))  # 9: not below nine tenths yet
        connections.append(second_connection(connections[0]))  # served
        connections.append(second_connection(connections[0]))  # refused: not logged again
        for connection in connections[2:4]:
            connection.channel.connectionLost(Failure(ConnectionDone()))  # 8: below nine tenths
        for _ in range(3):
            connections.append(second_connection(connections[0]))  # 2 served, then full again: logged
    events = [(line["event"], line.get("serving")) for line in logs if line["event"].startswith("client_connections")]
    assert events == [("client_connections_full", None), ("client_connections_below_limit", 8), ("client_connections_full", None)]


def test_a_gateway_busy_refusal_of_bodies_asks_for_a_retry_after_a_second():
    first = Connection(BUSY_INI)
    first.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"x" * 80)
    second = second_connection(first)
    second.send(b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
    assert second.answer()[1]["retry-after"] == "1"


def test_queued_pipelined_bodies_come_back_when_the_connection_goes():
    first = Connection(BUSY_INI)
    factory = first.harness.server_factory
    request = b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"q" * 20
    first.send(request * 3)  # one answered now, two queued behind it
    assert factory.bodies_held == 60
    first.channel.connectionLost(Failure(ConnectionDone()))
    assert factory.bodies_held == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.booleans()), min_size=1, max_size=5), st.integers(0, 400), st.booleans())
def test_whatever_a_connection_did_its_bytes_all_come_back_when_it_goes(requests, cut_at, answer_first):
    connection = Connection(BUSY_INI.replace("max_bodies_in_flight = 100", "max_bodies_in_flight = 1000"))
    factory = connection.harness.server_factory
    raw = b"".join(
        (b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % size + b"b" * size + b"\r\n0\r\n\r\n")
        if chunked and size else (b"POST /api/ai/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size)
        for size, chunked in requests
    )
    connection.send(raw[:cut_at])
    upstream = connection.harness.agents.get("ai")
    if answer_first and upstream is not None and upstream.requests:
        upstream.last.respond(FakeResponse(200, {b"content-type": b"text/plain"}, b"ok"))
    connection.channel.connectionLost(Failure(ConnectionDone()))
    assert factory.bodies_held == 0


def a_stream_started(body: bytes = b'{"prompt": "' + b"context " * 2000 + b'"}'):
    from txgateway.dataplane.server import IncomingRequest

    channel = FakeChannel()
    request = IncomingRequest(channel, b"POST", b"/api/ai/v1/completions", [(b"Host", b"gateway"), (b"User-Agent", b"agent")], body)
    assert request.header(b"user-agent") == b"agent"
    request.set_header(b"X-Request-ID", b"req-1")
    request.start(200, None, [(b"Content-Type", b"text/event-stream"), (b"X-Request-ID", b"backend's")])
    request.send_head()
    return request, channel


def test_a_started_answer_lets_go_of_the_request_body():
    # A stream lasts minutes: its prompt (tens of KB) is not held that long,
    # as nothing sends the request again once its answer started.
    request, _ = a_stream_started()
    assert request.body == b""


def test_the_gateways_own_headers_win_in_the_head_and_one_set_too_late_is_not_written():
    request, channel = a_stream_started()
    head = b"".join(channel.written).decode()
    assert "X-Request-ID: req-1\r\n" in head and "backend's" not in head
    request.set_header(b"X-Gateway-Late", b"1")  # too late for the head: no error, and not written
    request.write(b"data: 1\n\n")
    assert b"X-Gateway-Late" not in b"".join(channel.written)


def test_a_streams_request_headers_are_still_read_after_its_head_went():
    request, _ = a_stream_started()
    assert request.header(b"user-agent") == b"agent"
    assert request.header_values(b"host") == [b"gateway"]


def test_a_streams_connection_holds_no_idle_timer_while_it_lasts_and_one_again_after():
    connection = Connection(SERVICE_INI.replace("[gateway]\n", "[gateway]\nclient_idle_timeout = 30\n"))
    connection.send(b"GET /api/ai/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    response = connection.harness.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    response.send(b"data: 1\n\n")

    def idle_timers() -> int:
        return int(connection.channel.idle_timer.running)

    assert idle_timers() == 0  # a thousand streams would hold a thousand
    for _ in range(10):
        connection.clock.advance(9)  # a stream of minutes, longer than the idle timeout
        response.send(b"data: 2\n\n")
    assert not connection.closing
    response.finish()
    assert idle_timers() == 1
    connection.clock.advance(29.9)
    assert not connection.closing
    connection.clock.advance(0.2)
    assert connection.closing


def test_connections_parsers_share_their_callbacks():
    # A thousand open streams would otherwise hold six bound methods each, twice.
    import gc
    import inspect

    channels = [Connection().channel for _ in range(2)]
    held = [[r for r in gc.get_referents(channel._parser) if inspect.ismethod(r)] for channel in channels]
    assert len(held[0]) == 6
    assert [id(method) for method in held[0]] == [id(method) for method in held[1]]


def test_a_request_dispatched_while_another_connection_parses_leaves_each_connection_its_own():
    # Every connection's parser calls one shared object, told whose bytes it parses: a
    # request handled from inside one connection's parse may set another one parsing.
    first = Connection()
    second = first.harness.server_factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 5556))
    second_transport = HalfClosableTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 5556))
    second.makeConnection(second_transport)
    factory = first.harness.server_factory
    handler = factory.handler

    class ParsesAnotherWhileHandling:
        fed = False

        def __getattr__(self, name):
            return getattr(handler, name)

        def handle(self, request):
            handler.handle(request)
            if not self.fed:
                self.fed = True
                second.dataReceived(b"GET /api/ai/second HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")

    factory.handler = ParsesAnotherWhileHandling()
    first.send(
        b"GET /api/ai/first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /api/ai/third HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nthird"
    )
    upstream = first.harness.agents["ai"]
    assert [r.uri.rsplit(b"/", 1)[1] for r in upstream.requests] == [b"first", b"second"]
    upstream.requests[1].respond(FakeResponse(200, {}, b"two"))
    assert [body for _, _, body in answers(second_transport.value())] == [b"two"]
    assert first.transport.value() == b""
    upstream.requests[0].respond(FakeResponse(200, {}, b"one"))
    third = upstream.requests[2]
    assert (third.uri.rsplit(b"/", 1)[1], third.body) == (b"third", b"third")
    third.respond(FakeResponse(201, {}, b"three"))
    assert [(status, body) for status, _, body in answers(first.transport.value())] == [(200, b"one"), (201, b"three")]
