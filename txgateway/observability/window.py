"""
What the operator's status page shows, kept cheaply: the last 60 seconds
of each endpoint's attempts in per-second buckets on the injected clock
(fixed arrays, reused: nothing grows per request), the last circuit
transitions and fallbacks, and the end users who spent the most in the
last hour.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["EventRing", "LATENCY_BUCKETS", "RecentSpenders", "RecentWindow", "SecondCounts", "add_counts", "percentile_of"]


def add_counts(into: dict, where: Any, amounts: Any) -> None:
    """Add C{amounts} (numbers) to C{into[where]}, a list of as many counts (made at the first)."""
    counts = into.get(where)
    if counts is None:
        into[where] = list(amounts)
    else:
        for index, amount in enumerate(amounts):
            counts[index] += amount

#: The latency buckets of /metrics' histograms and of this window (one tuple, so both agree).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WINDOW_SECONDS = 60


class _Second:
    """One second of one endpoint: attempts, failed ones, and their latency histogram."""

    __slots__ = ("second", "count", "errors", "buckets")

    def __init__(self) -> None:
        self.second = -1
        self.count = 0
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def reset(self, second: int) -> None:
        self.second = second
        self.count = 0
        self.errors = 0
        buckets = self.buckets
        for index in range(len(buckets)):
            buckets[index] = 0


def percentile_of(buckets: list[int], total: int, fraction: float) -> float | None:
    """
    The C{fraction} percentile of a latency histogram, as Prometheus'
    C{histogram_quantile} estimates it (linear within the bucket).
    """
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(buckets):
        if seen + count >= rank and count:
            lower = LATENCY_BUCKETS[index - 1] if index > 0 else 0.0
            if index >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]  # beyond the last bound: the bound
            upper = LATENCY_BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class RecentWindow:
    """
    The last L{WINDOW_SECONDS} seconds of each (service, endpoint)'s
    attempts: requests per second, error rate, p50/p99 of the time to the
    backend's headers.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._rings: dict[tuple[str, str], list[_Second]] = {}
        #: Each endpoint's last circuit transitions: (time, from, to), oldest first.
        self._transitions: dict[tuple[str, str], deque[tuple[float, str, str]]] = {}

    def _slot(self, key: tuple[str, str]) -> _Second:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [_Second() for _ in range(WINDOW_SECONDS)]
        second = int(self._clock.seconds())
        slot = ring[second % WINDOW_SECONDS]
        if slot.second != second:
            slot.reset(second)
        return slot

    def observe(self, service: str, endpoint: str, failed: bool) -> None:
        """One attempt, and whether it failed (its time to headers comes by L{time})."""
        slot = self._slot((service, endpoint))
        slot.count += 1
        if failed:
            slot.errors += 1

    def time(self, service: str, endpoint: str, seconds: float) -> None:
        """One attempt's time until the backend's headers."""
        self._slot((service, endpoint)).buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def transition(self, service: str, endpoint: str, from_state: str, to_state: str) -> None:
        """An endpoint's circuit changed state (for the bands of L{series})."""
        kept = self._transitions.get((service, endpoint))
        if kept is None:
            kept = self._transitions[(service, endpoint)] = deque(maxlen=64)
        kept.append((self._clock.seconds(), from_state, to_state))

    def series(self, service: str, endpoints: dict[str, str]) -> dict[str, list]:
        """
        The service's last 60 s, a value a second (oldest first, the
        current second last), over C{endpoints} (their URLs and current
        circuit states): requests per second, error rate, p99 ms (L{None}
        where nothing was timed), and whether any circuit was open.
        """
        now = int(self._clock.seconds())
        seconds = range(now - WINDOW_SECONDS + 1, now + 1)
        counts = [0] * WINDOW_SECONDS
        errors = [0] * WINDOW_SECONDS
        buckets = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in range(WINDOW_SECONDS)]
        opened = [False] * WINDOW_SECONDS
        for url, state in endpoints.items():
            ring = self._rings.get((service, url))
            for slot in ring or ():
                if now - WINDOW_SECONDS < slot.second <= now:
                    index = slot.second - (now - WINDOW_SECONDS + 1)
                    counts[index] += slot.count
                    errors[index] += slot.errors
                    for bucket, value in enumerate(slot.buckets):
                        buckets[index][bucket] += value
            for index, second in enumerate(seconds):
                if self._state_during(service, url, state, second) == "open":
                    opened[index] = True
        p99 = []
        for second_buckets in buckets:
            timed = sum(second_buckets)
            value = percentile_of(second_buckets, timed, 0.99)
            p99.append(None if value is None else round(value * 1000, 1))
        return {
            "requests_per_s": counts,
            "error_rate": [round(e / c, 4) if c else 0.0 for e, c in zip(errors, counts)],
            "p99_ms": p99,
            "open": opened,
        }

    def _state_during(self, service: str, endpoint: str, current: str, second: int) -> str:
        """An endpoint's circuit state at the end of C{second}: the last transition before it, else the state before the first."""
        state = None
        for at, from_state, to_state in self._transitions.get((service, endpoint), ()):
            if at < second + 1:
                state = to_state
            else:
                return from_state if state is None else state
        return current if state is None else state

    def state(self) -> dict:
        """
        What this window holds, JSON-able: each endpoint's seconds still in
        the window and its transitions (for L{absorb} in another process).
        """
        now = int(self._clock.seconds())
        rings = []
        for (service, endpoint), ring in self._rings.items():
            seconds = [
                [slot.second, slot.count, slot.errors, list(slot.buckets)]
                for slot in ring
                if now - WINDOW_SECONDS < slot.second <= now
            ]
            if seconds:
                rings.append([service, endpoint, seconds])
        transitions = [[service, endpoint, [list(t) for t in kept]] for (service, endpoint), kept in self._transitions.items()]
        return {"rings": rings, "transitions": transitions}

    def absorb(self, state: dict) -> None:
        """Add another window's L{state} to this one (the seconds summed, the transitions merged in time order)."""
        for service, endpoint, seconds in state["rings"]:
            ring = self._rings.get((service, endpoint))
            if ring is None:
                ring = self._rings[(service, endpoint)] = [_Second() for _ in range(WINDOW_SECONDS)]
            for second, count, errors, buckets in seconds:
                slot = ring[second % WINDOW_SECONDS]
                if slot.second != second:
                    slot.reset(second)
                slot.count += count
                slot.errors += errors
                for index, value in enumerate(buckets):
                    slot.buckets[index] += value
        for service, endpoint, kept in state["transitions"]:
            mine = self._transitions.get((service, endpoint), ())
            merged = sorted([*mine, *(tuple(t) for t in kept)])
            self._transitions[(service, endpoint)] = deque(merged, maxlen=64)

    def summary(self, service: str, endpoint: str) -> dict[str, Any]:
        """Requests per second, error rate and p50/p99 (ms) over the window."""
        ring = self._rings.get((service, endpoint))
        now = int(self._clock.seconds())
        count = errors = 0
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for slot in ring or ():
            if now - WINDOW_SECONDS < slot.second <= now:
                count += slot.count
                errors += slot.errors
                for index, value in enumerate(slot.buckets):
                    buckets[index] += value
        timed = sum(buckets)
        p50 = percentile_of(buckets, timed, 0.5)
        p99 = percentile_of(buckets, timed, 0.99)
        return {
            "requests_per_s": round(count / WINDOW_SECONDS, 3),
            "error_rate": round(errors / count, 4) if count else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        }


