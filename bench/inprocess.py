"""
The gateway's own Python work, with no sockets: a whole gateway built the
way the unit tests build it (C{tests.fakes.Harness}: a Clock, backends in
memory that answer at once), requests fed to its data plane's protocol as
bytes and its answers read from a C{StringTransport}.

    .venv/bin/python bench/inprocess.py [--rows plain,governed,v1-chunk,api-chunk] [--rounds 5]

Rows:

    plain        a JSON chat completion of the bench's no-limits key
    governed     the same call of bench/run.py's governed key (a key and its team,
                 tokens a minute and a budget each), on the ledger in memory
    v1-chunk     a relayed /v1/ stream's chunk, read as it passes (100 a stream)
    api-chunk    the same chunk relayed as bytes through /api/

For each: the process's CPU time a request (or a chunk: a stream of 100
chunks less one of 2, over the 98 between), the least, the median and
the most over the rounds, the rows interleaved.  The least is the one to
compare: the work's own cost, to which a busy machine only ever adds.  It leaves out everything that is not the
gateway's Python: the kernel, the reactor's dispatch, the backend side's
llhttp, the access line's write, the spend file's writes (the ledger is
the one in memory SQLite's store keeps), and the cache misses of
thousands of streams taking turns (in the daemon a chunk finds its
stream's objects cold).  What it gives instead: the gateway's Python
alone, in about 20 s, and where it goes (run it under py-spy).  It is no
quieter than the daemon's benches on this shared machine: over six runs
of 7 rounds the least moved by 7 % on the plain row and 2 % on the
governed one (the governed row's share 66.4 to 69.7 %), so compare two
versions in one run, as with the others.  Run it from the
checkout's root, with the test extras installed (C{pip install .[test]}).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from run import GOVERNED_KEY, governance_ini  # noqa: E402
from tests.fakes import GATEWAY_HEAD, FakeResponse, FakeUpstream, Harness  # noqa: E402

_JSON_ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "bench-json",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "One two three"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
}).encode()


#: The streams the backends began and the bench has not fed yet.
_STREAMS: list[FakeResponse] = []


class _AnsweringBackend(FakeUpstream):
    """A backend in memory that answers every request at once: a JSON completion, or a stream the bench feeds (L{_STREAMS})."""

    def request(self, method: bytes, target: bytes, headers: list, body: bytes):
        if b'"stream":true' in body.replace(b" ", b""):
            response = FakeResponse(200, {b"content-type": b"text/event-stream"})
            _STREAMS.append(response)
            return succeed(response)
        return succeed(FakeResponse(200, {b"content-type": b"application/json"}, _JSON_ANSWER))


class _Gateway(Harness):
    """The unit tests' gateway in memory, its backends answering at once and its access lines made, not kept."""

    def __init__(self, ini: str) -> None:
        super().__init__(ini)
        self.access.msg = lambda line: None

    def _upstream_for(self, service, url: str) -> FakeUpstream:
        upstream = self.endpoints[url] = _AnsweringBackend(url)
        return upstream


_SERVICES = """
[service:chat]
url = http://chat.test/v1
retries = 0
[service:raw]
url = http://raw.test
retries = 0
[model:bench-json]
targets = chat
"""


def _gateway(sections: str):
    """A gateway in memory with C{sections}, and one client connection to its data plane."""
    harness = _Gateway(GATEWAY_HEAD.replace("requests = 1000\n", "requests = 1000000000\n") + _SERVICES + sections)
    protocol = harness.server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return harness, protocol, transport


def _request(path: bytes, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()  # compact, as the official SDKs write it
    return (
        b"POST %s HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, GOVERNED_KEY.encode(), len(data), data)
    )


def _answered(transport: StringTransport) -> None:
    out = transport.value()
    transport.clear()
    if not out.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"the gateway did not answer 200: {out[:300]!r}")


