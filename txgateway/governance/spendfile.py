"""
The SQLite file that keeps settled spend across restarts: one row per
(UTC day, key, team, model) with its tokens, cost and requests, in WAL
mode.  Its calls block: the store runs them on a thread of their own.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable

__all__ = ["SpendFile", "SpendRow"]

#: (day, key, team, model, prompt_tokens, completion_tokens, cost_nano, requests); team "" for none.
SpendRow = tuple

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    team TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, team, model)
)
"""

_ADD = """
INSERT INTO spend (day, key, team, model, prompt_tokens, completion_tokens, cost_nano, requests)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key, team, model) DO UPDATE SET
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost_nano = cost_nano + excluded.cost_nano,
    requests = requests + excluded.requests
"""


class SpendFile:
    """
    A spend file at C{path} (made, with its directory, when missing).

    @raise OSError: or L{sqlite3.Error} when it cannot be opened.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def rows(self) -> list[SpendRow]:
        """Every row, oldest day first."""
        return list(self._db.execute("SELECT day, key, team, model, prompt_tokens, completion_tokens, cost_nano, requests FROM spend ORDER BY day"))

    def add(self, rows: Iterable[SpendRow]) -> None:
        """Add C{rows} to what is kept, in one transaction."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_ADD, list(rows))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the file."""
        self._db.close()
