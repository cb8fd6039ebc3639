"""
The daemon as users run it (twistd -n txgateway --config FILE), over real
loopback sockets, in front of real backend processes.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time

import pytest

from tests.integration.conftest import TWISTD, free_port, request, wait_until

pytestmark = pytest.mark.integration


def ini_for(backend_url: str, **service_keys) -> str:
    keys = "".join(f"{k} = {v}\n" for k, v in service_keys.items())
    down = f"http://127.0.0.1:{free_port()}"
    return (
        "[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        "[logging]\nfile = logs/combined.log\n"
        "[ratelimit]\nrequests = 10000\n"
        f"[service:ai]\nurl = {backend_url}/v1-base\n{keys}"
        f"[service:data]\nurl = {backend_url}\n{keys}"
        f"[service:down]\nurl = {down}\n{keys}"
    )


FAST = dict(retry_delay=0.05, retry_max_delay=0.2, timeout=2)


@pytest.fixture
def gateway(start_gateway, backend):
    return start_gateway(ini_for(backend.url, **FAST))


def test_twistd_lists_the_plugin():
    output = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, cwd="/").stdout
    assert "txgateway" in output


def test_a_request_goes_to_its_service_and_comes_back_with_gateway_headers(gateway):
    answer = gateway.request("POST", "/api/ai/echo/x?q=1", body=b'{"a":1}', headers={
        "X-Request-ID": "it-req-1", "Content-Type": "application/json", "Connection": "keep-alive, X-Hop", "X-Hop": "1",
    })
    assert answer.status == 200
    echoed = answer.json()
    assert echoed["method"] == "POST"
    assert echoed["uri"] == "/v1-base/echo/x?q=1"
    assert echoed["body"] == '{"a":1}'
    assert echoed["headers"]["x-request-id"] == ["it-req-1"]
    assert echoed["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert echoed["headers"]["x-forwarded-proto"] == ["http"]
    assert echoed["headers"]["x-forwarded-host"] == [f"127.0.0.1:{gateway.port}"]
    assert echoed["headers"]["host"] == [gateway.config.read_text().split("url = http://")[1].split("/")[0]]
    assert echoed["headers"]["content-length"] == ["7"]
    assert "x-hop" not in echoed["headers"]
    assert answer.headers["X-Request-ID"] == "it-req-1"
    assert answer.headers["X-Gateway-Service"] == "ai"
    assert int(answer.headers["X-Gateway-Response-Time"]) >= 0
    assert answer.headers["X-Gateway-Attempts"] == "1"
    assert answer.headers["Content-Length"] == str(len(answer.body))


def test_an_unsafe_request_id_is_replaced_and_the_new_one_reaches_the_backend(gateway):
    answer = gateway.request("GET", "/api/data/echo", headers={"X-Request-ID": "bad id with spaces"})
    new_id = answer.headers["X-Request-ID"]
    assert new_id != "bad id with spaces" and len(new_id) == 36
    assert answer.json()["headers"]["x-request-id"] == [new_id]


def test_the_log_file_tells_the_whole_story_of_a_request(gateway):
    gateway.request("GET", "/api/down/x", headers={"X-Request-ID": "story-1", "Authorization": "Bearer top-secret"})
    wait_until(lambda: any(e.get("event") == "request_completed" and e.get("request_id") == "story-1" for e in gateway.log_lines()))
    story = [e for e in gateway.log_lines() if e.get("request_id") == "story-1"]
    assert [e["event"] for e in story] == ["attempt_failed"] * 4 + ["request_completed"]
    done = story[-1]
    assert (done["method"], done["path"], done["service"], done["status"], done["client"]) == ("GET", "/api/down/x", "down", 502, "127.0.0.1")
    assert done["duration_ms"] > 0
    assert "top-secret" not in gateway.log_file.read_text()


def test_every_line_on_stdout_is_json(gateway):
    gateway.request("GET", "/health")
    gateway.stop()
    lines = [line for line in gateway.process.lines if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)


def test_unknown_service_404_and_down_backend_502(gateway):
    answer = gateway.request("GET", "/api/nope/x", headers={"X-Request-ID": "n-1"})
    assert answer.status == 404
    assert answer.error == {"type": "unknown_service", "message": "no service is named 'nope'", "request_id": "n-1"}
    answer = gateway.request("GET", "/api/down/x")
    assert answer.status == 502
    assert answer.error["type"] == "upstream_unavailable"
    assert answer.error["request_id"] == answer.headers["X-Request-ID"]


def test_a_backend_that_never_answers_is_a_504(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url, timeout=0.3, retries=0))
    answer = gateway.request("GET", "/api/data/hang")
    assert answer.status == 504
    assert answer.error["type"] == "upstream_timeout"


def test_a_body_over_max_body_size_is_413_and_never_reaches_the_backend(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url).replace("[gateway]\n", "[gateway]\nmax_body_size = 1000\n"))
    answer = gateway.request("POST", "/api/data/echo", body=b"x" * 1001)
    assert answer.status == 413
    assert answer.error["type"] == "body_too_large"
    assert fresh_backend.calls()["count"] == 0
    assert gateway.request("POST", "/api/data/echo", body=b"x" * 1000).status == 200


def test_a_chunked_body_over_the_limit_is_413_too(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url).replace("[gateway]\n", "[gateway]\nmax_body_size = 1000\n"))
    chunks = iter([b"y" * 600, b"y" * 600])
    answer = gateway.request("POST", "/api/data/echo", body=chunks)
    assert answer.status == 413
    assert fresh_backend.calls()["count"] == 0


def test_a_backend_error_answer_passes_through(gateway):
    answer = gateway.request("GET", "/api/data/status/418")
    assert answer.status == 418
    assert answer.json() == {"status": 418}


def test_health_endpoints(gateway):
    assert gateway.request("GET", "/health/live").status == 200
    assert gateway.request("GET", "/health/ready").status == 200
    health = gateway.request("GET", "/health").json()
    assert health["status"] == "ok"
    assert set(health["services"]) == {"ai", "data", "down"}
    assert health["services"]["ai"]["circuit"] == "closed"
    assert health["services"]["ai"]["url"].endswith("/v1-base")
    assert health["uptime_s"] >= 0


def test_sse_tokens_arrive_one_by_one_as_the_backend_sends_them(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    started = time.time()
    connection.request("GET", "/api/data/sse?n=4&interval=0.4")
    response = connection.getresponse()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    arrivals = []
    while len(arrivals) < 4:
        line = response.fp.readline()
        if line.startswith(b"data: "):
            sent_at = float(line.split()[2])
            arrivals.append((time.time(), sent_at))
    connection.close()
    # Token n is sent at about 0.4 * n s: each must arrive before the next is sent.
    for received, sent in arrivals:
        assert received - sent < 0.3, arrivals
    assert arrivals[0][0] - started < 1.0


def test_a_client_leaving_mid_stream_releases_the_backend_connection(start_gateway, fresh_backend):
    gateway = start_gateway(ini_for(fresh_backend.url))
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(b"GET /api/data/sse?n=100&interval=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"token1" not in received:
        chunk = sock.recv(4096)
        assert chunk, "the gateway closed the stream"
        received += chunk
    sock.close()
    wait_until(lambda: fresh_backend.calls()["disconnects"] == 1)
    # A client leaving is no failure of the backend.
    assert gateway.request("GET", "/health").json()["services"]["data"]["consecutive_failures"] == 0
    wait_until(lambda: any(e.get("outcome") == "client_disconnected" for e in gateway.log_lines()))
    assert not any(e.get("event") in ("stream_failed", "unhandled_error") for e in gateway.log_lines())


def test_openai_client_plain_and_streamed_chat_completion(gateway):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/api/data/v1", api_key="test-key", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-1"]
    completion = client.chat.completions.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the test backend."
    stream = client.chat.completions.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert pieces == ["Hello", " from", " the", " test", " backend."]


def start_and_fail(config) -> subprocess.CompletedProcess:
    """Run the daemon on a config that must stop it at start."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "txgateway", "--config", str(config)],
        capture_output=True, text=True, cwd=config.parent, timeout=30,
    )


