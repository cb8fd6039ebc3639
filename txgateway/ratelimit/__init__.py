"""
Rate limiting: a token bucket per client key, kept in memory or in Redis.

L{IRateLimitStore} is the seam: the broker asks a store for one token and
gets a L{Decision}; which store answers is configuration.
"""

from txgateway.ratelimit.bucket import BucketSpec, Decision, take_token
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.memory import MemoryRateLimitStore

__all__ = [
    "BucketSpec",
    "Decision",
    "IRateLimitStore",
    "MemoryRateLimitStore",
    "take_token",
]
