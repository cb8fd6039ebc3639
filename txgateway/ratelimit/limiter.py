"""Which bucket a request draws from: the client key and the bucket family."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from txgateway.config.gateway import RateLimitConfig, ServiceConfig
from txgateway.ratelimit.bucket import BucketSpec, Decision
from txgateway.ratelimit.interface import IRateLimitStore

__all__ = ["RateLimiter", "DEFAULT_FAMILY"]

DEFAULT_FAMILY = "default"


@attrs.frozen
class RateLimiter:
    """
    Decides, for one request, which bucket it takes a token from, and asks
    the store for it.

    @ivar key_rule: C{"ip"}, C{"api_key"} (the caller's key name) or
        C{"header:<Name>"} (falling back to the client address when the
        header or key is missing).
    """

    store: IRateLimitStore
    default: BucketSpec
    key_rule: str = "ip"

    @classmethod
    def from_config(cls, config: RateLimitConfig, store: IRateLimitStore) -> "RateLimiter":
        """The limiter that C{[ratelimit]} describes, on C{store}."""
        return cls(store, BucketSpec(DEFAULT_FAMILY, config.requests, config.window), config.key)

    def spec_for(self, service: ServiceConfig) -> BucketSpec:
        """A service with its own C{ratelimit_*} keys has its own buckets."""
        if service.ratelimit_requests is None and service.ratelimit_window is None:
            return self.default
        return BucketSpec(
            "service:" + service.name,
            service.ratelimit_requests or self.default.capacity,
            service.ratelimit_window or self.default.window,
        )

    def key_for(self, request: Any, client: str, caller: str | None = None) -> str:
        """The client key: the address, the API key's name, or the configured header's value."""
        if self.key_rule == "api_key" and caller is not None:
            return "k:" + caller
        if self.key_rule.startswith("header:"):
            value = request.header(self.key_rule[len("header:"):].lower().encode("ascii"))
            if value:
                # Hashed: API keys must not sit in memory or Redis in the clear.
                return "h:" + hashlib.sha256(value).hexdigest()[:32]
        return "ip:" + client

    def take(
        self, request: Any, client: str, service: ServiceConfig, caller: str | None = None
    ) -> Deferred[Decision]:
        """Take one token for this request from the store (see L{IRateLimitStore.take})."""
        return self.store.take(self.key_for(request, client, caller), self.spec_for(service))
