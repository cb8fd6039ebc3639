"""
L{IdleTimer}: one timer for "nothing was seen for so long", whose every
sighting costs a clock read, not a timer's reset: the client connection's
idle timeout and a relayed body's both ride on it (a stream's chunk would
otherwise move a timer in the reactor's heap each time).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["IdleTimer"]


class IdleTimer:
    """
    Calls C{went_idle} once nothing was L{seen} for C{timeout} seconds
    since L{start}: when its timer fires early, it waits what is left.

    C{went_idle} is usually a bound method of the timer's owner: L{close}
    (or dropping the timer once stopped) leaves no reference cycle behind.
    """

    __slots__ = ("_clock", "_timeout", "_went_idle", "_last_seen", "_call")

    def __init__(self, clock: IReactorTime, timeout: float, went_idle: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._went_idle: Callable[[], None] | None = went_idle
        self._last_seen = 0.0
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        """A timer is armed."""
        return self._call is not None

    def start(self) -> None:
        """The timeout counts from now (a timer is armed unless one is, or it was closed)."""
        self._last_seen = self._clock.seconds()
        if self._call is None and self._went_idle is not None:
            self._call = self._clock.callLater(self._timeout, self._fired)

    def seen(self) -> None:
        """Something was seen now: the timeout counts from now, the timer left as it is."""
        self._last_seen = self._clock.seconds()

    def stop(self) -> None:
        """No timer, until the next L{start}."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def close(self) -> None:
        """Stopped for good: never armed again, and its owner no longer referred to."""
        self.stop()
        self._went_idle = None

    def _fired(self) -> None:
        left = self._last_seen + self._timeout - self._clock.seconds()
        if left > 0:
            self._call = self._clock.callLater(left, self._fired)
            return
        self._call = None
        self._went_idle()  # type: ignore[misc]
