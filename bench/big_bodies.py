"""
Bounded work under hostile bodies, measured from outside:

    python bench/big_bodies.py [--bodies 12] [--rounds 3]

Starts the installed daemon (twistd, single process, a governed key and
one without limits) in front of tests/hostile_backend.py, then, each
round, sends C{--bodies} bodies of 9.9 MB holding 290,000 tiny messages
at once (half from each key, on /v1/chat/completions) while a client
makes small chat calls one after another; it reports the daemon's peak
RSS (sampled every 10 ms from /proc) and the small calls' latency
(median, p99, max) beside a run without the big bodies.  Loopback only,
bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run import free_port, wait_for_port  # noqa: E402

INI = """
[gateway]
listen = tcp:{port}:interface=127.0.0.1
[logging]
file =
level = warning
[ratelimit]
requests = 1000000
[service:ai]
url = http://127.0.0.1:{backend}/v1
api = openai
retries = 0
[model:*]
targets = ai
[key:governed]
secret = governed-secret
budget_usd = 1000
[key:open]
secret = open-secret
[price:*]
prompt = 1
completion = 1
"""

SMALL = json.dumps({"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()


def big_body() -> bytes:
    message = b'{"role":"user","content":"x"}'
    count = (9_900_000 - 40) // (len(message) + 1)
    return b'{"model":"plain","messages":[' + b",".join([message] * count) + b"]}"


def post(port: int, body: bytes, key: str, timeout: float = 60) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def small_calls(port: int, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        post(port, SMALL, "open-secret")
        latencies.append((time.perf_counter() - started) * 1000)


def round_of(port: int, pid: int, bodies: int, body: bytes | None) -> dict:
    stop = threading.Event()
    latencies: list[float] = []
    peak = [rss_kb(pid)]
    statuses: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.01)

    threads = [threading.Thread(target=sample), threading.Thread(target=small_calls, args=(port, stop, latencies))]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    if body is not None:
        senders = [
            threading.Thread(target=lambda n=n: statuses.append(post(port, body, "governed-secret" if n % 2 else "open-secret")))
            for n in range(bodies)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    ordered = sorted(latencies)
    return {
        "peak_rss_mb": round(peak[0] / 1024, 1),
        "small_calls": len(ordered),
        "median_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2),
        "max_ms": round(ordered[-1], 2),
        "big_statuses": sorted(set(statuses)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the Python whose installed txgateway is measured (e.g. an earlier version's venv)")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="txgateway-bench-"))
    backend = subprocess.Popen([sys.executable, str(REPO / "tests" / "hostile_backend.py"), "0"],
                               stdout=subprocess.PIPE, text=True, cwd=work)
    backend_port = int(backend.stdout.readline().split()[1])
    port = free_port()
    (work / "gateway.ini").write_text(INI.format(port=port, backend=backend_port))
    twistd = str(Path(options.gateway_python).with_name("twistd"))
    daemon = subprocess.Popen([twistd, "-n", "--pidfile=", "txgateway", "--config", "gateway.ini"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        body = big_body()
        print(f"big body: {len(body):,} bytes, {body.count(b'{') - 1:,} messages; {options.bodies} at once")
        for n in range(options.rounds):
            quiet = round_of(port, daemon.pid, options.bodies, None)
            loaded = round_of(port, daemon.pid, options.bodies, body)
            print(f"round {n + 1}: alone {json.dumps(quiet)}")
            print(f"round {n + 1}: beside {options.bodies} big bodies {json.dumps(loaded)}")
    finally:
        daemon.terminate()
        backend.terminate()
        daemon.wait(10)
        backend.wait(10)


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
