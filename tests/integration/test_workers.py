"""
The daemon with [gateway] workers = 2 (and 3), run as users run it: one
twistd supervisor and its worker processes on one SO_REUSEPORT address.
Connections spread over the workers; a memory limit holds across all of
them; a killed worker is replaced; SIGHUP reloads every worker (or none);
SIGTERM drains them all; /metrics and /health speak for the whole daemon.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.integration.conftest import request, wait_until
from tests.integration.test_lifecycle import CLEAN_EXITS, in_thread

pytestmark = pytest.mark.integration


def workers_ini(backend_url: str, workers: int, extra: str = "") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        workers = {workers}
        drain_timeout = 10
        [logging]
        file = logs/combined.log
        [ratelimit]
        requests = 100000
        [service:data]
        url = {backend_url}
        timeout = 10
        {extra}
    """


def start(start_gateway, backend, workers: int = 2, extra: str = ""):
    gateway = start_gateway(workers_ini(backend.url, workers, extra))
    # Every worker started and connected to the supervisor.
    wait_until(lambda: gateway.request("GET", "/health").json().get("workers", {}).get("answering") == workers, 20)
    return gateway


def served_by(gateway) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in gateway.log_lines():
        if line.get("event") == "request_completed" and line.get("path", "").startswith("/api/"):
            counts[line["worker"]] = counts.get(line["worker"], 0) + 1
    return counts


def worker_pids(gateway) -> dict[int, int]:
    pids = {}
    for line in gateway.log_lines():
        if line.get("event") == "worker_started":
            pids[line["worker"]] = line["pid"]
    return pids


def test_new_connections_spread_over_every_worker_and_metrics_count_them_all(start_gateway, backend):
    gateway = start(start_gateway, backend, workers=3)
    for _ in range(90):
        assert gateway.request("GET", "/api/data/echo").status == 200
    wait_until(lambda: sum(served_by(gateway).values()) == 90)
    counts = served_by(gateway)
    assert sorted(counts) == [1, 2, 3]
    assert min(counts.values()) >= 10, counts
    metrics = gateway.request("GET", "/metrics").body.decode()
    assert 'txgateway_requests_total{method="GET",service="data",status_class="2xx"} 90.0' in metrics
    assert 'txgateway_workers{kind="answering"} 3.0' in metrics
    assert 'txgateway_in_flight_requests{worker="3"}' in metrics
    # The status page's window sums every worker's attempts.
    status = gateway.request("GET", "/status.json").json()
    assert sum(status["services"]["data"]["last_60s"]["requests_per_s"]) == 90
    assert status["workers"]["answering"] == 3


def test_a_memory_limit_of_ten_admits_exactly_ten_across_the_workers(start_gateway, backend):
    gateway = start(start_gateway, backend, extra="ratelimit_requests = 10\nratelimit_window = 3600")
    statuses = []
    lock = threading.Lock()

    def client():
        for _ in range(10):
            status = gateway.request("GET", "/api/data/echo").status
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(200) == 10
    assert statuses.count(429) == 30
    wait_until(lambda: sum(served_by(gateway).values()) == 40)
    assert len(served_by(gateway)) == 2  # both workers decided some of them


def on_a_closed_port(gateway, backend):
    """The gateway's service moved to a closed port (reloaded in both workers): its failures open the circuit wherever they happen."""
    gateway.config.write_text(gateway.config.read_text().replace(backend.url, "http://127.0.0.1:1"))
    os.kill(gateway.process.proc.pid, signal.SIGHUP)
    gateway.logged("config_reloaded", worker=1)
    gateway.logged("config_reloaded", worker=2)
    return gateway


def test_a_circuit_opened_in_one_worker_opens_in_every_worker(start_gateway, backend):
    gateway = on_a_closed_port(start(start_gateway, backend, extra="breaker_threshold = 2\nretries = 0\nbreaker_cooldown = 60"), backend)
    for _ in range(6):
        gateway.request("GET", "/api/data/echo")
    wait_until(lambda: {l["worker"] for l in gateway.logged("circuit_transition", to="open")} == {1, 2})
    opened = gateway.logged("circuit_transition", to="open")
    assert sorted(line["worker"] for line in opened) == [1, 2]  # once each: a notice never opens it twice
    assert gateway.request("GET", "/health").json()["services"]["data"]["circuit"] == "open"


def test_three_failures_in_total_open_the_circuit_in_every_worker(start_gateway, backend):
    gateway = on_a_closed_port(start(start_gateway, backend, extra="breaker_threshold = 3\nretries = 0\nbreaker_cooldown = 60"), backend)
    # However the kernel spreads these three over the two workers, their failures are counted together.
    statuses = [gateway.request("GET", "/api/data/echo").status for _ in range(3)]
    assert statuses == [502, 502, 502]
    wait_until(lambda: {l["worker"] for l in gateway.logged("circuit_transition", to="open")} == {1, 2})
    answers = [gateway.request("GET", "/api/data/echo") for _ in range(4)]
    assert [answer.status for answer in answers] == [503] * 4
    assert {answer.error["type"] for answer in answers} == {"circuit_open"}


