"""
Where the gateway keeps the Responses it answered (C{store}, the API's
default), so that a conversation goes on by C{previous_response_id} on
any target, and C{GET}/C{DELETE /v1/responses/{id}} and its
C{input_items} work: L{MemoryResponseStore} (one process),
L{SqliteResponseStore} (a file, shared by the workers of one machine, the
default) and L{RedisResponseStore} (shared by every gateway using the
Redis).  All provide L{IResponseStore}: each call returns a Deferred.

A stored response is one L{StoredResponse}: its owner (the caller's key),
its own turn's input, the Response as its client got it (its output in
it), the response it went on from, and when it expires.  The stores keep
it whole and never read it: who may see it is the caller's check
(L{txgateway.responses.conversations}).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import OrderedDict
from typing import Any, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface, implementer

from txgateway.errors import describe_failure
from txgateway.resilience.guarded import GuardedRedis

__all__ = [
    "IResponseStore", "MemoryResponseStore", "RedisResponseStore", "SqliteResponseStore", "StoreFailed", "StoredResponse",
    "connect_response_store",
]


class StoreFailed(Exception):
    """The store could not be asked (Redis away, the file unreadable): the caller's answer says so."""


@attrs.frozen
class StoredResponse:
    """
    One Response the gateway keeps.

    @ivar id: the Response's id, as its client got it.
    @ivar owner: who may see it: the caller's key name (C{""} with no keys).
    @ivar previous_id: the response this one went on from (C{previous_response_id}), or L{None}.
    @ivar input: this turn's own input, as items.
    @ivar response: the Response as its client got it (C{output} in it).
    @ivar stored_at: when it was kept, on the gateway's clock.
    @ivar expires_at: when it is forgotten.
    """

    id: str
    owner: str
    previous_id: str | None
    input: list
    response: dict
    stored_at: float
    expires_at: float

    def encode(self) -> bytes:
        """The record as the stores keep it: one JSON object."""
        # Spelled out: attrs.asdict walks every dict and list inside (measured at half the cost of a put).
        return json.dumps({
            "id": self.id, "owner": self.owner, "previous_id": self.previous_id, "input": self.input,
            "response": self.response, "stored_at": self.stored_at, "expires_at": self.expires_at,
        }, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | str) -> "StoredResponse":
        """What L{encode} wrote.  @raise ValueError: it is not a record of this version."""
        try:
            fields = json.loads(raw)
            return cls(**fields)
        except (TypeError, KeyError) as error:
            raise ValueError(f"not a stored response: {error}") from None


class IResponseStore(Interface):
    """Keeps L{StoredResponse}s by id until they expire."""

    def put(record: StoredResponse, encoded: bytes) -> Deferred:
        """
        Keep C{record} (C{encoded}: its L{StoredResponse.encode}) under its
        id until it expires; fires with whether it was kept (L{False}:
        another owner holds the id), or fails with L{StoreFailed}.
        """

    def get(response_id: str) -> Deferred:
        """The unexpired record under C{response_id}, or L{None}; fails with L{StoreFailed}."""

    def delete(response_id: str) -> Deferred:
        """Forget C{response_id}; fires with whether it was there.  Fails with L{StoreFailed}."""

    def extend(response_ids: list, expires_at: float) -> Deferred:
        """Keep the records of C{response_ids} (a conversation going on) at least until C{expires_at}."""

    def close() -> Any:
        """Let go of what the store holds (a Deferred, or L{None})."""


@implementer(IResponseStore)
class MemoryResponseStore:
    """
    Responses kept in this process (lost on restart; each worker has its
    own), C{max_entries} at most: the oldest go first, expired ones when
    read.
    """

    def __init__(self, clock: IReactorTime, max_entries: int) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._records: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, record: StoredResponse, encoded: bytes) -> Deferred[bool]:
        held = self._records.get(record.id)
        if held is not None and held.owner != record.owner:
            return succeed(False)
        self._records.pop(record.id, None)
        self._records[record.id] = record
        while len(self._records) > self._max_entries:
            self._records.popitem(last=False)
        return succeed(True)

    def get(self, response_id: str) -> Deferred[StoredResponse | None]:
        record = self._records.get(response_id)
        if record is not None and record.expires_at <= self._clock.seconds():
            del self._records[response_id]
            record = None
        return succeed(record)

    def delete(self, response_id: str) -> Deferred[bool]:
        return succeed(self._records.pop(response_id, None) is not None)

    def extend(self, response_ids: list, expires_at: float) -> Deferred[None]:
        for response_id in response_ids:
            record = self._records.get(response_id)
            if record is not None and record.expires_at < expires_at:
                self._records[response_id] = attrs.evolve(record, expires_at=expires_at)
        return succeed(None)

    def __len__(self) -> int:
        return len(self._records)

    def close(self) -> None:
        self._records.clear()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires_at);
