"""
In flight as a lease: what an attempt (or a request on a service) holds
of an endpoint's or a route's in-flight count is one object, taken when it
is made and given back exactly once, whatever the path (an answer, an
error, a cancel, a client gone).  Balancing and the retry budget read the
counts; nothing else changes them.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Counted", "InFlight", "Retrying"]


class Counted(Protocol):
    """What keeps an in-flight count: an endpoint, a service's route."""

    in_flight: int


class RetryCounted(Protocol):
    """What keeps a count of requests that are retrying: a service's route."""

    retrying: int


class InFlight:
    """
    One slot of C{holder}'s in-flight count, held from construction until
    L{release} (a second release does nothing).  Also a context manager
    that releases on the way out.
    """

    __slots__ = ("holder", "_held")

    def __init__(self, holder: Counted) -> None:
        holder.in_flight += 1
        self.holder = holder
        self._held = True

    @property
    def held(self) -> bool:
        """Not released yet."""
        return self._held

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self.holder.in_flight -= 1

    def __enter__(self) -> "InFlight":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Retrying(InFlight):
    """One slot of a service route's C{retrying} count (the retry budget's numerator)."""

    __slots__ = ()

    def __init__(self, route: "RetryCounted") -> None:
        route.retrying += 1
        self.holder = route
        self._held = True

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self.holder.retrying -= 1
