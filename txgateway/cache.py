"""
The response cache: which answers may be kept and for how long, the key
an answer is kept under, the in-memory store (least recently used out
first, by bytes), and L{ResponseCache}, which answers from the store,
coalesces identical requests behind the one in flight, and keeps what
the backend answered.

Time is the injected clock's: a test moves it to see an entry expire.
"""

from __future__ import annotations

import hashlib
import json
import re
from inspect import iscoroutine
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from txgateway.config import ServiceConfig
from txgateway.context import RequestContext
from txgateway.metrics import GatewayMetrics
from txgateway.server import IncomingRequest

__all__ = ["CachedAnswer", "MemoryCacheStore", "RedisCacheStore", "ResponseCache", "cache_key", "connect_cache", "freshness"]

HIT, MISS, BYPASS, COALESCED = "hit", "miss", "bypass", "coalesced"


@attrs.frozen
class CachedAnswer:
    """
    A kept answer: status, the backend's headers and body, when it was
    kept and until when it is fresh (clock seconds).  An entry with
    C{vary} names the request headers whose values complete the key: the
    answer itself is kept under that longer key.
    """

    code: int
    reason: bytes
    headers: tuple
    body: bytes
    stored_at: float
    expires_at: float
    vary: tuple = ()

    @property
    def size(self) -> int:
        """Bytes it takes, roughly: its body and headers."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers) + 64


_NO_DIRECTIVES: frozenset[bytes] = frozenset()
_MAX_AGE = re.compile(rb"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d+)", re.I)


def _directives(value: bytes | None) -> set[bytes]:
    if not value:
        return set()
    return {part.strip().split(b"=", 1)[0].strip().lower() for part in value.split(b",")}


def freshness(code: int, headers: list[tuple[bytes, bytes]], ttl: float) -> float | None:
    """
    How long a backend's answer may be kept (the shorter of C{ttl} and its
    C{s-maxage}, else C{max-age}), or L{None} when it may not be: not a
    200, a C{Set-Cookie}, C{Cache-Control: no-store}, C{private} or
    C{no-cache}, or C{Vary: *}.
    """
    if code != 200:
        return None
    control = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"set-cookie":
            return None
        if lower == b"cache-control":
            control += b"," + value
        if lower == b"vary" and b"*" in value:
            return None
    if _directives(control) & {b"no-store", b"private", b"no-cache"}:
        return None
    ages = {kind.lower(): int(seconds) for kind, seconds in _MAX_AGE.findall(control)}
    age = ages.get(b"s-maxage", ages.get(b"max-age"))
    if age is not None:
        if age <= 0:
            return None
        return min(ttl, float(age))
    return ttl


def vary_names(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
    """The request header names a backend's C{Vary} lists, lowercased and sorted."""
    names = set()
    for name, value in headers:
        if name.lower() == b"vary":
            names |= {part.strip().lower() for part in value.split(b",") if part.strip()}
    return tuple(sorted(names))


def cache_key(service: str, method: bytes, target: bytes, body: bytes, caller: str | None) -> str:
    """
    The key of a request's answer: service, method, path and query, a
    SHA-256 of the body, and the caller (one tenant never reads another's
    answers).
    """
    caller_bytes = (caller or "").encode()
    head = b"%s\0%s\0%d:%s%d:%s%d\0" % (
        service.encode(), method, len(caller_bytes), caller_bytes, len(target), target, len(body)
    )
    digest = hashlib.sha256(head)
    if body:
        digest.update(body)
    return "txgateway:cache:" + digest.hexdigest()


def varied_key(key: str, names: tuple[bytes, ...], request: IncomingRequest) -> str:
    """C{key} completed by the values of the request headers C{names}."""
    digest = hashlib.sha256(key.encode())
    for name in names:
        value = b"\n".join(request.header_values(name))
        digest.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
    return key + ":" + digest.hexdigest()