"""

#: A record replaces one of the same id only for the same owner.
_PUT = """
INSERT INTO responses (id, owner, stored_at, expires_at, record) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET stored_at = excluded.stored_at, expires_at = excluded.expires_at, record = excluded.record
WHERE responses.owner = excluded.owner
"""

#: How many times a file's setup is tried when workers starting together find it locked (about 2 s in all).
_SETUP_ATTEMPTS = 14

#: How many puts between two rounds of upkeep (a WAL checkpoint, the expired and those past C{max_entries} swept).
_UPKEEP_EVERY = 500

#: The page cache (KiB) of the connection that puts and gets.  SQLite's
#: default is 2 MiB a connection, filled by the puts with pages of records
#: appended once and seldom read again (a get finds them in the kernel's
#: cache about as fast); this is room for the indexes' hot pages and one
#: turn's writes.  On a file of 12,000 records, a put took 30 to 32 us with
#: it, 30 to 33 with 512 KiB; a get 8.8 to 10.1 us, 8.2 to 8.8.
_CACHE_KIB = 128
#: The page cache (KiB) of the upkeep's connection, which only sweeps: each
#: of its rounds reads the index once, so a cache of it would keep 2 MiB of
#: pages for the next round's single pass.
_UPKEEP_CACHE_KIB = 64


class _ResponseFile:
    """One connection to the SQLite file (a page cache of at most C{cache_kib} KiB): blocking calls."""

    def __init__(self, path: str, cache_kib: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Every worker of the machine opens the file: WAL lets them read while one writes.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        for attempt in range(_SETUP_ATTEMPTS):
            try:
                self._set_up()
                break
            except sqlite3.OperationalError as error:
                # Workers starting together race to make a new file WAL and its table: SQLite answers
                # "locked" at once there (its busy wait does not cover it).  Only at start, before the
                # reactor runs: a short wait and another try.
                if "locked" not in str(error) or attempt == _SETUP_ATTEMPTS - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))
        self._db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")

    def _set_up(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # No sync on commit (only at a checkpoint), and no checkpoint on commit: the upkeep does it, off the reactor.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)

    def put(self, record: StoredResponse, encoded: bytes) -> bool:
        cursor = self._db.execute(_PUT, (record.id, record.owner, record.stored_at, record.expires_at, encoded))
        return cursor.rowcount > 0

    def begin(self) -> None:
        """Start a transaction: the puts until L{commit} are written to the log together."""
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """End the transaction L{begin} started: its puts are in the file's log, seen by every connection."""
        self._db.execute("COMMIT")

    def roll_back(self) -> None:
        """Forget the transaction's puts (a failed statement may have ended it already: nothing then)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def get(self, response_id: str, now: float) -> bytes | None:
        row = self._db.execute("SELECT record FROM responses WHERE id = ? AND expires_at > ?", (response_id, now)).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, response_id: str) -> bool:
        return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def extend(self, response_ids: list, expires_at: float) -> None:
        self._db.executemany(
            "UPDATE responses SET expires_at = ? WHERE id = ? AND expires_at < ?",
            [(expires_at, response_id, expires_at) for response_id in response_ids],
        )

    def upkeep(self, now: float, max_entries: int) -> None:
        """The expired records gone, the oldest past C{max_entries} too, and the log written back to the file."""
        self._db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
        (count,) = self._db.execute("SELECT count(*) FROM responses").fetchone()
        if count > max_entries:
            self._db.execute(
                "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses ORDER BY rowid LIMIT ?)", (count - max_entries,),
            )
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._db.close()


@implementer(IResponseStore)
class SqliteResponseStore:
    """
    Responses kept in a SQLite file at C{path} (made, with its directory,
    when missing): they survive a restart, and the workers of one machine
    share them.  Reads and writes run at once on the caller's thread (a
    write goes to the file's log, with no sync: tens of microseconds,
    measured cheaper than a thread's hop); every so many puts, the upkeep
    (the expired records and the oldest past C{max_entries} swept, the log
    checkpointed with its sync) runs through C{run_in_thread}, on a
    connection of its own.

    The puts of one turn of the reactor are written together at the
    turn's end (C{clock.callLater(0)}), in one transaction: a commit writes
    the pages it changed to the log, and puts that share them write them
    once (a put alone about 38 us, four together about 18 each, measured
    in a loop).  A put's Deferred fires once its transaction is committed,
    and fails with the whole transaction's puts when it is not: nothing is
    said kept that was not.  The file's lock is held only while the batch
    is written, not while the turn runs, so the upkeep and the other
    workers wait for it no longer than before; a get, a delete or an
    extension writes the turn's puts first.

    @raise OSError: or L{sqlite3.Error} when the file cannot be opened.
    """

    def __init__(self, path: str, clock: IReactorTime, run_in_thread: Callable[..., Deferred], max_entries: int) -> None:
        self.path = path
        self._clock = clock
        self._run = run_in_thread
        self._max_entries = max_entries
        self._file = _ResponseFile(path, _CACHE_KIB)
        self._upkeep_file = _ResponseFile(path, _UPKEEP_CACHE_KIB)
        self._puts = 0
        self._upkeep_running = False
        #: The puts of this turn, written together at its end.
        self._batch: list[tuple[StoredResponse, bytes, Deferred]] | None = None
        #: The turn's end, when the batch is written (L{None}: no batch waits).
        self._committing: IDelayedCall | None = None

    def _failed(self, error: sqlite3.Error) -> StoreFailed:
        return StoreFailed(f"the response file {self.path}: {error}")

    def _call(self, method: Callable, *args: Any) -> Deferred:
        self._commit()
        try:
            return succeed(method(*args))
        except sqlite3.Error as error:
            return fail(self._failed(error))

    def put(self, record: StoredResponse, encoded: bytes) -> Deferred[bool]:
        self._puts += 1
        if self._puts % _UPKEEP_EVERY == 0 and not self._upkeep_running:
            self._upkeep_running = True

            def done(result: Any) -> None:
                self._upkeep_running = False

            self._run(self._upkeep_file.upkeep, self._clock.seconds(), self._max_entries).addBoth(done)
        said: Deferred[bool] = Deferred()
        if self._batch is None:
            self._batch = []
            self._committing = self._clock.callLater(0, self._commit)
        self._batch.append((record, encoded, said))
        return said

    def _commit(self) -> None:
        """Write this turn's puts in one transaction, and tell each (at once when called before the turn's end)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if self._committing is not None and self._committing.active():
            self._committing.cancel()
        self._committing = None
        try:
            self._file.begin()
            kept = [self._file.put(record, encoded) for record, encoded, _ in batch]
            self._file.commit()
        except sqlite3.Error as error:
            try:
                self._file.roll_back()
            except sqlite3.Error:
                pass  # the file is failing: the next call's own error says so
            for _, _, said in batch:
                said.errback(self._failed(error))
            return
        for (_, _, said), one_kept in zip(batch, kept):
            said.callback(one_kept)

    def get(self, response_id: str) -> Deferred[StoredResponse | None]:
        return self._call(self._file.get, response_id, self._clock.seconds()).addCallback(_decoded)

    def delete(self, response_id: str) -> Deferred[bool]:
        return self._call(self._file.delete, response_id)

    def extend(self, response_ids: list, expires_at: float) -> Deferred[None]:
        return self._call(self._file.extend, list(response_ids), expires_at)

    def close(self) -> None:
        """Commit this turn's puts and close the file (after the upkeep's thread has stopped: nothing is queued on it any more)."""
        self._commit()
        self._file.close()
        self._upkeep_file.close()


