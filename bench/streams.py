"""
LLM-shaped load: many slow streams held open at once, each trickling a
token event every INTERVAL ms (the opposite of run.py's short requests).

A node backend (bench/streams/backend.js) sends CHUNKS chunks per stream,
each stamped with its send time; a node client (bench/streams/client.js)
holds STREAMS streams open for SECONDS, opening each again when it ends,
and measures every chunk's delay from the backend's send and each
stream's time to its first chunk.  Each row is measured directly against
the backend first (the backend and client alone: what the gateway adds is
the difference), then through the gateway:

    api          /api/<service>/ of an api = http service: bytes relayed
    v1           /v1/chat/completions routed by model: events parsed
    governed     v1 with a governed key (SQLite ledger)
    redis        v1 with a governed key (Redis ledger)
    messages     /v1/messages to the chat backend: translated
    responses    /v1/responses to the chat backend: translated
    stored       responses with store: the gateway keeps each Response (SQLite)
    workers2     v1 with [gateway] workers = 2
    pipe         not the gateway: a bare Python TCP pipe on epoll (bench/streams/pipe.py),
                 the floor of any Python relay (one recv and one send a chunk)

For each: the gateway's CPU per relayed chunk (user + system, its
workers' too), its RSS per open stream (at the middle of the run, over
its RSS before), and the chunk delay and first-chunk time, p50 and p99.
Everything binds 127.0.0.1; every run is bounded in time.

    .venv/bin/python bench/streams.py --streams 500,1000 --seconds 20 --rows api,v1

With ``--baseline-python PATH`` (a venv's python with another txgateway
installed), each gateway row is measured again right after on that
txgateway (rows marked ``(baseline)``), so the machine's drift touches
both alike; ``--repeat N`` runs every row N times (the table's medians).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Processes, children_of, cpu_seconds, free_port, redis_server, rss_mb, start_gateway  # noqa: E402

KEY = "bench-streams-key"
ROWS = ("api", "v1", "governed", "redis", "messages", "responses", "stored", "workers2", "pipe")
PATHS = {
    "direct": ("/v1/chat/completions", "chat"),
    "api": ("/api/bytes/v1/chat/completions", "chat"),
    "v1": ("/v1/chat/completions", "chat"),
    "governed": ("/v1/chat/completions", "chat"),
    "redis": ("/v1/chat/completions", "chat"),
    "messages": ("/v1/messages", "messages"),
    "responses": ("/v1/responses", "responses"),
    "stored": ("/v1/responses", "stored"),
    "workers2": ("/v1/chat/completions", "chat"),
    "pipe": ("/v1/chat/completions", "chat"),
}


def gateway_ini(work: Path, row: str, port: int, backend: int, redis_port: int | None) -> Path:
    """The gateway.ini of one row: an info access log to a file, the backend as a bytes service and as a model."""
    lines = [
        "[gateway]", f"listen = tcp:{port}:interface=127.0.0.1", f"workers = {2 if row == 'workers2' else 1}",
        "[logging]", "file = logs/combined.log", "level = info",
        "[ratelimit]", "requests = 1000000",
        "[responses]", "store = sqlite" if row == "stored" else "store = off", f"state_file = {work / row / 'responses.db'}",
        "[service:bytes]", f"url = http://127.0.0.1:{backend}", "timeout = 600", "idle_timeout = 60",
        "[service:chat]", f"url = http://127.0.0.1:{backend}/v1", "api = openai", "timeout = 600", "idle_timeout = 60",
        "deadline = 600",
        "[model:bench]", "targets = chat",
    ]
    if row in ("governed", "redis"):
        lines += [
            "[key:bench]", f"secret = {KEY}", "tokens_per_minute = 1000000000", "budget_usd = 1000000",
            "[price:*]", "prompt = 1", "completion = 1",
        ]
        if row == "redis":
            lines += ["[budgets]", "store = redis", f"redis_url = redis://127.0.0.1:{redis_port}/0"]
    path = work / row / "gateway.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(
    client: Path, url: str, api: str, streams: int, seconds: float, ramp: float, pid: int, key: str | None, prompt_kb: float,
) -> dict:
    """One client run against C{url}, with the CPU and RSS of C{pid} (the gateway, or the backend) around it."""
    before_cpu = cpu_seconds(pid)
    before_rss = rss_with_children(pid)
    peak = {"rss": before_rss}

    def sample() -> None:
        time.sleep(ramp + (seconds - ramp) / 2)
        peak["rss"] = rss_with_children(pid)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    argv = ["node", str(client), url, str(streams), str(seconds), str(ramp), api] + ([key] if key else [])
    environment = {**os.environ, "PROMPT_BYTES": str(int(prompt_kb * 1024))}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"bench: the client failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    sampler.join()
    used = cpu_seconds(pid) - before_cpu
    result["cpu_us_per_chunk"] = round(used / max(1, result["chunks"]) * 1e6, 1)
    result["kb_per_stream"] = round((peak["rss"] - before_rss) * 1024 / streams, 1)
    return result


def rss_with_children(pid: int) -> float:
    """The RSS of C{pid} and its children (a supervisor's workers), in MB."""
    return rss_mb(pid) + sum(rss_with_children(child) for child in children_of(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="500,1000,2000", help="concurrent streams, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each run holds its streams")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the streams are opened")
    parser.add_argument("--chunks", type=int, default=100, help="chunks per stream")
    parser.add_argument("--interval", type=int, default=50, help="milliseconds between two chunks of a stream")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows among {', '.join(ROWS)}")
    parser.add_argument("--baseline-python", help="measure each gateway row again on this python's txgateway")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row (the table shows medians)")
    parser.add_argument("--prompt-kb", type=float, default=0.0,
                        help="each request's prompt, in KB (0: one short sentence; a real agent's are tens of KB)")
    args = parser.parse_args()
    if shutil.which("node") is None:
        raise SystemExit("bench: no node: apt-get install nodejs")
    twistd = str(Path(sys.executable).with_name("twistd"))
    twistds = [("", twistd)]
    if args.baseline_python:
        twistds.append((" (baseline)", str(Path(args.baseline_python).with_name("twistd"))))
    rows = [row for row in args.rows.split(",") if row]
    counts = [int(count) for count in args.streams.split(",")]
    work = Path(tempfile.mkdtemp(prefix="txgateway-streams-"))
    processes = Processes(work)
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        backend_port = free_port()
        backend = processes.start(
            ["node", str(HERE / "streams" / "backend.js"), str(backend_port), str(args.chunks), str(args.interval)], backend_port,
        )
        redis_port = redis_server(processes, work) if "redis" in rows else None
        client = HERE / "streams" / "client.js"
        for count in counts:
            for _ in range(args.repeat):
                direct = measure(client, f"http://127.0.0.1:{backend_port}/v1/chat/completions", "chat", count, args.seconds,
                                 args.ramp, backend.pid, None, args.prompt_kb)
                direct["row"], direct["streams"] = "direct (backend's own CPU)", count
                results.setdefault((direct["row"], count), []).append(direct)
                print(json.dumps(direct), flush=True)
                for row in rows:
                    for suffix, which in twistds if row != "pipe" else [("", None)]:
                        result = measure_row(processes, work, row, count, args, which, backend_port, redis_port, client)
                        result["row"], result["streams"] = row + suffix, count
                        for field in ("delay_p99_ms", "first_p99_ms"):
                            if result.get(field) is not None and direct.get(field) is not None:
                                result[field.replace("_ms", "_added_ms")] = round(result[field] - direct[field], 3)
                        results.setdefault((result["row"], count), []).append(result)
                        print(json.dumps(result), flush=True)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'row':<28} {'streams':>7} {'chunks':>8} {'fail':>4} {'CPU us/chunk':>12} {'KB/stream':>9} "
          f"{'delay p50':>9} {'delay p99':>9} {'+p99':>7} {'first p99':>9} {'+first':>7}   CPU range")
    for (row, count), runs in results.items():
        result = {field: _median([run.get(field) for run in runs]) for field in runs[0]}
        cpu = [run["cpu_us_per_chunk"] for run in runs]
        spread = f"{min(cpu)}-{max(cpu)}" if len(runs) > 1 else ""
        print(f"{row:<28} {count:>7} {result['chunks']:>8} {result['failures']:>4} "
              f"{_shown(result.get('cpu_us_per_chunk')):>12} {_shown(result.get('kb_per_stream')):>9} "
              f"{_shown(result['delay_p50_ms']):>9} {_shown(result['delay_p99_ms']):>9} {_shown(result.get('delay_p99_added_ms')):>7} "
              f"{_shown(result['first_p99_ms']):>9} {_shown(result.get('first_p99_added_ms')):>7}   {spread}")


