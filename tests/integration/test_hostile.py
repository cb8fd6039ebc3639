"""
Hostile clients and broken backends against the running daemon, with the
real bytes on real sockets; after each, the daemon still serves.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.integration.conftest import free_port
from tests.integration.test_daemon import ini_for

pytestmark = pytest.mark.integration

LIMITS = "[gateway]\nmax_body_size = 1000\nheader_timeout = 1\nclient_idle_timeout = 5\n"


@pytest.fixture
def gateway(start_gateway, fresh_backend):
    gw = start_gateway(ini_for(fresh_backend.url, retry_delay=0.05, timeout=1).replace("[gateway]\n", LIMITS))
    gw.backend = fresh_backend
    return gw


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the gateway closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return received


def parse(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.decode().lower(): v.decode() for k, v in (line.split(b": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def still_serves(gateway) -> None:
    assert gateway.request("GET", "/health/live").status == 200


HOSTILE = {
    "garbage request line": (b"HELLO WORLD\r\n\r\n", 400, "bad_request"),
    "header without colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "bad_request"),
    "content-length with transfer-encoding": (
        b"POST /api/data/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/data/echo HTTP/1.1\r\nHost: x\r\n\r\n",
        400, "bad_request"),
    "two content-lengths": (b"POST /api/data/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, "bad_request"),
    "nul in a header value": (b"GET /api/data/echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "bad_request"),
    "bare CR in a header value": (b"GET /api/data/echo HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n", 400, "bad_request"),
    "oversized header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "header_too_large"),
    "declared body over the limit": (b"POST /api/data/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000, 413, "body_too_large"),
    "chunked body over the limit": (b"POST /api/data/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\nx\r\n0\r\n\r\n", 413, "body_too_large"),
    "dot-dot path": (b"GET /api/data/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "encoded dot-dot path": (b"GET /api/data/%2e%2e/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "double-encoded dot-dot path": (b"GET /api/data/%252e%252e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "encoded slash dot-dot": (b"GET /api/data/..%2f..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_gets_its_json_error_and_the_daemon_lives(gateway, name):
    data, status, error_type = HOSTILE[name]
    code, headers, body = parse(exchange(gateway.port, data))
    assert code == status
    assert headers["content-type"] == "application/json"
    error = json.loads(body[: int(headers["content-length"])])["error"]
    assert error["type"] == error_type
    assert error["request_id"] == headers["x-request-id"]
    assert gateway.backend.calls()["count"] == 0
    still_serves(gateway)


def test_a_body_shorter_than_its_content_length_is_cut_by_the_idle_timeout(gateway):
    started = time.monotonic()
    raw = exchange(gateway.port, b"POST /api/data/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", timeout=15)
    assert raw == b""  # closed without an answer: nothing was asked of the backend
    assert 4 <= time.monotonic() - started < 14
    assert gateway.backend.calls()["count"] == 0
    still_serves(gateway)


def test_double_slashes_never_name_another_host(gateway):
    code, _, body = parse(exchange(gateway.port, b"GET /api/data//evil.example/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert code == 200
    assert json.loads(body)["uri"] == "/evil.example/echo"


def test_an_absolute_form_target_never_reaches_the_host_it_names(gateway):
    raw = exchange(gateway.port, b"GET http://169.254.169.254/api/data/echo HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
    code, _, body = parse(raw)
    assert code == 200
    echoed = json.loads(body)
    assert echoed["uri"] == "/echo"
    assert echoed["headers"]["host"] == [gateway.backend.url.split("//")[1]]


def test_a_request_id_cannot_inject_a_header_or_a_log_field(gateway):
    raw = exchange(gateway.port, b'GET /api/data/echo HTTP/1.1\r\nHost: x\r\nX-Request-ID: x", "level": "critical\r\nConnection: close\r\n\r\n')
    code, headers, body = parse(raw)
    assert code == 200
    assert len(headers["x-request-id"]) == 36
    assert gateway.story(headers["x-request-id"])
    for line in gateway.log_lines():
        assert line.get("level") != "critical"


def test_hundreds_of_slow_header_clients_do_not_delay_others_and_are_timed_out(gateway):
    slow = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        started = time.monotonic()
        assert gateway.request("GET", "/api/data/echo").status == 200
        assert time.monotonic() - started < 1.0
        for sock in slow[:3]:
            sock.settimeout(5)
            code, headers, body = parse(sock.recv(65536))
            assert code == 408
            assert json.loads(body)["error"]["type"] == "request_timeout"
    finally:
        for sock in slow:
            sock.close()
    still_serves(gateway)


# -- broken backends


class RawBackend:
    """A TCP server on loopback that misbehaves in one chosen way."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.port = free_port()
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.released = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if self.behaviour == "garbage":
                conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            elif self.behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif self.behaviour == "endless":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    conn.sendall(chunk)
        except OSError:
            self.released.set()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def raw_backend_gateway(start_gateway, backend):
    made = []

    def make(behaviour: str):
        raw = RawBackend(behaviour)
        made.append(raw)
        ini = ini_for(backend.url, retry_delay=0.05, timeout=1, retries=1).replace(
            "[service:down]", f"[service:raw]\nurl = http://127.0.0.1:{raw.port}\nretry_delay = 0.05\nretries = 1\n[service:down]"
        )
        return start_gateway(ini), raw

    yield make
    for raw in made:
        raw.close()


def test_a_backend_speaking_garbage_is_a_502(raw_backend_gateway):
    gateway, raw = raw_backend_gateway("garbage")
    answer = gateway.request("GET", "/api/raw/x")
    assert answer.status == 502
    assert answer.error["type"] == "upstream_unavailable"
    assert raw.accepted == 2  # retried once, like any failed attempt
    story = gateway.story(answer.headers["X-Request-ID"])
    assert story[-1]["status"] == 502
    still_serves(gateway)


def test_a_backend_resetting_before_the_headers_is_a_502(raw_backend_gateway):
    gateway, raw = raw_backend_gateway("reset")
    answer = gateway.request("GET", "/api/raw/x")
    assert answer.status == 502
    assert gateway.request("GET", "/health").json()["services"]["raw"]["consecutive_failures"] == 2
    still_serves(gateway)


def test_a_client_leaving_an_endless_body_releases_the_backend_at_once(raw_backend_gateway):
    gateway, raw = raw_backend_gateway("endless")
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(b"GET /api/raw/forever HTTP/1.1\r\nHost: x\r\n\r\n")
    received = 0
    while received < 1_000_000:
        received += len(sock.recv(65536))
    sock.close()
    assert raw.released.wait(5), "the backend connection was not released"
    still_serves(gateway)


@pytest.mark.parametrize("size", [3_000_000, 30_000_000])
def test_a_client_uploading_too_much_reads_its_413_and_no_broken_pipe(gateway, size):
    # The gateway answers before the body is in, then reads and drops the rest
    # (a lingering close), so a client that sends its whole body first still
    # gets to read the answer instead of a reset connection.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.request("POST", "/api/data/echo", body=b"y" * size)
    response = connection.getresponse()
    assert response.status == 413
    assert response.getheader("Connection") == "close"
    assert json.loads(response.read())["error"]["type"] == "body_too_large"
    connection.close()
    assert gateway.backend.calls()["count"] == 0
    still_serves(gateway)
