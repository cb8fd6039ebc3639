"""
L{GuardedRedis}: Redis as every store of the gateway uses it (the rate
limiter's buckets, the budgets' ledger, the response cache), one way:
each call bounded by a timeout on the injected clock, a breaker of its
own (one failure and Redis is left alone for C{retry_interval}, then one
call tries it), scripts loaded once and again when Redis forgot them
(C{NOSCRIPT}), and the change each way logged once (C{<name>_unavailable},
C{<name>_recovered}).  The store decides what to do meanwhile (serve from
memory, bypass the cache).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txgateway.errors import describe_failure
from txgateway.redispool import forgot_the_script
from txgateway.resilience.breaker import Admission, CircuitBreaker

__all__ = ["GuardedRedis", "script_sha"]


@functools.lru_cache(maxsize=16)
def script_sha(script: str) -> str:
    """The SHA-1 Redis names a Lua script by (a script is a few KB: hashed once, not each call)."""
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


class GuardedRedis:
    """
    One Redis connection (pool) behind a timeout and a breaker.

    @param redis: a txredisapi connection (pool), or anything with the
        commands the store calls (C{script_load} and C{evalsha} for scripts).
    @param timeout: seconds each call may take.
    @param retry_interval: seconds Redis is left alone after a failure.
    @param name: the prefix of the lines logged (C{cache} logs
        C{cache_unavailable} and C{cache_recovered}).
    @param down_fields: more fields of the C{unavailable} line.
    @param disconnect: closes the connections, on L{close}.
    """

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        timeout: float,
        retry_interval: float,
        log: Any,
        name: str,
        down_fields: dict | None = None,
        disconnect: Callable[[], Deferred] | None = None,
    ) -> None:
        self.redis = redis
        self._clock = clock
        self._timeout = timeout
        self._log = log
        self._name = name
        self._down_fields = down_fields or {}
        self._disconnect = disconnect
        # Its transitions are debug lines: the change is logged here, once.
        self._breaker = CircuitBreaker(f"{name}-redis", clock, 1, retry_interval, log, transition_level="debug")
        self._loaded: set[str] = set()
        #: Redis failed last and has not answered since.
        self.down = False

    @property
    def healthy(self) -> bool:
        """Whether Redis answers (its breaker is closed)."""
        return self._breaker.status().state == "closed"

    @property
    def may_ask(self) -> bool:
        """Whether a call would be let through now (Redis is up, or a trial is due)."""
        return self._breaker.may_admit()

    def admit(self, key: str) -> Admission:
        """The breaker's word on one call (or one batch): its verdict goes to L{failed}, L{succeeded} or L{abandoned}."""
        return self._breaker.admit(key)

    def call(self, asked: Deferred) -> Deferred:
        """C{asked}, one Redis command, bounded by the timeout."""
        return asked.addTimeout(self._timeout, self._clock)

    async def script(self, script: str, keys: list, args: list) -> Any:
        """Run a Lua script by its SHA, loading it first (once, and again after Redis forgot it)."""
        sha = script_sha(script)
        if sha not in self._loaded:
            await self.call(self.redis.script_load(script))
            self._loaded.add(sha)
        try:
            return await self.call(self.redis.evalsha(sha, keys, args))
        except Exception as error:
            if not forgot_the_script(error):
                raise
            # Redis restarted and forgot its scripts: load this one again.
            await self.call(self.redis.script_load(script))
            return await self.call(self.redis.evalsha(sha, keys, args))

    def failed(self, admission: Admission, error: Exception) -> bool:
        """
        A call failed: counted on the breaker, the C{unavailable} line
        logged when Redis was up.  Returns whether it just went down.
        """
        reason = describe_failure(error)
        self._breaker.failed(admission, reason)
        self._loaded.clear()  # a Redis that comes back may be a new one
        if self.down:
            return False
        self.down = True
        self._log.warning(f"{self._name}_unavailable", reason=reason, **self._down_fields)
        return True

    def succeeded(self, admission: Admission, **fields: Any) -> bool:
        """
        A call succeeded: counted on the breaker, the C{recovered} line
        (with C{fields}) logged when Redis was down.  Returns whether it just came back.
        """
        self._breaker.succeeded(admission)
        if not self.down:
            return False
        self.down = False
        self._log.warning(f"{self._name}_recovered", **fields)
        return True

    def abandoned(self, admission: Admission) -> None:
        """Its callers left while Redis was asked: no verdict on Redis."""
        self._breaker.abandoned(admission)

    def close(self) -> Deferred[None] | None:
        """Stop the breaker's timer and close the connections."""
        self._breaker.stop()
        return self._disconnect() if self._disconnect is not None else None
