"""
L{IdleTimer}: one timer for "nothing was seen for so long", whose every
sighting costs a clock read, not a timer's reset: the client connection's
idle timeout and a relayed body's both ride on it (a stream's chunk would
otherwise move a timer in the reactor's heap each time).

The idle timers of a clock share one reactor timer: they wait in a heap by
when each is due (L{_IdleSchedule}), under one C{callLater} for the
earliest.  A reactor timer of its own would hold a stream's
C{DelayedCall}, its two bound methods and its arguments, about 0.4 KB for
as long as the stream lasts; a heap entry is a list of three.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["IdleTimer"]

#: Entries of stopped timers a schedule leaves in its heap before it sweeps
#: them out (then only once they are more than half of it): stopping a
#: timer empties its entry, it does not take it out of the heap, like a
#: cancelled C{DelayedCall} in Twisted's heap.
_SWEEP_FROM = 50

#: A heap entry is C{[due, order, timer]}, compared by when it is due (then
#: by the order it went in: never by timer); C{timer} is L{None} once the
#: timer stopped, so that the entry holds neither it nor its owner.
_DUE, _TIMER = 0, 2


class IdleTimer:
    """
    Calls C{went_idle} once nothing was L{seen} for C{timeout} seconds
    since L{start}: when it comes due early, it waits what is left.

    C{went_idle} is usually a bound method of the timer's owner: L{close}
    (or dropping the timer once stopped) leaves no reference cycle behind.
    """

    __slots__ = ("_clock", "_schedule", "_timeout", "_went_idle", "_last_seen", "_entry")

    def __init__(self, clock: IReactorTime, timeout: float, went_idle: Callable[[], None]) -> None:
        self._clock = clock  # its schedule's too: kept here, a sighting reads it without a hop
        self._schedule = _IdleSchedule.of(clock)
        self._timeout = timeout
        self._went_idle: Callable[[], None] | None = went_idle
        self._last_seen = 0.0
        #: Its entry in its schedule's heap while it is armed.
        self._entry: list | None = None

    @property
    def running(self) -> bool:
        """A timer is armed."""
        return self._entry is not None

    def start(self) -> None:
        """The timeout counts from now (a timer is armed unless one is, or it was closed)."""
        now = self._last_seen = self._clock.seconds()
        if self._entry is None and self._went_idle is not None:
            self._entry = self._schedule.add(now + self._timeout, self)

    def seen(self) -> None:
        """Something was seen now: the timeout counts from now, the timer left as it is."""
        self._last_seen = self._clock.seconds()

    def stop(self) -> None:
        """No timer, until the next L{start}."""
        entry, self._entry = self._entry, None
        if entry is not None:
            entry[_TIMER] = None
            self._schedule.stopped()

    def close(self) -> None:
        """Stopped for good: never armed again, and its owner no longer referred to."""
        self.stop()
        self._went_idle = None


class _IdleSchedule:
    """
    The L{IdleTimer}s of one clock as entries of a heap by when each is
    due, and one reactor timer for the earliest.  A timer that comes due
    with a sighting since goes back in, due a timeout after it; the entry
    of one stopped stays in the heap, empty, until it comes due or a sweep
    takes it out.
    """

    __slots__ = ("_clock", "_heap", "_order", "_stopped", "_call", "_call_at", "__weakref__")

    #: Each clock's schedule by the clock's id, held weakly: a schedule lives as long as its
    #: timers or its reactor timer do (and keeps its clock, so no other clock takes that id).
    _of: "weakref.WeakValueDictionary[int, _IdleSchedule]" = weakref.WeakValueDictionary()

    @classmethod
    def of(cls, clock: IReactorTime) -> "_IdleSchedule":
        """The schedule of C{clock}'s idle timers (made with its first one, gone with the last)."""
        schedule = cls._of.get(id(clock))
        if schedule is None:
            schedule = cls._of[id(clock)] = cls(clock)
        return schedule

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[list] = []
        self._order = itertools.count()
        #: Entries in the heap emptied by a stop.
        self._stopped = 0
        self._call: IDelayedCall | None = None
        #: When C{_call} is due.
        self._call_at = 0.0

    def add(self, due: float, timer: IdleTimer) -> list:
        """C{timer}'s entry, due at C{due}."""
        entry = [due, next(self._order), timer]
        heapq.heappush(self._heap, entry)
        self._wake_by(due)
        return entry

    def stopped(self) -> None:
        """An entry of the heap was emptied."""
        self._stopped += 1
        heap = self._heap
        if self._stopped == len(heap):
            self._empty()
        elif self._stopped > _SWEEP_FROM and 2 * self._stopped > len(heap):
            # In place: a sweep may come from a timer's went_idle, while _fire walks the heap.
            heap[:] = [entry for entry in heap if entry[_TIMER] is not None]
            heapq.heapify(heap)
            self._stopped = 0

    def _empty(self) -> None:
        """Nothing in the heap is armed: no heap, and no reactor timer either."""
        self._heap.clear()
        self._stopped = 0
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _wake_by(self, due: float) -> None:
        """The reactor timer fires no later than C{due}."""
        call = self._call
        if call is not None:
            if self._call_at <= due:
                return
            call.cancel()
        self._call_at = due
        self._call = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        try:
            self._come_due(self._clock.seconds())
        finally:
            # Even past a went_idle that raised, the rest keep their reactor timer.
            if self._stopped == len(self._heap):
                self._empty()
            else:
                # A timer started by a went_idle may have set the reactor timer later than the heap's first.
                self._wake_by(self._heap[0][_DUE])

    def _come_due(self, now: float) -> None:
        """Every entry due by C{now}: an emptied one leaves, a timer seen since waits what is left, the rest say idle."""
        heap = self._heap
        while heap and heap[0][_DUE] <= now:
            entry = heapq.heappop(heap)
            timer = entry[_TIMER]
            if timer is None:
                self._stopped -= 1
                continue
            due = timer._last_seen + timer._timeout
            if due > now:
                entry[_DUE] = due
                heapq.heappush(heap, entry)
                continue
            timer._entry = None
            timer._went_idle()  # type: ignore[misc]
