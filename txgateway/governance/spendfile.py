"""
The SQLite file that keeps settled spend across restarts: one row per
(UTC day, key, team, model) with its tokens, cost and requests, and one
per (UTC day, key, end user) for the calls that named their end user, in
WAL mode.  Its calls block: the store runs them on a thread of their own.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable

__all__ = ["EndUserRow", "SpendFile", "SpendRow"]

#: (day, key, team, model, prompt_tokens, completion_tokens, cost_nano, requests); team "" for none.
SpendRow = tuple
#: (day, key, end_user, prompt_tokens, completion_tokens, cost_nano, requests).
EndUserRow = tuple

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

_END_USER_SCHEMA = """
CREATE TABLE IF NOT EXISTS end_user_spend (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    end_user TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, end_user)
)
"""

_ADD_END_USER = """
INSERT INTO end_user_spend (day, key, end_user, prompt_tokens, completion_tokens, cost_nano, requests)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key, end_user) DO UPDATE SET
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost_nano = cost_nano + excluded.cost_nano,
    requests = requests + excluded.requests
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
        self._db.execute(_END_USER_SCHEMA)

    def rows(self) -> list[SpendRow]:
        """Every row, oldest day first."""
        return list(self._db.execute("SELECT day, key, team, model, prompt_tokens, completion_tokens, cost_nano, requests FROM spend ORDER BY day"))

    def end_user_rows(self, since_day: str) -> list[EndUserRow]:
        """The end users' rows of C{since_day} (C{YYYY-MM-DD}) and later, oldest day first."""
        return list(self._db.execute(
            "SELECT day, key, end_user, prompt_tokens, completion_tokens, cost_nano, requests FROM end_user_spend"
            " WHERE day >= ? ORDER BY day", (since_day,),
        ))

    def end_user_totals(self) -> list[tuple[str, str, int]]:
        """Each (key, end user)'s cost over every day kept: what a C{total} budget of theirs has spent."""
        return list(self._db.execute("SELECT key, end_user, SUM(cost_nano) FROM end_user_spend GROUP BY key, end_user"))

    def add(self, rows: Iterable[SpendRow], end_user_rows: Iterable[EndUserRow] = ()) -> None:
        """Add C{rows} and C{end_user_rows} to what is kept, in one transaction."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_ADD, list(rows))
            self._db.executemany(_ADD_END_USER, list(end_user_rows))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the file."""
        self._db.close()