def test_a_killed_worker_is_replaced_and_the_others_answer_meanwhile(start_gateway, backend):
    gateway = start(start_gateway, backend)
    pid = worker_pids(gateway)[1]
    os.kill(pid, signal.SIGKILL)
    # Connections the kernel queued on the dying worker's socket are reset
    # with it (in flight on it); once it is gone, every request is answered
    # while its replacement starts.
    exited = gateway.logged("worker_exited", worker=1)
    assert exited[0]["signal"] == "SIGKILL"
    answered = [gateway.request("GET", "/api/data/echo").status for _ in range(20)]
    assert answered == [200] * 20
    wait_until(lambda: worker_pids(gateway)[1] != pid, 15)
    wait_until(lambda: gateway.request("GET", "/health").json()["workers"]["answering"] == 2, 15)
    health = gateway.request("GET", "/health").json()
    assert health["workers"]["restarts"] == 1
    assert "txgateway_worker_restarts_total 1.0" in gateway.request("GET", "/metrics").body.decode()


def test_sighup_reloads_every_worker_and_a_broken_file_none(start_gateway, backend):
    gateway = start(start_gateway, backend)
    text = gateway.config.read_text()
    gateway.config.write_text(text + "\n[service:more]\nurl = " + backend.url + "\n")
    os.kill(gateway.process.proc.pid, signal.SIGHUP)
    gateway.logged("config_reloaded", worker=1)
    gateway.logged("config_reloaded", worker=2)
    wait_until(lambda: all(gateway.request("GET", "/api/more/echo").status == 200 for _ in range(6)))
    gateway.config.write_text(text + "\n[service:broken]\nurl = nowhere\n")
    os.kill(gateway.process.proc.pid, signal.SIGHUP)
    rejected = gateway.logged("config_reload_rejected")
    assert rejected[0]["worker"] == 0  # the supervisor said it, once
    assert len(gateway.logged("config_reload_rejected")) == 1
    assert len(gateway.logged("config_reloaded")) == 2
    assert gateway.request("GET", "/api/more/echo").status == 200


def test_sigterm_drains_every_worker_with_streams_in_flight(start_gateway, backend):
    gateway = start(start_gateway, backend)
    flights = [in_thread(lambda: request(gateway.port, "GET", "/api/data/slow?delay=1.5")) for _ in range(6)]
    wait_until(lambda: "txgateway_in_flight_requests" in gateway.request("GET", "/metrics").body.decode() and sum(
        float(line.rsplit(" ", 1)[1]) for line in gateway.request("GET", "/metrics").body.decode().splitlines()
        if line.startswith("txgateway_in_flight_requests{")
    ) >= 7)  # the six, and the /metrics request asking
    code = gateway.stop()
    for thread, result in flights:
        thread.join(10)
        assert "error" not in result, result
        assert result["value"].body == b"slow answer"
    assert code in CLEAN_EXITS
    stopped = {l["worker"] for l in gateway.log_lines() if l.get("event") == "gateway_stopped"}
    assert stopped == {1, 2}
    assert any(l.get("event") == "supervisor_stopped" for l in gateway.log_lines())


def test_200_parallel_governed_requests_over_two_workers_admit_exactly_the_25_that_fit(start_gateway, tmp_path):
    from tests.integration.test_governance import RESERVED, governed, in_parallel
    from tests.integration.test_openai_sdk import OpenAIBackend

    backend = OpenAIBackend(tmp_path)
    try:
        ini = governed(backend.url, f"tokens_per_minute = {25 * RESERVED}").replace("[gateway]", "[gateway]\nworkers = 2", 1)
        gateway = start_gateway(ini)
        wait_until(lambda: gateway.request("GET", "/health").json().get("workers", {}).get("answering") == 2, 20)
        outcomes = in_parallel([gateway.port], 200)
        assert outcomes.count((200, None)) == 25
        assert outcomes.count((429, "tokens_exceeded")) == 175
        wait_until(lambda: len(served_by_any(gateway)) == 2)
        # The supervisor's ledger settled every worker's requests: /spend.json from either worker says so.
        spend = gateway.request("GET", "/spend.json").json()
        assert sum(row["requests"] for row in spend["by_day"]) == 25
        assert (gateway.workdir / "state" / "txgateway.db").exists()
    finally:
        backend.process.stop()


def served_by_any(gateway) -> set[int]:
    return {line["worker"] for line in gateway.log_lines() if line.get("event") == "request_completed"}