class EventRing:
    """The last C{size} circuit transitions and fallbacks, newest first."""

    def __init__(self, clock: IReactorTime, size: int = 50) -> None:
        self._clock = clock
        self._events: deque[dict] = deque(maxlen=size)

    def add(self, kind: str, service: str, from_: str, to: str, reason: str, request_id: str | None) -> None:
        """Remember one event (C{kind}: C{circuit} or C{fallback})."""
        self._events.appendleft({
            "time": round(self._clock.seconds(), 3), "kind": kind, "service": service,
            "from": from_, "to": to, "reason": reason, "request_id": request_id,
        })

    def recent(self) -> list[dict]:
        """The events, newest first."""
        return list(self._events)

    def absorb(self, events: list[dict]) -> None:
        """Merge another ring's L{recent} events into this one, newest first."""
        merged = sorted([*self._events, *events], key=lambda event: event["time"], reverse=True)
        self._events = deque(merged, maxlen=self._events.maxlen)


class SecondCounts:
    """
    Amounts per name over the last 60 seconds, in per-second slots on the
    injected clock (tokens per model, refusals): one fixed list per name.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._slots: dict[str, tuple[list[int], list[int]]] = {}

    def add(self, name: str, amount: int = 1) -> None:
        """Count C{amount} for C{name} in the current second."""
        second = int(self._clock.seconds())
        slots = self._slots.get(name)
        if slots is None:
            slots = self._slots[name] = ([-1] * WINDOW_SECONDS, [0] * WINDOW_SECONDS)
        seconds, amounts = slots
        index = second % WINDOW_SECONDS
        if seconds[index] != second:
            seconds[index] = second
            amounts[index] = 0
        amounts[index] += amount

    def series(self, name: str) -> list[int]:
        """C{name}'s amount in each of the last 60 seconds, oldest first (the current second last)."""
        now = int(self._clock.seconds())
        slots = self._slots.get(name)
        if slots is None:
            return [0] * WINDOW_SECONDS
        seconds, amounts = slots
        series = []
        for second in range(now - WINDOW_SECONDS + 1, now + 1):
            index = second % WINDOW_SECONDS
            series.append(amounts[index] if seconds[index] == second else 0)
        return series

    def state(self) -> dict:
        """C{{name: [[second, amount], ...]}} for the seconds still in the window (see L{absorb})."""
        now = int(self._clock.seconds())
        return {
            name: [[second, amount] for second, amount in zip(*slots) if now - WINDOW_SECONDS < second <= now]
            for name, slots in self._slots.items()
        }

    def absorb(self, state: dict) -> None:
        """Add another process's L{state} to these counts."""
        for name, seconds in state.items():
            slots = self._slots.get(name)
            if slots is None:
                slots = self._slots[name] = ([-1] * WINDOW_SECONDS, [0] * WINDOW_SECONDS)
            mine, amounts = slots
            for second, amount in seconds:
                index = second % WINDOW_SECONDS
                if mine[index] != second:
                    mine[index] = second
                    amounts[index] = 0
                amounts[index] += amount

    def names(self) -> list[str]:
        """Every name counted in the last 60 seconds."""
        return sorted(name for name in self._slots if any(self.series(name)))


