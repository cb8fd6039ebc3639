"""
What the supervisor holds for every worker: the memory rate limiter's
buckets and the local ledger (reservations, per-minute windows, and the
spend file), answering the workers' batched calls in the order they came.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from txgateway.governance.interface import IGovernanceStore
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.workers import codec

__all__ = ["SharedState"]


class SharedState:
    """
    The state behind L{txgateway.workers.shared}'s stores.

    @param buckets: the one memory rate-limit store of the daemon.
    @param ledger: the one local ledger, or L{None} when no key is
        governed or budgets live in Redis.
    """

    def __init__(self, buckets: MemoryRateLimitStore, ledger: IGovernanceStore | None) -> None:
        self.buckets = buckets
        self.ledger = ledger

    def batch(self, calls: list) -> Deferred[list]:
        """Answer C{[[name, args], ...]}, in order; a L{Deferred} of the answers."""
        return gatherResults([maybeDeferred(self._one, name, args) for name, args in calls], consumeErrors=True)

    def _one(self, name: str, args: Any) -> Any:
        if name == "take":
            key, spec = args
            return codec.decision_to(self.buckets.decide(key, codec.spec_from(spec)))
        if self.ledger is None:
            raise LookupError("no ledger is kept by the supervisor")
        if name == "reserve":
            return self.ledger.reserve(codec.ask_from(args)).addCallback(codec.verdict_to)
        if name == "settle":
            ask, settled = args
            return self.ledger.settle(codec.ask_from(ask), codec.settled_from(settled))
        if name == "renew":
            ids, expires_at = args
            return self.ledger.renew([str(reservation_id) for reservation_id in ids], float(expires_at))
        if name == "spend":
            scopes, days = args
            return self.ledger.spend(codec.limits_of(scopes), days).addCallback(codec.report_to)
        raise LookupError(f"no such call: {name}")
