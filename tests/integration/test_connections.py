"""
Open files and client connections, on the running daemon: its soft limit
raised to the hard one at start, and a connection past
C{[gateway] max_connections} answered 503 C{gateway_busy} over real
sockets, to a raw client and to the official C{openai} client, which waits
and comes back.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import resource
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, request, wait_until
from tests.integration.test_openai_sdk import OpenAIBackend
from txgateway.daemon.openfiles import connections_for

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(tmp_path):
    server = OpenAIBackend(tmp_path)
    yield server
    server.process.stop()


def ini(url: str, gateway_keys: str = "") -> str:
    head = DAEMON_HEAD.replace("[gateway]\n", f"[gateway]\n{gateway_keys}", 1)
    return head + f"""[service:ai]
url = {url}
api = openai
retries = 0
[service:other]
url = {url}
retries = 0
[model:*]
targets = ai
"""


def held_connection(port: int) -> http.client.HTTPConnection:
    """A client connection kept open (kept alive) after one answered request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/health/live")
    response = connection.getresponse()
    assert response.status == 200
    response.read()
    return connection


def limit_metric(gateway) -> dict[str, float]:
    """The connection gauges of C{/metrics} (answered even while the gateway is full)."""
    answer = gateway.request("GET", "/metrics")
    assert answer.status == 200
    text = answer.body.decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("txgateway_client_connections")
    }


def test_the_daemon_raises_its_open_files_to_the_hard_limit_and_serves_what_they_allow(start_gateway, backend):
    gateway = start_gateway(ini(backend.url), open_files=(1024, 4096))
    started = gateway.logged("gateway_started")[0]
    allowed = connections_for(4096, 2 * 64)  # two backend pools, 64 idle connections each at most
    assert started["open_files"] == 4096 and started["max_connections"] == allowed
    limits = Path(f"/proc/{gateway.process.proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [["4096", "4096"]]
    assert limit_metric(gateway)["txgateway_client_connections_limit"] == allowed


def test_a_max_connections_above_the_open_files_is_kept_and_warned_of(start_gateway, backend):
    gateway = start_gateway(ini(backend.url, "max_connections = 5000\n"), open_files=(1024, 1024))
    warning = gateway.logged("max_connections_above_open_files")[0]
    assert warning["max_connections"] == 5000 and warning["allowed"] == connections_for(1024, 2 * 64)
    assert gateway.logged("gateway_started")[0]["max_connections"] == 5000


def test_past_max_connections_a_client_gets_503_gateway_busy_and_room_comes_back_as_one_leaves(start_gateway, backend):
    gateway = start_gateway(ini(backend.url, "max_connections = 2\n"))
    first, second = held_connection(gateway.port), held_connection(gateway.port)
    refused = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    body = json.dumps({"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
    refused.request("POST", "/v1/chat/completions", body=body, headers={"X-Request-ID": "past-1", "Content-Type": "application/json"})
    response = refused.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 503 and error["type"] == "gateway_busy" and error["request_id"] == "past-1"
    assert response.getheader("Retry-After") == "1" and response.getheader("Connection") == "close"
    assert "max_connections" in error["message"]
    refused.close()
    assert backend.calls() == {}  # the refused request never reached it
    # Full, the operator's probes and scrape are answered all the same, each over one connection then closed.
    probe = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    probe.request("GET", "/health")
    answer = probe.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["status"] == "ok"
    assert answer.getheader("Connection") == "close"
    probe.close()
    assert limit_metric(gateway) == {"txgateway_client_connections": 2, "txgateway_client_connections_limit": 2}
    # A served connection that goes makes room: the next client is served, over a connection of its own.
    first.close()
    wait_until(lambda: gateway.request("GET", "/v1/models").status == 200)  # once the gateway saw it go
    assert limit_metric(gateway) == {"txgateway_client_connections": 2, "txgateway_client_connections_limit": 2}  # second, and the scrape
    full = gateway.logged("client_connections_full")
    assert len(full) == 1 and full[0]["max_connections"] == 2
    refusal = [line for line in gateway.log_lines() if line.get("request_id") == "past-1"]
    assert [(line["event"], line["status"], line["outcome"]) for line in refusal] == [("request_refused", 503, "gateway_busy")]
    second.close()


def test_the_official_client_waits_out_a_full_gateway_and_is_answered(start_gateway, backend):
    gateway = start_gateway(ini(backend.url, "max_connections = 1\n"))
    held = held_connection(gateway.port)
    leaving = threading.Timer(1.5, held.close)  # the one served client leaves while the SDK waits
    leaving.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=5, timeout=10)
    started = time.monotonic()
    answer = client.chat.completions.with_raw_response.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    leaving.join()
    assert answer.http_response.status_code == 200 and time.monotonic() - started >= 1.5
    refusals = gateway.logged("request_refused", outcome="gateway_busy")
    assert refusals and all(line["status"] == 503 for line in refusals)  # refused first, then answered: its retries


async def _slow_call(port: int) -> str:
    """One request holding its backend connection for 2 s: its status and error type ("200" when answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/other/slow?delay=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    if not raw:
        return "closed unanswered"
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    return status if status == "200" else f"{status} {json.loads(body)['error']['type']}"


def test_a_burst_past_the_open_files_is_served_up_to_the_limit_and_refused_503_never_blamed_on_the_backend(start_gateway, tmp_path):
    """
    Before the limit, 600 such calls beside 1,024 open files ran the
    gateway out of descriptors: backend connections failed and opened the
    healthy backend's breaker, and clients got resets, 502s and 503
    C{circuit_open} (measured: 496 answered, 60 reset, 28 circuit_open, 16
    upstream_unavailable, the circuit left open).  Served up to the limit
    (352), the served and the refused take at most 704 + 248 descriptors.
    """
    from tests.integration.conftest import Backend

    backend = Backend(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))  # the test's 600 clients
    try:
        gateway = start_gateway(DAEMON_HEAD + f"[service:other]\nurl = {backend.url}\nretries = 0\n", open_files=(1024, 1024))
        limit = gateway.logged("gateway_started")[0]["max_connections"]
        assert limit == connections_for(1024, 64)

        async def burst() -> list[str]:
            return await asyncio.gather(*(_slow_call(gateway.port) for _ in range(600)))

        outcomes = collections.Counter(asyncio.run(burst()))
        # Every one served while the limit allowed (more when some ended before the last arrived), the rest refused.
        assert set(outcomes) == {"200", "503 gateway_busy"} and outcomes["200"] >= limit, outcomes
        health = request(gateway.port, "GET", "/health").json()
        assert health["status"] == "ok" and health["services"]["other"]["circuit"] == "closed"
        assert request(backend.port, "GET", "/calls").json()["count"] == outcomes["200"]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        backend.process.stop()
