"""
L{ResponseCache}: answers a request from a store when it can, coalesces
identical requests behind the one in flight, and keeps what the backend
answered when it may (the policy decides, the store keeps).

Time is the injected clock's: a test moves it to see an entry expire.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from txgateway.cache.policy import NO_DIRECTIVES, CachedAnswer, cache_key, directives, freshness, varied_key, vary_names
from txgateway.cache.stores import ICacheStore
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.server import AnswerRecorder, IncomingRequest
from txgateway.observability.context import RequestContext
from txgateway.observability.metrics import GatewayMetrics

__all__ = ["ResponseCache"]

HIT, MISS, BYPASS, COALESCED = "hit", "miss", "bypass", "coalesced"


def _control_of(request: IncomingRequest) -> "set[bytes] | frozenset[bytes]":
    """The client's Cache-Control directives (and Pragma's)."""
    control = request.header(b"cache-control")
    control = directives(control) if control is not None else NO_DIRECTIVES
    pragma = request.header(b"pragma")
    return control if pragma is None else control | directives(pragma)


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
        self, clock: IReactorTime, stores: "dict[str, ICacheStore]", metrics: GatewayMetrics, max_entry_bytes: int
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
        control = _control_of(request)
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
            # Inline, not a coroutine of its own: a memory hit never suspends.
            try:
                entry = await store.get(key)
                if entry is not None and entry.vary:
                    entry = await store.get(varied_key(key, entry.vary, request))
            except CancelledError:
                raise
            except Exception:
                # A cache fault never becomes a client's error: the backend answers.
                ctx.log.exception("cache_lookup_failed", service=config.name)
                entry = None
            if entry is not None:
                self._count(config, ctx, HIT)
                self._answer(request, ctx, entry)
                return
            if not head and await self._answered_by_the_flight(key, request, ctx, config):
                return
        self._count(config, ctx, MISS)
        request.set_header(b"X-Cache", b"MISS")
        if head:
            await proxied()
            return
        await self._proxied_and_kept(store, key, request, ctx, config, proxied)

    async def _answered_by_the_flight(self, key: str, request: IncomingRequest, ctx: RequestContext, config: ServiceConfig) -> bool:
        """Answer from the identical miss in flight, when there is one and it gets a keepable answer in time."""
        flight = self._flights.get(key)
        if flight is None:
            return False
        entry = await self._wait(flight, config)
        if entry is None:
            return False  # the first request failed or took too long: this one goes on its own
        self._count(config, ctx, COALESCED)
        self._answer(request, ctx, entry)
        return True

    async def _proxied_and_kept(
        self,
        store: ICacheStore,
        key: str,
        request: IncomingRequest,
        ctx: RequestContext,
        config: ServiceConfig,
        proxied: Callable[[], Awaitable[None]],
    ) -> None:
        """A miss: the backend answers, the answer is kept when it may be, and the waiters get it."""
        flight = None  # only the first miss of a key leads; later ones went on alone
        if key not in self._flights:
            flight = self._flights[key] = _Flight()
        recorder = request.recorder = AnswerRecorder(self._max_entry_bytes)
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

    def _keep(self, store: ICacheStore, key: str, recorder: AnswerRecorder, request: IncomingRequest, config: ServiceConfig) -> CachedAnswer | None:
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
            store.put(key, attrs.evolve(entry, body=b"", headers=(), vary=names))
            store.put(varied_key(key, names, request), entry)
        else:
            store.put(key, entry)
        return entry

    def _answer(self, request: IncomingRequest, ctx: RequestContext, entry: CachedAnswer) -> None:
        """Answer from C{entry}: its status, headers and body, with this request's own headers."""
        now = self._clock.seconds()
        request.set_header(b"X-Cache", b"HIT")
        request.set_header(b"Age", b"%d" % max(0, int(now - entry.stored_at)))
        ctx.stamp(request, now)  # no attempt was made: X-Gateway-Attempts: 0
        request.start(entry.code, entry.reason, list(entry.headers), len(entry.body))
        request.write(entry.body)

    def _count(self, config: ServiceConfig, ctx: RequestContext, result: str) -> None:
        self._metrics.count_cache(config.name, result)
        ctx.cache = result