def measure_row(processes: Processes, work: Path, row: str, count: int, args: argparse.Namespace, twistd: str | None,
                backend_port: int, redis_port: int | None, client: Path) -> dict:
    """One row's run: its gateway (or the bare pipe) started, measured, stopped."""
    port = free_port()
    if row == "pipe":
        server = processes.start([sys.executable, str(HERE / "streams" / "pipe.py"), str(port), str(backend_port)], port)
    else:
        ini = gateway_ini(work / str(count) / str(port), row, port, backend_port, redis_port)
        server = start_gateway(processes, twistd, ini, port)
    time.sleep(1.0 if row != "workers2" else 2.5)
    path, api = PATHS[row]
    try:
        return measure(client, f"http://127.0.0.1:{port}{path}", api, count, args.seconds, args.ramp, server.pid,
                       KEY if row in ("governed", "redis") else None, args.prompt_kb)
    finally:
        server.terminate()
        server.wait(30)


def _median(values: list) -> object:
    numbers = sorted(value for value in values if isinstance(value, (int, float)))
    if not numbers:
        return values[0]
    return numbers[len(numbers) // 2] if len(numbers) % 2 else round((numbers[len(numbers) // 2 - 1] + numbers[len(numbers) // 2]) / 2, 3)


def _shown(value: object) -> str:
    return "" if value is None else str(value)


if __name__ == "__main__":
    main()