#: Minutes the top spenders are kept over.
SPENDER_MINUTES = 60
#: The most (key, end user) pairs one minute keeps: past it, a minute's new
#: end users are counted together as L{OTHER_SPENDERS} of their key.
MOST_SPENDERS_PER_MINUTE = 2_000
#: Where the end users past L{MOST_SPENDERS_PER_MINUTE} are counted.
OTHER_SPENDERS = "(others)"
#: The spenders one process hands another to merge (L{RecentSpenders.state}).
SHARED_SPENDERS = 200


class RecentSpenders:
    """
    What each end user (of each key) spent over the last hour, in
    per-minute slots on the injected clock, bounded however many end
    users call: the status page's top spenders.  Merged over several
    processes (L{absorb}), each hands its L{SHARED_SPENDERS} dearest: an
    end user below that in every process may be left out of the top.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: (minute, {(key, end user): [cost_nano, tokens, requests]}) per slot.
        self._slots: list[tuple[int, dict]] = [(-1, {})] * SPENDER_MINUTES
        self._absorbed: dict[tuple[str, str], list[int]] = {}

    def add(self, key: str, end_user: str, cost_nano: int, tokens: int) -> None:
        """Count one settled call of C{end_user} under C{key}."""
        minute = int(self._clock.seconds() // 60)
        index = minute % SPENDER_MINUTES
        slot_minute, counts = self._slots[index]
        if slot_minute != minute:
            counts = {}
            self._slots[index] = (minute, counts)
        who = (key, end_user)
        held = counts.get(who)
        if held is None:
            if len(counts) >= MOST_SPENDERS_PER_MINUTE:
                who = (key, OTHER_SPENDERS)
                held = counts.get(who)
            if held is None:
                held = counts[who] = [0, 0, 0]
        held[0] += cost_nano
        held[1] += tokens
        held[2] += 1

    def _sums(self) -> dict[tuple[str, str], list[int]]:
        now = int(self._clock.seconds() // 60)
        sums: dict[tuple[str, str], list[int]] = {who: list(counts) for who, counts in self._absorbed.items()}
        for minute, counts in self._slots:
            if now - SPENDER_MINUTES < minute <= now:
                for who, amounts in counts.items():
                    add_counts(sums, who, amounts)
        return sums

    def top(self, count: int) -> list[tuple[str, str, int, int, int]]:
        """The C{count} dearest C{(key, end_user, cost_nano, tokens, requests)} of the last hour, dearest first."""
        dearest = heapq.nlargest(count, self._sums().items(), key=lambda item: (item[1][0], item[1][1]))
        return [(key, end_user, *amounts) for (key, end_user), amounts in dearest]

    def state(self) -> list:
        """The L{SHARED_SPENDERS} dearest of the last hour, JSON-able, for another process to L{absorb}."""
        return [list(row) for row in self.top(SHARED_SPENDERS)]

    def absorb(self, state: list) -> None:
        """Add another process's L{state}."""
        for key, end_user, *amounts in state:
            add_counts(self._absorbed, (key, end_user), amounts)