def test_a_broken_config_fails_at_start_with_one_line(tmp_path):
    config = tmp_path / "gateway.ini"
    config.write_text("[service:ai]\nurl = http://127.0.0.1:1\ntimeout = soon\n")
    result = start_and_fail(config)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"txgateway: configuration error: {config}: [service:ai] timeout: expected a number of seconds, got 'soon'"]


def test_a_missing_config_file_fails_at_start(tmp_path):
    result = start_and_fail(tmp_path / "nope.ini")
    assert result.returncode == 1
    assert "nope.ini: cannot read the configuration" in result.stderr


def test_a_bad_listen_endpoint_fails_at_start(tmp_path):
    config = tmp_path / "gateway.ini"
    config.write_text("[gateway]\nlisten = tcpx:3000\n[service:ai]\nurl = http://127.0.0.1:1\n")
    result = start_and_fail(config)
    assert result.returncode == 1
    assert "[gateway] listen" in result.stderr


def test_embedded_defaults_run_without_a_config_file(tmp_path):
    port = free_port()
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "txgateway"], cwd=tmp_path, env={**__import__("os").environ, "PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: request(port, "GET", "/health").status == 200)
        health = request(port, "GET", "/health").json()
        assert {name: s["url"] for name, s in health["services"].items()} == {
            "ai": "http://localhost:8000", "data": "http://localhost:8001", "rag": "http://localhost:8002",
            "ai-openai": "http://localhost:8000/v1",  # OpenAI's /v1/ out of the box, every model to ai's backend
        }
        assert (tmp_path / "logs" / "combined.log").exists()
    finally:
        process.terminate()
        process.wait(15)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_slow_client_slows_the_backend_read_and_memory_stays_flat(gateway):
    size = 80_000_000
    pid = gateway.process.proc.pid
    before = rss_mb(pid)
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(b"GET /api/data/bytes?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
    received = len(sock.recv(65536))
    time.sleep(1.5)  # the client reads nothing: the gateway must pause the backend, not buffer 80 MB
    during = rss_mb(pid)
    sock.settimeout(30)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    sock.close()
    assert received > size  # headers and the whole body
    assert during - before < 30, (before, during)


def test_an_unwritable_log_file_fails_at_start_with_one_line(tmp_path):
    config = tmp_path / "gateway.ini"
    config.write_text("[logging]\nfile = /proc/no-such-dir/combined.log\n[service:ai]\nurl = http://127.0.0.1:1\n")
    result = start_and_fail(config)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "[logging] file" in lines[0] and "/proc/no-such-dir" in lines[0]


def test_a_port_in_use_fails_at_start_with_one_line_naming_the_endpoint(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.ini"
        config.write_text(f"[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n[logging]\nfile =\n[service:ai]\nurl = http://127.0.0.1:1\n")
        result = start_and_fail(config)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    # One line, as a configuration error is: nothing of twistd's before it.
    [line] = output.splitlines()
    assert line == f"txgateway: cannot listen: {config}: [gateway] listen = tcp:{port}:interface=127.0.0.1: Address already in use"


def test_a_service_url_whose_host_has_a_space_is_refused_at_start(tmp_path):
    config = tmp_path / "gateway.ini"
    config.write_text("[gateway]\nlisten = tcp:0\n[logging]\nfile =\n[service:ai]\nurl = http://local host:8000/v1\n")
    result = start_and_fail(config)
    assert result.returncode == 1
    [line] = (result.stdout + result.stderr).splitlines()
    assert line.startswith(f"txgateway: configuration error: {config}: [service:ai] url: expected a host name")
