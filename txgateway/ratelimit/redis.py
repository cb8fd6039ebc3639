"""
Token buckets in Redis, shared by every gateway that points at the same
Redis: one atomic Lua script (refill and take in one round trip), loaded
once and called by its SHA.

Decisions are batched without any timer: a take goes to Redis at once when
no call is in flight; takes that arrive while one is go together in the
next call, one script run over all their buckets, in order.  An idle
gateway waits for nothing; a busy one pays Redis's round trip and the
client library's per-call cost once per batch instead of once per request.

Redis must never take the gateway down: every call has a timeout on the
injected clock, and a failure opens a breaker of the store's own, during
which decisions come from local in-memory buckets and Redis is not asked.
After C{retry_interval} one request tries Redis again; its success brings
the shared buckets back.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.ratelimit.bucket import BucketSpec, Decision, decision_after
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.resilience.guarded import GuardedRedis, script_sha

__all__ = ["RedisRateLimitStore", "TOKEN_BUCKET_LUA", "connect_redis"]

#: KEYS the buckets, one per take (a key may repeat: each takes in turn);
#: ARGV now (s, the gateway's clock), then capacity and window (s) for each
#: key.  Returns "ALLOWED TOKENS ALLOWED TOKENS ..." (0 or 1, and the tokens
#: left, per key) as one string: Redis would truncate a Lua float to an
#: integer, and one bulk reply is the cheapest to parse.  The same
#: arithmetic as L{txgateway.ratelimit.bucket.take_token}.
TOKEN_BUCKET_LUA = """\
local answers = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local now = tonumber(ARGV[1])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = capacity
    ts = now
  end
  local elapsed = now - ts
  if elapsed < 0 then
    -- another gateway's clock is ahead of ours: refill nothing, move nothing back
    elapsed = 0
    now = ts
  end
  tokens = math.min(capacity, tokens + elapsed * capacity / window)
  local allowed = 0
  if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
  end
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  answers[i] = allowed .. ' ' .. string.format('%.17g', tokens)
end
return table.concat(answers, ' ')
"""

TOKEN_BUCKET_SHA = script_sha(TOKEN_BUCKET_LUA)

KEY_PREFIX = "txgateway:ratelimit:"


class RedisCommands(Protocol):
    """The two txredisapi calls the store makes."""

    def script_load(self, script: str) -> Deferred: ...

    def evalsha(self, sha1_hash: str, keys: list, args: list) -> Deferred: ...


@implementer(IRateLimitStore)
class RedisRateLimitStore:
    """
    Buckets in Redis, with local buckets standing in while Redis is away.

    @param redis: a txredisapi connection (pool), or anything with its
        C{script_load} and C{evalsha}.
    @param timeout: seconds each Redis call may take.
    @param retry_interval: seconds Redis is left alone after a failure.
    """

    def __init__(
        self,
        redis: RedisCommands,
        clock: IReactorTime,
        timeout: float,
        retry_interval: float,
        log: Any,
        disconnect: Any = None,
    ) -> None:
        self._clock = clock
        self._redis = GuardedRedis(
            redis, clock, timeout, retry_interval, log, "ratelimit_redis", {"serving_from": "memory"}, disconnect,
        )
        self._local = MemoryRateLimitStore(clock)
        self._waiting: list[_Take] = []
        self._asking: Deferred | None = None

    @property
    def healthy(self) -> bool:
        """Whether decisions come from Redis (the breaker is closed)."""
        return self._redis.healthy

    @property
    def description(self) -> dict:
        return {
            "backend": "redis",
            "healthy": self.healthy,
            "serving_from": "memory" if self._redis.down else "redis",
        }

    def take(self, key: str, spec: BucketSpec) -> Deferred[Decision]:
        wanted = _Take(key, spec)
        wanted.decided = Deferred(wanted.cancelled)
        self._waiting.append(wanted)
        if self._asking is None:
            self._ask()
        return wanted.decided

    def _ask(self) -> None:
        """Send every waiting take to Redis in one call (or decide locally while Redis is away)."""
        while self._waiting and self._asking is None:
            batch = [wanted for wanted in self._waiting if not wanted.decided.called]
            self._waiting = []
            if not batch:
                return
            admission = self._redis.admit(batch[0].key)
            if not admission.allowed:
                self._decide_locally(batch)
                continue
            asking = Deferred.fromCoroutine(self._decide_in_redis(batch))
            if asking.called:
                asking.addBoth(self._answered, batch, admission)
                continue
            self._asking = asking
            for wanted in batch:
                wanted.batch = (asking, batch)
            asking.addBoth(self._answered, batch, admission)

    def _answered(self, result: Any, batch: list["_Take"], admission: Any) -> None:
        self._asking = None
        if isinstance(result, Failure):
            if result.check(CancelledError):
                # Every client of the batch left while Redis was asked: no verdict on Redis.
                self._redis.abandoned(admission)
            else:
                self._redis.failed(admission, result.value)
                self._decide_locally(batch)
        else:
            self._redis.succeeded(admission, serving_from="redis")
            for wanted, decision in zip(batch, result):
                if not wanted.decided.called:
                    wanted.decided.callback(decision)
        if self._waiting:
            self._ask()

    def _decide_locally(self, batch: list["_Take"]) -> None:
        for wanted in batch:
            if not wanted.decided.called:
                wanted.decided.callback(self._local.decide(wanted.key, wanted.spec))

    async def _decide_in_redis(self, batch: list["_Take"]) -> list[Decision]:
        keys = [f"{KEY_PREFIX}{wanted.spec.name}:{wanted.key}" for wanted in batch]
        args: list = [repr(float(self._clock.seconds()))]
        for wanted in batch:
            args += [wanted.spec.capacity, repr(float(wanted.spec.window))]
        reply = await self._redis.script(TOKEN_BUCKET_LUA, keys, args)
        words = (reply.decode() if isinstance(reply, bytes) else str(reply)).split()
        return [
            decision_after(wanted.spec, allowed == "1", float(tokens))
            for wanted, allowed, tokens in zip(batch, words[0::2], words[1::2])
        ]

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        closing = self._redis.close()
        if closing is not None:
            await closing
        await self._local.close()


class _Take:
    """One request's take, waiting for its batch's answer."""

    __slots__ = ("key", "spec", "decided", "batch")

    def __init__(self, key: str, spec: BucketSpec) -> None:
        self.key = key
        self.spec = spec
        self.decided: Deferred[Decision] = Deferred()
        self.batch: tuple[Deferred, list[_Take]] | None = None

    def cancelled(self, decided: Deferred) -> None:
        # When every take of a batch in flight is cancelled, the call is too.
        if self.batch is not None:
            asking, batch = self.batch
            if all(other is self or other.decided.called for other in batch):
                asking.cancel()


def connect_redis(url: str, clock: IReactorTime, timeout: float, retry_interval: float, log: Any) -> RedisRateLimitStore:
    """
    A store on a lazy txredisapi pool for C{redis://[:password@]host:port/db}.
    txredisapi uses the global reactor for its connections; the store's own
    timing stays on C{clock}.
    """
    from txgateway.redispool import redis_pool

    pool = redis_pool(url, timeout)
    return RedisRateLimitStore(pool.calls, clock, timeout, retry_interval, log, disconnect=pool.disconnect)
