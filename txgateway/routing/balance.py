"""
Which endpoint of a service an attempt goes to.

A pure decision over the endpoints' observable state (in flight, the decayed
average time to headers, whether the breaker would admit): no I/O, no
clock; the broker asks, then asks the chosen endpoint's breaker to admit.

- C{least_requests} (default): two endpoints picked at random among the
  candidates, the one with fewer requests in flight wins, ties to the lower
  decayed time to headers (an endpoint not yet measured counts as the
  fastest);
- C{round_robin}: each candidate in turn;
- C{ordered}: the first candidate in list order (primary and backups).
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

from txgateway.config.gateway import BALANCE_MODES

__all__ = ["Balancer", "BalancedEndpoint", "TTFB_DECAY"]

#: Weight of the newest time-to-headers sample in the decayed average.
TTFB_DECAY = 0.2


class BalancedEndpoint(Protocol):
    """What the balancer reads of an endpoint."""

    in_flight: int
    ttfb: float | None

    def may_admit(self) -> bool:
        """Whether its breaker would let an attempt through now."""


class Balancer:
    """
    Picks endpoints for one service.

    @param mode: one of L{BALANCE_MODES}.
    @param rng: randomness for C{least_requests}'s two choices.
    """

    def __init__(self, mode: str, rng: random.Random | None = None) -> None:
        if mode not in BALANCE_MODES:
            raise ValueError(f"unknown balance mode {mode!r}")
        self.mode = mode
        self._rng = rng or random.Random()
        self._next = 0

    def order(self, endpoints: Sequence[BalancedEndpoint], avoid: object = None) -> list[BalancedEndpoint]:
        """
        The endpoints to try, best first: those that may admit (the one to
        C{avoid}, the endpoint that just failed, last among them when
        another may admit).  Empty when none may admit.
        """
        candidates = [endpoint for endpoint in endpoints if endpoint.may_admit()]
        if len(candidates) > 1 and avoid is not None and avoid in candidates:
            candidates.remove(avoid)
            tail = [avoid]
        else:
            tail = []
        if len(candidates) > 1:
            first = self._pick(candidates, endpoints)
            candidates.remove(first)
            candidates.insert(0, first)
        return candidates + tail

    def _pick(self, candidates: list[BalancedEndpoint], endpoints: Sequence[BalancedEndpoint]) -> BalancedEndpoint:
        if self.mode == "ordered":
            return candidates[0]
        if self.mode == "round_robin":
            count = len(endpoints)
            for step in range(count):
                endpoint = endpoints[(self._next + step) % count]
                if endpoint in candidates:
                    self._next = (self._next + step + 1) % count
                    return endpoint
            return candidates[0]
        count = len(candidates)
        first = int(self._rng.random() * count)
        second = int(self._rng.random() * (count - 1))
        if second >= first:
            second += 1  # two different endpoints
        one, other = candidates[first], candidates[second]
        return other if _load(other) < _load(one) else one


def _load(endpoint: BalancedEndpoint) -> tuple[int, float]:
    return endpoint.in_flight, endpoint.ttfb if endpoint.ttfb is not None else 0.0


def decayed(average: float | None, sample: float) -> float:
    """The decayed average time to headers after one more C{sample}."""
    return sample if average is None else average + TTFB_DECAY * (sample - average)
