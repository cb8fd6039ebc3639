"""The seam between the broker and where buckets live."""

from zope.interface import Attribute, Interface

__all__ = ["IRateLimitStore"]


class IRateLimitStore(Interface):
    """Somewhere token buckets live: this process's memory, or Redis."""

    description = Attribute("What C{/health} shows under C{ratelimit}: a JSON-able dict.")

    def take(key, spec):
        """
        Take one token from the bucket of C{key} in the family C{spec}.

        @param key: the client key (address, header value, key name).
        @type key: L{str}
        @type spec: L{txgateway.ratelimit.bucket.BucketSpec}
        @return: a L{Deferred} firing with a
            L{txgateway.ratelimit.bucket.Decision} (at once from a store in
            this process, later from one that asks another); it never fails.
        """

    def close():
        """Release connections and timers; returns a L{Deferred}."""