class MemoryCacheStore:
    """
    Answers kept in this process, up to C{max_bytes} in all; the least
    recently used go first.  Expired entries are dropped when read.
    """

    description = {"backend": "memory", "healthy": True}
    healthy = True
    #: It answers at once (L{RedisCacheStore} answers later).
    asynchronous = False

    def __init__(self, clock: IReactorTime, max_bytes: int) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> CachedAnswer | None:
        """The fresh entry under C{key}, or L{None}."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock.seconds():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedAnswer) -> None:
        """Keep C{entry}, making room by dropping the least recently used."""
        if key in self._entries:
            self._drop(key)
        if entry.size > self._max_bytes:
            return
        self._entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0


def _lookup_now(store: MemoryCacheStore, key: str, request: IncomingRequest) -> CachedAnswer | None:
    """The fresh entry for C{request} in a store that answers at once (memory: no coroutine on a hit)."""
    entry = store.get(key)
    if entry is not None and entry.vary:
        entry = store.get(varied_key(key, entry.vary, request))
    return entry


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
        self._redis = redis
        self._clock = clock
        self._timeout = timeout
        self._log = log
        self._retry_interval = retry_interval
        self._disconnect = disconnect
        self._down_until: float | None = None

    asynchronous = True

    @property
    def healthy(self) -> bool:
        """Whether Redis is asked (it answered last time, or it is time to try again)."""
        return self._down_until is None or self._clock.seconds() >= self._down_until

    @property
    def description(self) -> dict:
        return {"backend": "redis", "healthy": self._down_until is None}

    async def get(self, key: str) -> CachedAnswer | None:
        raw = await self._call(self._redis.get(key), None)
        if raw is None:
            return None
        try:
            entry = decode_entry(raw)
        except (ValueError, KeyError, TypeError):
            return None  # not an entry of this version: a miss
        return entry if entry.expires_at > self._clock.seconds() else None

    async def put(self, key: str, entry: CachedAnswer) -> None:
        milliseconds = max(1, int((entry.expires_at - self._clock.seconds()) * 1000))
        await self._call(self._redis.set(key, encode_entry(entry), pexpire=milliseconds), None)

    async def _call(self, call: Deferred, failed: Any) -> Any:
        call.addTimeout(self._timeout, self._clock)
        try:
            result = await call
        except CancelledError:
            raise
        except Exception as error:
            if self._down_until is None:
                self._log.warning("cache_unavailable", backend="redis", reason=f"{type(error).__name__}: {error}")
            self._down_until = self._clock.seconds() + self._retry_interval
            return failed
        if self._down_until is not None:
            self._down_until = None
            self._log.warning("cache_recovered", backend="redis")
        return result

    def close(self) -> Deferred[None] | None:
        """Close the connections."""
        return self._disconnect() if self._disconnect is not None else None


def connect_cache(url: str, clock: IReactorTime, timeout: float, log: Any) -> RedisCacheStore:
    """A Redis cache store on a lazy txredisapi pool (bytes in and out)."""
    from urllib.parse import unquote, urlsplit

    import txredisapi  # imports the global reactor: only when Redis is configured

    parts = urlsplit(url)
    pool = txredisapi.lazyConnectionPool(
        host=parts.hostname, port=parts.port or 6379, dbid=int(parts.path.strip("/") or 0), poolsize=4,
        reconnect=True, charset=None, password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None, connectTimeout=timeout,
    )
    return RedisCacheStore(pool, clock, timeout, log, disconnect=pool.disconnect)


class _Recorder:
    """Keeps a copy of the answer the request writes, up to C{limit} body bytes."""

    __slots__ = ("code", "reason", "headers", "parts", "size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.code = 0
        self.reason = b""
        self.headers: list = []
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False

    def started(self, code: int, reason: bytes | None, headers: list) -> None:
        self.code = code
        self.reason = reason or b""
        self.headers = headers

    def wrote(self, data: bytes) -> None:
        if self.overflowed:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.overflowed = True
            self.parts = []
        else:
            self.parts.append(data)


def _stored(putting: Any) -> None:
    """A store's put runs on its own: the answer never waits for it (a Redis failure is the store's to log)."""
    if iscoroutine(putting):
        Deferred.fromCoroutine(putting).addErrback(lambda failure: None)


class _Flight:
    """A miss in flight for one key, and the requests waiting for its answer."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[Deferred[CachedAnswer | None]] = []

    def done(self, answer: CachedAnswer | None) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(answer)


