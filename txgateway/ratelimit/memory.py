"""Token buckets in this process's memory, forgotten once idle."""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from txgateway.ratelimit.bucket import BucketSpec, Decision, take_token
from txgateway.ratelimit.interface import IRateLimitStore

__all__ = ["MemoryRateLimitStore"]


@implementer(IRateLimitStore)
class MemoryRateLimitStore:
    """
    Buckets in a dict, least recently used first.

    A bucket left alone for a whole window is full again, which is what a
    new bucket would be: such buckets are dropped as requests come, so a
    million clients passing once do not stay in memory.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # (family, key) -> (tokens, updated_at, window)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float, float]] = OrderedDict()

    @property
    def description(self) -> dict:
        return {"backend": "memory", "healthy": True, "buckets": len(self._buckets)}

    def __len__(self) -> int:
        return len(self._buckets)

    def decide(self, key: str, spec: BucketSpec) -> Decision:
        """Take one token now, synchronously."""
        now = self._clock.seconds()
        self._forget_idle(now)
        slot = (spec.name, key)
        tokens, updated_at, _ = self._buckets.pop(slot, (float(spec.capacity), now, spec.window))
        decision, tokens = take_token(spec, tokens, updated_at, now)
        self._buckets[slot] = (tokens, now, spec.window)
        return decision

    def take(self, key: str, spec: BucketSpec) -> Deferred[Decision]:
        """L{decide}, as a Deferred that has already fired."""
        return succeed(self.decide(key, spec))

    def _forget_idle(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            slot, (_, updated_at, window) = next(iter(buckets.items()))
            if now - updated_at < window:
                return
            del buckets[slot]

    def close(self) -> Deferred[None]:
        self._buckets.clear()
        return succeed(None)
