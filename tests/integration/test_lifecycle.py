"""
The daemon's lifecycle with real signals: SIGTERM drains what is in flight
(a slow request, a stream) and exits cleanly; SIGHUP reloads gateway.ini,
or keeps the running configuration when the new file is broken.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time

import pytest

from tests.integration.conftest import wait_until
from tests.integration.test_daemon import ini_for

pytestmark = pytest.mark.integration

#: twistd re-raises SIGTERM after a clean shutdown; systemd counts it as success.
CLEAN_EXITS = (0, -signal.SIGTERM)


def in_thread(function):
    result = {}

    def run():
        try:
            result["value"] = function()
        except Exception as error:  # reported by the test
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_sigterm_lets_a_slow_request_finish_then_exits_cleanly(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url))
    keep_alive = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    keep_alive.request("GET", "/health/ready")
    first = keep_alive.getresponse()
    assert first.status == 200
    first.read()
    thread, result = in_thread(lambda: gateway.request("GET", "/api/data/slow?delay=1.5"))
    time.sleep(0.4)
    gateway.process.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    keep_alive.request("GET", "/health/ready")
    ready = keep_alive.getresponse()
    assert ready.status == 503
    ready.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=1).close()
    thread.join(10)
    assert "error" not in result, result
    assert result["value"].status == 200
    assert result["value"].body == b"slow answer"
    assert gateway.process.proc.wait(15) in CLEAN_EXITS
    events = [e.get("event") for e in gateway.log_lines()]
    assert events.index("gateway_draining") < events.index("gateway_drained") < events.index("gateway_stopped")


def test_sigterm_lets_a_stream_finish(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url))
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("GET", "/api/data/sse?n=8&interval=0.15")
    response = connection.getresponse()
    first = response.read1()
    assert first.startswith(b"data: token0")
    gateway.process.proc.send_signal(signal.SIGTERM)
    rest = response.read()
    assert (first + rest).count(b"data: token") == 8
    assert gateway.process.proc.wait(15) in CLEAN_EXITS


def test_drain_timeout_bounds_the_wait(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url).replace("[gateway]\n", "[gateway]\ndrain_timeout = 1\n"))
    thread, result = in_thread(lambda: gateway.request("GET", "/api/data/hang", timeout=20))
    time.sleep(0.3)
    started = time.monotonic()
    gateway.process.proc.send_signal(signal.SIGTERM)
    assert gateway.process.proc.wait(15) in CLEAN_EXITS
    assert 0.9 <= time.monotonic() - started < 5
    thread.join(10)
    assert any(e.get("event") == "gateway_drain_timeout" for e in gateway.log_lines())


def test_sighup_with_a_changed_file_applies_it(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url))
    assert gateway.request("GET", "/api/extra/echo").status == 404
    gateway.config.write_text(gateway.config.read_text() + f"[service:extra]\nurl = {backend.url}\n")
    gateway.process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.request("GET", "/api/extra/echo").status == 200)
    reloaded = gateway.logged("config_reloaded")
    assert reloaded and reloaded[0]["services_changed"] == ["extra"]
    assert "extra" in gateway.request("GET", "/health").json()["services"]


def test_sighup_with_a_broken_file_keeps_the_running_config(start_gateway, backend):
    gateway = start_gateway(ini_for(backend.url))
    gateway.config.write_text(gateway.config.read_text() + "[service:extra]\nurl = not a url\n")
    gateway.process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "config_reload_rejected" for e in gateway.log_lines()))
    rejected = [e for e in gateway.log_lines() if e.get("event") == "config_reload_rejected"][0]
    assert "[service:extra] url" in rejected["reason"]
    assert gateway.request("GET", "/api/data/echo").status == 200
    assert gateway.process.proc.poll() is None
