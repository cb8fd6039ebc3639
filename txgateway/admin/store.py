"""
Where the admin API keeps the keys and teams it makes, and the audit trail
of every change: where the budgets are (the SQLite state file, or Redis).
Each change writes its record, its audit entry and a new version in one
step; every process (each worker, each gateway sharing the store) watches
the version and loads the whole registry again when it moves.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from txgateway.admin.registry import Registry
from txgateway.resilience.guarded import GuardedRedis

__all__ = [
    "AUDIT_ENTRIES", "AdminRecordMoved", "AdminStoreFailed", "IAdminStore", "RedisAdminStore", "SqliteAdminStore",
    "connect_admin_store",
]

#: The audit entries kept (the oldest leave first).
AUDIT_ENTRIES = 10_000


class AdminStoreFailed(Exception):
    """The admin store could not be asked (nothing was changed)."""


class AdminRecordMoved(Exception):
    """
    The record a change was made from is no longer the stored one (another
    process or admin changed, made or deleted it meanwhile): nothing was
    changed.
    """


class IAdminStore(Interface):
    """Keys, teams and the audit trail of the admin API."""

    backend = Attribute("C{sqlite} or C{redis}.")

    def version():
        """A L{Deferred} of the registry's version (moved on by every change)."""

    def registry():
        """A L{Deferred} of the whole L{Registry}, at one version."""

    def commit(kind, name, before, record, entry):
        """
        Write C{record} (a dict; L{None}: delete) as the C{kind} (C{key} or
        C{team}) named C{name}, and the audit C{entry}, in one step, only
        if the stored record is still C{before} (L{None}: there is none):
        a process whose registry is a moment old never overwrites a change
        it has not seen (a rotated secret, a deleted key).

        @return: a L{Deferred} of the new version (L{AdminRecordMoved} when
            the record is no longer C{before}, L{AdminStoreFailed} when the
            store could not be asked).
        """

    def audit(limit):
        """A L{Deferred} of the last C{limit} audit entries, newest first."""

    def close():
        """Release the file or the connections (a L{Deferred} or L{None})."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS admin_records (kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS admin_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS admin_version (one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL);
INSERT OR IGNORE INTO admin_version (one, version) VALUES (1, 0);
"""

_SETUP_ATTEMPTS = 14


@implementer(IAdminStore)
class SqliteAdminStore:
    """
    The admin registry in the budgets' SQLite file (tables of its own),
    which every worker of the machine opens: a change is seen by the
    others at their next look at the version.  Its calls run off the
    reactor's thread (C{run_in_thread}): a writer may wait up to 2 s for
    another.  L{read_registry} blocks: for the start only, before the
    gateway takes its first request.

    @param run_in_thread: calls a blocking function off the reactor thread
        and returns a L{Deferred} of its result.
    """

    backend = "sqlite"

    def __init__(self, path: str, run_in_thread: Callable[..., Deferred]) -> None:
        self.path = path
        self._run_in_thread = run_in_thread
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=2.0)
        for attempt in range(_SETUP_ATTEMPTS):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as error:
                # Workers starting together: one makes the file WAL, the others see it locked at once.
                if "locked" not in str(error) or attempt == _SETUP_ATTEMPTS - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))

    def _asked(self, function: Any, *args: Any) -> Deferred:
        def failed(failure: Failure) -> Failure:
            if failure.check(sqlite3.Error):
                raise AdminStoreFailed(f"the admin store ({self.path}) failed: {failure.getErrorMessage()}")
            return failure

        return self._run_in_thread(function, *args).addErrback(failed)

    def version(self) -> Deferred[int]:
        return self._asked(lambda: self._db.execute("SELECT version FROM admin_version").fetchone()[0])

    def read_registry(self) -> Registry:
        """The whole registry, at one version (blocking)."""
        self._db.execute("BEGIN")
        try:
            version = self._db.execute("SELECT version FROM admin_version").fetchone()[0]
            rows = self._db.execute("SELECT kind, name, body FROM admin_records").fetchall()
        finally:
            self._db.execute("COMMIT")
        keys = {name: json.loads(body) for kind, name, body in rows if kind == "key"}
        teams = {name: json.loads(body) for kind, name, body in rows if kind == "team"}
        return Registry(version, keys, teams)

    def registry(self) -> Deferred[Registry]:
        return self._asked(self.read_registry)

    def commit(self, kind: str, name: str, before: dict | None, record: dict | None, entry: dict) -> Deferred[int]:
        def write() -> int:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT body FROM admin_records WHERE kind = ? AND name = ?", (kind, name)).fetchone()
                if (json.loads(row[0]) if row is not None else None) != before:
                    raise AdminRecordMoved(f"the {kind} {name!r} was changed meanwhile")
                if record is None:
                    self._db.execute("DELETE FROM admin_records WHERE kind = ? AND name = ?", (kind, name))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO admin_records (kind, name, body) VALUES (?, ?, ?)", (kind, name, json.dumps(record)),
                    )
                self._db.execute("INSERT INTO admin_audit (entry) VALUES (?)", (json.dumps(entry),))
                self._db.execute("DELETE FROM admin_audit WHERE id <= (SELECT MAX(id) FROM admin_audit) - ?", (AUDIT_ENTRIES,))
                self._db.execute("UPDATE admin_version SET version = version + 1")
                version = self._db.execute("SELECT version FROM admin_version").fetchone()[0]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return version

        return self._asked(write)

    def audit(self, limit: int) -> Deferred[list]:
        return self._asked(lambda: [
            json.loads(entry) for (entry,) in self._db.execute("SELECT entry FROM admin_audit ORDER BY id DESC LIMIT ?", (limit,))
        ])

    def close(self) -> Deferred[None]:
        return self._run_in_thread(self._db.close)


