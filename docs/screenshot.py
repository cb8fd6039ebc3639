"""
Retake docs/status.png: the status page of a daemon in front of the demo
backend, with a little traffic, a service that is down (its circuit open),
a governed key and its team, and end users who spend; taken by headless
Chromium (Debian's ``chromium``).  Everything binds 127.0.0.1.

    .venv/bin/python docs/screenshot.py [docs/status.png]
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered at {url}")


def post(url: str, body: dict, key: str) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def main(target: Path) -> None:
    demo_port, port, down = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="txgateway-screenshot-"))
    (work / "gateway.ini").write_text(f"""
[gateway]
listen = tcp:{port}:interface=127.0.0.1
[logging]
file = logs/combined.log
[service:chat]
url = http://127.0.0.1:{demo_port}/v1
[service:legacy]
url = http://127.0.0.1:{down}/v1
retries = 0
breaker_threshold = 2
breaker_cooldown = 600
[model:demo]
targets = chat
[model:old]
targets = legacy
[team:search]
budget_usd = 5
[key:search-prod]
secret = search-prod-secret
team = search
budget_usd = 2
tokens_per_minute = 50000
user_budget_usd = 0.5
[key:notebooks]
secret = notebooks-secret
budget_usd = 1
budget_period = day
[price:*]
prompt = 2.5
completion = 10
""")
    demo = subprocess.Popen([str(PYTHON), "-m", "txgateway.demo", "--port", str(demo_port)], stdout=subprocess.DEVNULL)
    daemon = subprocess.Popen(
        [str(PYTHON.parent / "twistd"), "-n", "--pidfile=", "txgateway", "--config", "gateway.ini"], cwd=work,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"http://127.0.0.1:{demo_port}/v1/models")
        wait_for(base + "/health")
        users = ["ana", "bo", "chen", "dee"]
        for number in range(40):
            body = {"model": "demo", "messages": [{"role": "user", "content": "Hello " * (number % 7 + 1)}],
                    "max_tokens": 50, "user": users[number % len(users)] if number % 3 else users[0]}
            post(base + "/v1/chat/completions", body, "search-prod-secret" if number % 4 else "notebooks-secret")
            time.sleep(0.15)
        for _ in range(3):
            post(base + "/v1/chat/completions", {"model": "old", "messages": [{"role": "user", "content": "hi"}]}, "notebooks-secret")
        time.sleep(1.5)
        chromium = shutil.which("chromium")
        if chromium is None:
            raise SystemExit("no chromium: apt-get install chromium")
        subprocess.run([
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={work / 'chromium'}", "--virtual-time-budget=3000", "--window-size=1280,1500",
            f"--screenshot={target}", base + "/status",
        ], check=True, capture_output=True, timeout=90)
        print(f"wrote {target}")
    finally:
        daemon.terminate()
        demo.terminate()
        daemon.wait(10)
        demo.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "status.png")