class ResponseCache:
    """
    Serves a request from the cache when it can, else sends it on through
    C{proxied} and keeps its answer when it may.

    @param stores: where answers are kept, by the services' C{cache} value
        (C{memory}, C{redis}).
    @param max_entry_bytes: answers with a longer body are not kept.
    """

    def __init__(
        self, clock: IReactorTime, stores: "dict[str, MemoryCacheStore | RedisCacheStore]", metrics: GatewayMetrics, max_entry_bytes: int
    ) -> None:
        self._clock = clock
        self.stores = stores
        self._metrics = metrics
        self._max_entry_bytes = max_entry_bytes
        self._flights: dict[str, _Flight] = {}

    async def serve(
        self,
        request: IncomingRequest,
        ctx: RequestContext,
        config: ServiceConfig,
        target: bytes,
        proxied: Callable[[], Awaitable[None]],
    ) -> None:
        """
        Answer C{request} (to C{config}'s service, C{target} the path and
        query it is sent to) from the cache, or through C{proxied}.
        """
        store = self.stores[config.cache]
        method = request.method
        control = request.header(b"cache-control")
        control = _directives(control) if control is not None else _NO_DIRECTIVES
        if request.header(b"pragma") is not None:
            control = control | _directives(request.header(b"pragma"))
        head = method == b"HEAD"
        cacheable = method in config.cache_methods or (head and b"GET" in config.cache_methods)
        if not cacheable or b"no-store" in control or not store.healthy:
            # Not cacheable, or the store is away: the backend answers, as if no cache.
            self._count(config, ctx, BYPASS)
            request.set_header(b"X-Cache", b"BYPASS")
            await proxied()
            return
        caller = ctx.caller.name if ctx.caller is not None else None
        key = cache_key(config.name, b"GET" if head else method, target, request.body, caller)
        if b"no-cache" not in control:
            try:
                entry = await self._lookup(store, key, request) if store.asynchronous else _lookup_now(store, key, request)
            except CancelledError:
                raise
            except Exception:
                # A cache fault never becomes a client's error: the backend answers.
                ctx.log.exception("cache_lookup_failed", service=config.name)
                entry = None
            if entry is not None:
                self._count(config, ctx, HIT)
                self._answer(request, ctx, config, entry)
                return
            if not head:
                flight = self._flights.get(key)
                if flight is not None:
                    entry = await self._wait(flight, config)
                    if entry is not None:
                        self._count(config, ctx, COALESCED)
                        self._answer(request, ctx, config, entry)
                        return
                    # The first request failed or took too long: this one goes on its own.
        self._count(config, ctx, MISS)
        request.set_header(b"X-Cache", b"MISS")
        if head:
            await proxied()
            return
        flight = None  # only the first miss of a key leads; later ones went on alone
        if key not in self._flights:
            flight = self._flights[key] = _Flight()
        recorder = request.recorder = _Recorder(self._max_entry_bytes)
        kept = None
        try:
            await proxied()
            try:
                kept = self._keep(store, key, recorder, request, config)
            except Exception:
                # The answer went out whole; only keeping it failed.
                ctx.log.exception("cache_store_failed", service=config.name)
        finally:
            request.recorder = None
            if flight is not None:
                del self._flights[key]
                flight.done(kept)

    async def _lookup(self, store: "RedisCacheStore", key: str, request: IncomingRequest) -> CachedAnswer | None:
        """The fresh entry for C{request} in a store that answers later (Redis)."""
        entry = await store.get(key)
        if entry is not None and entry.vary:
            entry = await store.get(varied_key(key, entry.vary, request))
        return entry

    async def _wait(self, flight: _Flight, config: ServiceConfig) -> CachedAnswer | None:
        """The answer of the miss in flight, or L{None} (it failed, or C{coalesce_wait} passed)."""
        waiter: Deferred[CachedAnswer | None] = Deferred()
        flight.waiters.append(waiter)
        waiter.addTimeout(config.coalesce_timeout, self._clock)
        try:
            return await waiter
        except TimeoutError:
            return None
        except CancelledError:
            # This client left: only its own wait ends.
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)
            raise

    def _keep(self, store: Any, key: str, recorder: _Recorder, request: IncomingRequest, config: ServiceConfig) -> CachedAnswer | None:
        """Keep the answer C{recorder} saw when it may be kept; returns it (for the waiters) or L{None}."""
        if recorder.overflowed or request.gone:
            return None
        ttl = freshness(recorder.code, recorder.headers, config.cache_ttl)
        if ttl is None:
            return None
        now = self._clock.seconds()
        names = vary_names(recorder.headers)
        entry = CachedAnswer(
            recorder.code, recorder.reason, tuple(recorder.headers), b"".join(recorder.parts), now, now + ttl
        )
        if names:
            _stored(store.put(key, attrs.evolve(entry, body=b"", headers=(), vary=names)))
            _stored(store.put(varied_key(key, names, request), entry))
        else:
            _stored(store.put(key, entry))
        return entry

    def _answer(self, request: IncomingRequest, ctx: RequestContext, config: ServiceConfig, entry: CachedAnswer) -> None:
        """Answer from C{entry}: its status, headers and body, with this request's own headers."""
        now = self._clock.seconds()
        request.set_header(b"X-Cache", b"HIT")
        request.set_header(b"X-Gateway-Service", config.name.encode("ascii"))
        request.set_header(b"Age", b"%d" % max(0, int(now - entry.stored_at)))
        ctx.stamp(request, now)  # no attempt was made: X-Gateway-Attempts: 0
        request.start(entry.code, entry.reason, list(entry.headers), len(entry.body))
        request.write(entry.body)

    def _count(self, config: ServiceConfig, ctx: RequestContext, result: str) -> None:
        self._metrics.count_cache(config.name, result)
        ctx.cache = result
