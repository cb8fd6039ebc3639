"""
More clients than the gateway's open files allow: a burst of C calls at
once, each holding its backend connection for 2 s (tests/backends.py's
``/slow``), against a gateway started with a low limit on open files (1,024
by default, soft and hard: one it cannot raise).  What each client got, and
the backend's breaker afterwards.

    .venv/bin/python bench/overload.py --calls 600,1500 [--baseline-python PATH]

With ``--baseline-python`` the same bursts go to that venv's txgateway too,
one after the other.  Everything binds 127.0.0.1; every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, Processes, free_port, wait_for_port  # noqa: E402

#: Runs argv[3:] with the soft and hard limits on open files argv[1] and argv[2].
WITH_OPEN_FILES = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


async def slow_call(port: int) -> str:
    """One call: its status and error type ("200" when answered), or how it failed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/slow/slow?delay=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    except (OSError, asyncio.TimeoutError) as error:
        return type(error).__name__
    if not raw:
        return "closed unanswered"
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    if status == "200":
        return status
    try:
        return f"{status} {json.loads(body)['error']['type']}"
    except ValueError:
        return status


def burst(twistd: str, calls: int, open_files: int, tmp: Path) -> dict:
    processes = Processes(tmp)
    try:
        backend_port = free_port()
        processes.start([sys.executable, str(HERE.parent / "tests" / "backends.py"), str(backend_port)], backend_port)
        port = free_port()
        ini = tmp / "gateway.ini"
        ini.write_text(
            f"[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n[logging]\nfile =\n[ratelimit]\nrequests = 1000000\n"
            f"[service:slow]\nurl = http://127.0.0.1:{backend_port}\nretries = 0\n"
        )
        argv = [sys.executable, "-c", WITH_OPEN_FILES, str(open_files), str(open_files),
                twistd, "-n", "--pidfile=", "txgateway", "--config", str(ini)]
        processes.start(argv, port, cwd=str(tmp))
        started = time.monotonic()

        async def all_calls() -> list[str]:
            return await asyncio.gather(*(slow_call(port) for _ in range(calls)))

        outcomes = collections.Counter(asyncio.run(all_calls()))
        took = time.monotonic() - started
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        connection.close()
        return {"calls": calls, "outcomes": dict(outcomes.most_common()), "seconds": round(took, 1),
                "circuit after": health["services"]["slow"]["circuit"]}
    finally:
        processes.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="600,1500", help="the bursts' sizes, comma-separated")
    parser.add_argument("--open-files", type=int, default=1024, help="the gateway's limit on open files (soft and hard)")
    parser.add_argument("--baseline-python", help="a venv's python with another txgateway installed")
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients' own sockets, and the backend's
    gateways = {"txgateway": str(Path(sys.executable).with_name("twistd"))}
    if options.baseline_python:
        gateways["baseline"] = str(Path(options.baseline_python).with_name("twistd"))
    for calls in (int(count) for count in options.calls.split(",")):
        for name, twistd in gateways.items():
            with tempfile.TemporaryDirectory() as tmp:
                result = burst(twistd, calls, options.open_files, Path(tmp))
            print(json.dumps({"gateway": name, "open_files": options.open_files, **result}))


if __name__ == "__main__":
    main()