_PREFIX = "txgateway:admin:"

#: KEYS: the records' hash of the kind, the audit list, the version; ARGV: the name, the record (""
#: to delete), the audit entry, the entries kept, the record the change was made from ("": none).
#: Returns the new version, or -1 when the stored record is not that one (nothing written).
_COMMIT = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[5] then return -1 end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
return redis.call('INCR', KEYS[3])
"""

#: KEYS: the version, the keys' hash, the teams' hash.  Returns [version, keys..., '', teams...] at one version.
_REGISTRY = """
local version = redis.call('GET', KEYS[1]) or '0'
return {version, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""


@implementer(IAdminStore)
class RedisAdminStore:
    """
    The admin registry in Redis, shared by every gateway using it: each
    change is one script (record, audit entry, version); every call is
    bounded by C{timeout}, and a failure is L{AdminStoreFailed}.
    """

    backend = "redis"

    def __init__(self, redis: Any, clock: IReactorTime, timeout: float, log: Any, disconnect: Any = None) -> None:
        self._redis = GuardedRedis(redis, clock, timeout, 1.0, log, "admin_redis", {"backend": "redis"}, disconnect)

    async def _asked(self, what: str, asking: Any) -> Any:
        guarded = self._redis
        admission = guarded.admit(what)
        if not admission.allowed:
            raise AdminStoreFailed("the admin store (Redis) failed a moment ago and is left alone for now")
        try:
            result = await asking(guarded)
        except Exception as error:
            guarded.failed(admission, error)
            raise AdminStoreFailed(f"the admin store (Redis) failed: {error}") from None
        guarded.succeeded(admission, backend="redis")
        return result

    def version(self) -> Deferred[int]:
        asking = lambda guarded: guarded.call(guarded.redis.get(_PREFIX + "version"))  # noqa: E731
        return Deferred.fromCoroutine(self._asked("version", asking)).addCallback(lambda value: int(value or 0))

    def registry(self) -> Deferred[Registry]:
        keys = [_PREFIX + "version", _PREFIX + "keys", _PREFIX + "teams"]
        asking = lambda guarded: Deferred.fromCoroutine(guarded.script(_REGISTRY, keys, []))  # noqa: E731

        def made(raw: list) -> Registry:
            version, key_fields, team_fields = raw
            return Registry(int(version), _records(key_fields), _records(team_fields))

        return Deferred.fromCoroutine(self._asked("registry", asking)).addCallback(made)

    def commit(self, kind: str, name: str, before: dict | None, record: dict | None, entry: dict) -> Deferred[int]:
        keys = [_PREFIX + ("keys" if kind == "key" else "teams"), _PREFIX + "audit", _PREFIX + "version"]
        # Records are written by json.dumps and read by json.loads, which give back the same text:
        # the script compares the stored text with this one's.
        args = [name, "" if record is None else json.dumps(record), json.dumps(entry), AUDIT_ENTRIES,
                "" if before is None else json.dumps(before)]
        asking = lambda guarded: Deferred.fromCoroutine(guarded.script(_COMMIT, keys, args))  # noqa: E731

        def written(version: Any) -> int:
            if int(version) < 0:
                raise AdminRecordMoved(f"the {kind} {name!r} was changed meanwhile")
            return int(version)

        return Deferred.fromCoroutine(self._asked("commit", asking)).addCallback(written)

    def audit(self, limit: int) -> Deferred[list]:
        asking = lambda guarded: guarded.call(guarded.redis.lrange(_PREFIX + "audit", 0, limit - 1))  # noqa: E731
        return Deferred.fromCoroutine(self._asked("audit", asking)).addCallback(lambda entries: [json.loads(e) for e in entries])

    def close(self) -> Deferred[None] | None:
        return self._redis.close()


def _records(fields: list) -> dict[str, dict]:
    """A Redis hash's [name, JSON, name, JSON...] as records by name."""
    return {name: json.loads(body) for name, body in zip(fields[0::2], fields[1::2])}


def connect_admin_store(url: str, clock: IReactorTime, timeout: float, log: Any) -> RedisAdminStore:
    """A Redis admin store on a lazy txredisapi pool (strings in and out)."""
    from txgateway.redispool import redis_pool

    pool = redis_pool(url, timeout, as_bytes=False)
    return RedisAdminStore(pool.calls, clock, timeout, log, disconnect=pool.disconnect)
