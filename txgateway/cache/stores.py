"""
Where answers are kept: L{MemoryCacheStore} in this process (least
recently used out first, by bytes) and L{RedisCacheStore}, shared by every
gateway using the same Redis.  Both provide L{ICacheStore}: every C{get}
and C{put} returns a Deferred (the memory store's has already fired).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from txgateway.cache.policy import CachedAnswer
from txgateway.resilience.guarded import GuardedRedis

__all__ = ["ICacheStore", "MemoryCacheStore", "RedisCacheStore", "connect_cache", "decode_entry", "encode_entry"]


class ICacheStore(Interface):
    """Keeps answers under keys until they expire."""

    healthy = Attribute("Whether the store is asked (else the cache is bypassed).")
    description = Attribute("C{{backend, healthy}} for /health.")

    def get(key: str) -> Deferred:
        """A Deferred firing with the fresh entry under C{key}, or L{None}; it never fails."""

    def put(key: str, entry: CachedAnswer) -> Deferred:
        """A Deferred firing once C{entry} is kept (or could not be); it never fails."""

    def close() -> Any:
        """Let go of what the store holds (a Deferred, or L{None})."""


@implementer(ICacheStore)
class MemoryCacheStore:
    """
    Answers kept in this process, up to C{max_bytes} in all; the least
    recently used go first.  Expired entries are dropped when read.
    """

    description = {"backend": "memory", "healthy": True}
    healthy = True

    def __init__(self, clock: IReactorTime, max_bytes: int) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> Deferred[CachedAnswer | None]:
        """The fresh entry under C{key}, or L{None}, at once."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires_at <= self._clock.seconds():
                self._drop(key)
                entry = None
            else:
                self._entries.move_to_end(key)
        return succeed(entry)

    def put(self, key: str, entry: CachedAnswer) -> Deferred[None]:
        """Keep C{entry}, making room by dropping the least recently used."""
        if key in self._entries:
            self._drop(key)
        if entry.size <= self._max_bytes:
            self._entries[key] = entry
            self.bytes += entry.size
            while self.bytes > self._max_bytes:
                self._drop(next(iter(self._entries)))
        return succeed(None)

    def _drop(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0


def encode_entry(entry: CachedAnswer) -> bytes:
    """An entry as bytes for a shared store: a JSON line, then the body."""
    meta = {
        "code": entry.code, "reason": entry.reason.decode("latin-1"),
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in entry.headers],
        "stored_at": entry.stored_at, "expires_at": entry.expires_at,
        "vary": [name.decode("latin-1") for name in entry.vary],
    }
    return json.dumps(meta).encode("utf-8") + b"\n" + entry.body


def decode_entry(raw: bytes) -> CachedAnswer:
    """What L{encode_entry} wrote."""
    line, _, body = raw.partition(b"\n")
    meta = json.loads(line)
    return CachedAnswer(
        meta["code"], meta["reason"].encode("latin-1"),
        tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in meta["headers"]),
        body, meta["stored_at"], meta["expires_at"], tuple(name.encode("latin-1") for name in meta["vary"]),
    )


@implementer(ICacheStore)
class RedisCacheStore:
    """
    Answers kept in Redis, shared by every gateway using it.  Each call is
    bounded by C{timeout}; a failed call makes the store unhealthy (the
    cache is bypassed, never an error) until a call after C{retry_interval}
    succeeds.  Logged once each way: C{cache_unavailable}, C{cache_recovered}.
    """

    def __init__(
        self, redis: Any, clock: IReactorTime, timeout: float, log: Any, retry_interval: float = 5.0, disconnect: Any = None
    ) -> None:
        self._clock = clock
        self._redis = GuardedRedis(redis, clock, timeout, retry_interval, log, "cache", {"backend": "redis"}, disconnect)

    @property
    def healthy(self) -> bool:
        """Whether Redis is asked (it answered last time, or it is time to try again)."""
        return self._redis.may_ask

    @property
    def description(self) -> dict:
        return {"backend": "redis", "healthy": not self._redis.down}

    def get(self, key: str) -> Deferred[CachedAnswer | None]:
        """The fresh entry under C{key}, or L{None} (also when Redis fails)."""
        return Deferred.fromCoroutine(self._get(key))

    async def _get(self, key: str) -> CachedAnswer | None:
        raw = await self._call("get", key, None)
        if raw is None:
            return None
        try:
            entry = decode_entry(raw)
        except (ValueError, KeyError, TypeError):
            return None  # not an entry of this version: a miss
        return entry if entry.expires_at > self._clock.seconds() else None

    def put(self, key: str, entry: CachedAnswer) -> Deferred[None]:
        """Keep C{entry} until it expires (a failure is logged by the store, never raised)."""
        milliseconds = max(1, int((entry.expires_at - self._clock.seconds()) * 1000))
        return Deferred.fromCoroutine(self._call("set", key, None, encode_entry(entry), pexpire=milliseconds))

    async def _call(self, command: str, key: str, failed: Any, *args: Any, **options: Any) -> Any:
        """One Redis command on C{key}; C{failed} when Redis fails (or is left alone after a failure)."""
        guarded = self._redis
        admission = guarded.admit(key)
        if not admission.allowed:
            return failed
        try:
            result = await guarded.call(getattr(guarded.redis, command)(key, *args, **options))
        except CancelledError:
            guarded.abandoned(admission)
            raise
        except Exception as error:
            guarded.failed(admission, error)
            return failed
        guarded.succeeded(admission, backend="redis")
        return result

    def close(self) -> Deferred[None] | None:
        """Close the connections."""
        return self._redis.close()


def connect_cache(url: str, clock: IReactorTime, timeout: float, log: Any) -> RedisCacheStore:
    """A Redis cache store on a lazy txredisapi pool (bytes in and out)."""
    from txgateway.redispool import redis_pool

    pool = redis_pool(url, timeout, as_bytes=True)
    return RedisCacheStore(pool.calls, clock, timeout, log, disconnect=pool.disconnect)