def _decoded(raw: bytes | str | None) -> StoredResponse | None:
    """A record as a store returned it; one of another version is as good as none."""
    if raw is None:
        return None
    try:
        return StoredResponse.decode(raw)
    except ValueError:
        return None


#: Keep a record unless another owner holds its id: KEYS[1] the record's key; ARGV owner, record, milliseconds.
_PUT_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: Keep each of KEYS at least ARGV[1] milliseconds more (a conversation going on).
_EXTEND_SCRIPT = """
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left >= 0 and left < tonumber(ARGV[1]) then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 0
"""

_PREFIX = "txgateway:response:"


@implementer(IResponseStore)
class RedisResponseStore:
    """
    Responses kept in Redis (a hash per response, expiring with it), shared
    by every worker and gateway using the same Redis.  Each call is bounded
    by C{timeout}; a failure is L{StoreFailed} (the caller says so to its
    client), and Redis is left alone for a while after one
    (C{responses_unavailable}, C{responses_recovered} logged).
    """

    def __init__(self, redis: Any, clock: IReactorTime, timeout: float, log: Any, disconnect: Any = None) -> None:
        self._clock = clock
        self._redis = GuardedRedis(redis, clock, timeout, 5.0, log, "responses", {"backend": "redis"}, disconnect)

    async def _asked(self, key: str, asking: Callable[[GuardedRedis], Deferred]) -> Any:
        guarded = self._redis
        admission = guarded.admit(key)
        if not admission.allowed:
            raise StoreFailed("the response store (Redis) failed a moment ago and is left alone for now")
        try:
            result = await asking(guarded)
        except CancelledError:
            guarded.abandoned(admission)
            raise
        except Exception as error:
            guarded.failed(admission, error)
            raise StoreFailed(f"the response store (Redis) failed: {describe_failure(error)}") from None
        guarded.succeeded(admission, backend="redis")
        return result

    def put(self, record: StoredResponse, encoded: bytes) -> Deferred[bool]:
        milliseconds = max(1, int((record.expires_at - self._clock.seconds()) * 1000))
        script = _script(_PUT_SCRIPT, [_PREFIX + record.id], [record.owner, encoded, milliseconds])
        return Deferred.fromCoroutine(self._asked(record.id, script)).addCallback(lambda kept: bool(int(kept)))

    def get(self, response_id: str) -> Deferred[StoredResponse | None]:
        asking = lambda guarded: guarded.call(guarded.redis.hget(_PREFIX + response_id, "record"))  # noqa: E731
        return Deferred.fromCoroutine(self._asked(response_id, asking)).addCallback(_decoded)

    def delete(self, response_id: str) -> Deferred[bool]:
        asking = lambda guarded: guarded.call(guarded.redis.delete(_PREFIX + response_id))  # noqa: E731
        return Deferred.fromCoroutine(self._asked(response_id, asking)).addCallback(lambda gone: bool(gone))

    def extend(self, response_ids: list, expires_at: float) -> Deferred[None]:
        if not response_ids:
            return succeed(None)
        milliseconds = max(1, int((expires_at - self._clock.seconds()) * 1000))
        script = _script(_EXTEND_SCRIPT, [_PREFIX + response_id for response_id in response_ids], [milliseconds])
        return Deferred.fromCoroutine(self._asked(response_ids[0], script)).addCallback(lambda _: None)

    def close(self) -> Deferred[None] | None:
        return self._redis.close()


def _script(source: str, keys: list, args: list) -> Callable[[GuardedRedis], Deferred]:
    """Run a Lua script on the guarded Redis (loaded once, again when Redis forgot it)."""
    return lambda guarded: Deferred.fromCoroutine(guarded.script(source, keys, args))


def connect_response_store(url: str, clock: IReactorTime, timeout: float, log: Any) -> RedisResponseStore:
    """A Redis response store on a lazy txredisapi pool (strings in and out)."""
    from txgateway.redispool import redis_pool

    pool = redis_pool(url, timeout, as_bytes=False)
    return RedisResponseStore(pool.calls, clock, timeout, log, disconnect=pool.disconnect)
