"""
The token bucket, as pure arithmetic: a bucket holds up to C{capacity}
tokens and refills continuously, C{capacity} tokens per C{window} seconds.
Every request takes one token or is refused.

The Redis store runs the same arithmetic in Lua; this module is the
reference both are tested against.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["BucketSpec", "Decision", "decision_after", "take_token"]


@attrs.frozen
class BucketSpec:
    """
    The shape of a family of buckets.

    @ivar name: which family (C{"default"} or a service's name), so that a
        service with its own limit has buckets of its own.
    """

    name: str
    capacity: int
    window: float

    @property
    def refill_per_second(self) -> float:
        """Tokens added back each second."""
        return self.capacity / self.window


@attrs.frozen
class Decision:
    """
    The outcome of asking for one token, with what the C{RateLimit-*}
    headers say.

    @ivar remaining: whole tokens left after this request.
    @ivar retry_after: when refused, whole seconds until a token is back
        (at least 1); 0 when allowed.
    @ivar reset: whole seconds until the bucket is full again.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: int
    reset: int


def take_token(spec: BucketSpec, tokens: float, updated_at: float, now: float) -> tuple[Decision, float]:
    """
    Refill a bucket that held C{tokens} at C{updated_at} up to C{now}, and
    take one token if there is one.

    @return: the decision and the tokens left in the bucket at C{now}.
    """
    rate = spec.refill_per_second
    elapsed = max(0.0, now - updated_at)
    tokens = min(float(spec.capacity), tokens + elapsed * rate)
    allowed = tokens >= 1.0
    if allowed:
        tokens -= 1.0
    return decision_after(spec, allowed, tokens), tokens


def decision_after(spec: BucketSpec, allowed: bool, tokens: float) -> Decision:
    """
    The decision (and its header values) once a request was allowed or
    refused and C{tokens} are left in the bucket.
    """
    rate = spec.refill_per_second
    retry_after = 0 if allowed else max(1, math.ceil((1.0 - tokens) / rate))
    return Decision(
        allowed=allowed,
        limit=spec.capacity,
        remaining=int(math.floor(tokens)),
        retry_after=retry_after,
        reset=max(0, math.ceil((spec.capacity - tokens) / rate)),
    )