class _Calls:
    """Requests of one key, one after another on one connection."""

    def __init__(self, sections: str) -> None:
        self.harness, self._protocol, self._transport = _gateway(sections)
        self._bytes = _request(b"/v1/chat/completions", {
            "model": "bench-json", "max_tokens": 64, "messages": [{"role": "user", "content": "Count to sixty"}],
        })

    def run(self, count: int) -> float:
        """Seconds of CPU a request, over C{count} requests."""
        protocol, transport, clock = self._protocol, self._transport, self.harness.clock
        started = time.process_time()
        for number in range(count):
            protocol.dataReceived(self._bytes)
            if number % 64 == 0:
                _answered(transport)
                # Time passes as at 4,000 requests a second: the per-minute windows fill and trim as in the daemon.
                clock.advance(64 / 4000)
        spent = time.process_time() - started
        _answered(transport)
        return spent / count


_CHUNKS = [
    b"data: " + json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "bench-json",
        "choices": [{"index": 0, "delta": {"content": f"token{number} "}, "finish_reason": None}],
    }, separators=(",", ":")).encode() + b"\n\n"
    for number in range(100)
]


class _Streams:
    """Streams of 100 chunks (and of 2), one after another on one connection."""

    def __init__(self, path: bytes) -> None:
        self.harness, self._protocol, self._transport = _gateway(f"[auth]\nkeys = bench:{GOVERNED_KEY}\n")
        self._bytes = _request(path, {"model": "bench-json", "stream": True, "messages": [{"role": "user", "content": "Count"}]})

    def _stream(self, chunks: int) -> None:
        self._protocol.dataReceived(self._bytes)
        response = _STREAMS.pop()
        for chunk in _CHUNKS[:chunks]:
            response.send(chunk)
        response.send(b"data: [DONE]\n\n")
        response.finish()
        _answered(self._transport)

    def run(self, count: int) -> float:
        """Seconds of CPU a chunk: C{count} streams of 100 chunks less C{count} of 2, over the 98 between."""
        lengths = {}
        for chunks in (100, 2):
            started = time.process_time()
            for _ in range(count):
                self._stream(chunks)
            lengths[chunks] = (time.process_time() - started) / count
        self.harness.clock.advance(0.01)
        return (lengths[100] - lengths[2]) / 98


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="plain,governed,v1-chunk,api-chunk")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10_000, help="requests a round (streams: a fortieth of it)")
    args = parser.parse_args()
    makers = {
        "plain": lambda: _Calls(f"[auth]\nkeys = bench:{GOVERNED_KEY}\n"),
        "governed": lambda: _Calls(governance_ini("")),
        "v1-chunk": lambda: _Streams(b"/v1/chat/completions"),
        "api-chunk": lambda: _Streams(b"/api/raw/v1/chat/completions"),
    }
    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in makers]
    if unknown:
        parser.error(f"unknown rows {unknown}: choose among {', '.join(makers)}")
    benches = {row: makers[row]() for row in rows}
    counts = {row: args.requests if isinstance(bench, _Calls) else max(1, args.requests // 40) for row, bench in benches.items()}
    for row, bench in benches.items():
        bench.run(max(1, counts[row] // 5))  # warm up
    gc.freeze()  # as the daemon does once it has started: what was made at start is never scanned again
    measured: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row, bench in benches.items():
            measured[row].append(bench.run(counts[row]) * 1e6)
    print(f"{'row':12s} {'least':>8s} {'median':>8s} {'most':>8s}  CPU us")
    for row, values in measured.items():
        unit = "a chunk" if row.endswith("-chunk") else "a request"
        print(f"{row:12s} {min(values):8.2f} {statistics.median(values):8.2f} {max(values):8.2f}  {unit}")
    if "plain" in measured and "governed" in measured:
        # Each round's two rows ran one after the other: a slow stretch of the machine slows both.
        shares = [plain / governed * 100 for plain, governed in zip(measured["plain"], measured["governed"])]
        least = min(measured["plain"]) / min(measured["governed"]) * 100
        print(f"governed: {least:.1f} % of the plain row's throughput by the least of each"
              f" (the rounds' own shares: median {statistics.median(shares):.1f} %, {min(shares):.1f} to {max(shares):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
