"""
What a conversation held by the gateway costs as it grows: for a turn
going on from the N-th (C{previous_response_id}), the time to follow it
back in the SQLite store and build the body sent on (every earlier turn's
input and output), and that body's size against the turn's own.

    python bench/conversations.py [--turns 1,10,50,200] [--repeat 200]

Each turn is a user message of about 60 words and an answer of about 200
(a chat turn; an agent's tool outputs are larger).  The store is a
SQLite file in a temporary directory, written on this thread as the
daemon writes it.  Medians of C{--repeat} runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from twisted.internet.defer import ensureDeferred, maybeDeferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from txgateway.responses.conversations import Conversations  # noqa: E402
from txgateway.responses.store import SqliteResponseStore, StoredResponse  # noqa: E402

QUESTION = " ".join(f"q{i}" for i in range(60))
ANSWER = " ".join(f"a{i}" for i in range(200))


class _Quiet:
    def __getattr__(self, level: str):
        return lambda *args, **fields: None


def _conversation(store: SqliteResponseStore, turns: int) -> str:
    """C{turns} kept turns, each going on from the one before; the last one's id."""
    previous = None
    for n in range(turns):
        response = {"id": f"resp_{turns}_{n}", "object": "response", "status": "completed", "output": [
            {"type": "message", "id": f"msg_{n}", "role": "assistant", "content": [{"type": "output_text", "text": ANSWER}]}]}
        record = StoredResponse(response["id"], "bench", previous, [{"type": "message", "role": "user", "content": QUESTION}],
                                response, 0.0, 1e12)
        store.put(record, record.encode())
        previous = record.id
    return previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", default="1,10,50,200")
    parser.add_argument("--repeat", type=int, default=200)
    options = parser.parse_args()
    clock = Clock()
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteResponseStore(f"{directory}/responses.db", clock, maybeDeferred, 1_000_000)
        conversations = Conversations(store, clock, 1e9, 1 << 30, _Quiet())
        print(f"{'earlier turns':>13}  {'build us':>9}  {'per turn us':>11}  {'body sent':>10}  {'own turn':>8}")
        for turns in (int(t) for t in options.turns.split(",")):
            last = _conversation(store, turns)
            body = {"model": "m", "previous_response_id": last, "input": QUESTION}
            times = []
            for _ in range(options.repeat):
                started = time.perf_counter()
                result: list = []
                ensureDeferred(conversations.continued(body, "bench")).addCallback(result.append)
                expanded, _ = result[0]
                sent = json.dumps(expanded).encode()
                times.append(time.perf_counter() - started)
            own = len(json.dumps({"model": "m", "input": QUESTION}).encode())
            median = statistics.median(times) * 1e6
            print(f"{turns:>13}  {median:>9.0f}  {median / turns:>11.1f}  {len(sent):>10,}  {own:>8,}")
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
