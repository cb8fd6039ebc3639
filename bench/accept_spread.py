"""
How connections spread over worker processes that serve one address,
measured before the gateway's workers are built on either way:

    python bench/accept_spread.py [--workers 2] [--duration 5]

Each worker is a Twisted process answering "ok" on 127.0.0.1:PORT and
counting the connections it accepted and the requests it served.  Two
ways to share the address:

- inherited: one socket bound by the parent, handed to every worker
  (C{adoptStreamPort}); the kernel wakes whichever workers wait in accept;
- reuseport: each worker binds its own socket with C{SO_REUSEPORT}; the
  kernel hashes each new connection to one of them.

Each is driven by wrk twice: 64 kept-alive connections (what a load
balancer in front keeps open), and a new connection per request
("Connection: close", what short-lived clients do).  It installs nothing
(wrk is needed), binds 127.0.0.1 only, and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import free_port, wait_for_port, wrk  # noqa: E402

WORKER = r'''
import json, os, signal, socket, sys
from twisted.internet import reactor
from twisted.web import resource, server

mode, port, fd, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
counts = {"connections": 0, "requests": 0}

class Ok(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        counts["requests"] += 1
        return b"ok\n"

class Site(server.Site):
    def buildProtocol(self, addr):
        counts["connections"] += 1
        return super().buildProtocol(addr)

site = Site(Ok())
if mode == "inherited":
    reactor.adoptStreamPort(fd, socket.AF_INET, site)
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, site)
    sock.close()

def done():
    with open(out, "w") as f:
        json.dump(counts, f)

# twistd-like: the reactor's own SIGTERM handler stops it; the counts are written on the way out.
reactor.addSystemEventTrigger("before", "shutdown", done)
reactor.run()
'''


def run(mode: str, workers: int, duration: float, close: bool, tmp: Path) -> list[dict]:
    port = free_port()
    listener = None
    fd = -1
    if mode == "inherited":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1024)
        listener.setblocking(False)
        fd = listener.fileno()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    outs = [tmp / f"{mode}-{close}-{n}.json" for n in range(workers)]
    procs = [
        subprocess.Popen([sys.executable, str(script), mode, str(port), str(fd), str(out)], pass_fds=(fd,) if fd >= 0 else ())
        for out in outs
    ]
    try:
        wait_for_port(port)
        time.sleep(0.5)  # every worker listening
        script_path = None
        if close:
            script_path = tmp / "close.lua"
            script_path.write_text('wrk.headers["Connection"] = "close"\n')
        result = wrk(f"http://127.0.0.1:{port}/", 64, duration, script_path)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
        if listener is not None:
            listener.close()
    counts = [json.loads(out.read_text()) for out in outs]
    return [{"rps": result["rps"], **count} for count in counts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="txgateway-accept-"))
    print(f"{args.workers} workers, {os.cpu_count()} cores, wrk -t1 -c64 {args.duration:g} s, {args.repeat} rounds")
    for close in (False, True):
        for mode in ("inherited", "reuseport"):
            for round_number in range(args.repeat):
                counts = run(mode, args.workers, args.duration, close, tmp)
                conns = [c["connections"] for c in counts]
                reqs = [c["requests"] for c in counts]
                total = sum(reqs) or 1
                print(f"{'new connection a request' if close else '64 kept-alive connections':26} {mode:10} "
                      f"round {round_number + 1}: {counts[0]['rps']:7.0f} req/s, connections per worker {conns}, "
                      f"share of requests {[round(r / total * 100) for r in reqs]} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
