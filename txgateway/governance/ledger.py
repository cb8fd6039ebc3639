"""
The ledger: what governed callers may still spend, as pure arithmetic on
an injected time (no I/O).  The SQLite-backed store keeps one in memory;
the Redis store runs the same rules in Lua, and its tests hold it to this
module.

The rules:

 - B{Reserve, then settle.}  A request first reserves its worst case
   (L{Ask}: tokens, requests, nano-dollars, a parallel slot) against every
   scope it falls under (its key, and its key's team).  Only when all of
   them fit is anything taken, in one step.  When the answer ends, its
   reservation is replaced by what it used, and the difference goes back.
 - B{Per-minute limits are sliding windows}: the tokens (or requests)
   taken in the last 60 s, each reservation an entry.  The sum admitted
   in any 60 s never exceeds the limit, however requests race; a settle
   that used more than was reserved raises its entry, the window goes
   over its limit, and later requests wait until entries leave it.
 - B{Budgets are counters per period} (C{d2026-12-03}, C{m2026-12}, ...):
   settled spend plus what is reserved.  A new period is a new counter;
   nothing is reset in place.
 - B{Nothing leaks}: every reservation carries an expiry; one never
   settled (its gateway died) lapses then, and everything it held goes
   back as if it never happened.
"""

from __future__ import annotations

import math
from array import array

import attrs

from txgateway.governance.periods import is_current, period_end, period_key

__all__ = ["IN_FLIGHT_RETRY", "PASSING_SCOPE", "Ask", "Ledger", "NANO_BOUND", "Quota", "ScopeLimits", "TOKENS_BOUND", "Verdict", "WINDOW", "REFUSAL_ORDER", "bounded", "end_user_scope"]

#: Seconds a per-minute window spans.
WINDOW = 60.0

#: The prefix of the scopes that come and go with their callers (an end
#: user's, C{user:KEY:ID}): forgotten when idle (L{Ledger.forget_idle}).
PASSING_SCOPE = "user:"


def end_user_scope(key: str, end_user: str) -> str:
    """The passing scope of C{end_user}'s own allowance within the key named C{key} (key names hold no C{:})."""
    return f"{PASSING_SCOPE}{key}:{end_user}"


#: Seconds between two sweeps of the idle passing scopes.
FORGET_INTERVAL = 60.0

#: The most tokens one call reserves or settles, and the most nano-dollars
#: (US$1,000,000): what any count of the ledgers (memory, SQLite, Redis's
#: Lua, whose numbers are doubles and 64-bit integers) is kept far within.
TOKENS_BOUND = 10**12
NANO_BOUND = 10**15


def bounded(value: object, bound: int) -> int:
    """
    C{value} as a whole number from 0 to C{bound}: what a call may add to a
    ledger, whatever it was handed (a negative is 0, never a refund; a
    fraction is rounded up; what is no number is 0).
    """
    if type(value) is not int:
        if type(value) is not float or value != value:
            return 0
        value = bound if value > bound else math.ceil(value) if value > 0 else 0
    return 0 if value < 0 else bound if value > bound else value

#: Entries that left a window are cut from its arrays once they are this many and half of them.
_COMPACT_FROM = 1024

#: Seconds a refused client is told to wait when what blocks it is the
#: reservations of requests still in flight: they settle, and give back
#: what they did not use, without waiting for the window or the period.
IN_FLIGHT_RETRY = 1.0

#: Refusal reasons, in the order they are reported when several apply: the
#: one a client must not retry first.
BUDGET_EXCEEDED = "budget_exceeded"
TOO_MANY_PARALLEL = "too_many_parallel"
RATE_LIMITED = "rate_limited"
TOKENS_EXCEEDED = "tokens_exceeded"
REFUSAL_ORDER = (BUDGET_EXCEEDED, TOO_MANY_PARALLEL, RATE_LIMITED, TOKENS_EXCEEDED)


@attrs.frozen(cache_hash=True)
class ScopeLimits:
    """
    The limits of one scope: a key (C{key:NAME}) or a team (C{team:NAME});
    L{None} is no such limit.  (Its hash is kept: the Redis store looks its
    scopes up on every call.)
    """

    scope: str
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    budget_nano: int | None = None
    budget_period: str = "month"
    max_parallel: int | None = None

    def budget_key(self, now: float) -> str:
        """The key of the budget period C{now} falls in."""
        return period_key(self.budget_period, now)


@attrs.define
class Ask:
    """
    What one request reserves.

    @ivar reservation_id: unique across every gateway sharing a store.
    @ivar scopes: the scopes it must fit (its key's first).
    @ivar tokens: prompt estimate plus the most it may complete (0 where
        tokens are not counted), bounded (L{bounded}) whatever it is given.
    @ivar cost_nano: C{tokens} at the dearest price among its targets, bounded too.
    @ivar expires_at: when an unsettled reservation lapses.
    """

    reservation_id: str
    scopes: tuple[ScopeLimits, ...]
    tokens: int = attrs.field(converter=lambda value: bounded(value, TOKENS_BOUND))
    cost_nano: int = attrs.field(converter=lambda value: bounded(value, NANO_BOUND))
    expires_at: float


@attrs.define
class Quota:
    """
    A per-minute limit as OpenAI's C{x-ratelimit-*} headers say it, and
    what its window holds (C{used}: above the limit after an overspend).
    """

    limit: int
    remaining: int
    reset: float
    used: int = 0


@attrs.define
class Verdict:
    """
    The outcome of a reservation.

    @ivar reason: why it was refused (one of L{REFUSAL_ORDER}), or L{None}.
    @ivar scope: the scope that refused it.
    @ivar retry_after: seconds until it could fit (L{None}: not by waiting).
    @ivar tokens: the tightest tokens-per-minute quota after the verdict.
    @ivar requests: the tightest requests-per-minute quota.
    @ivar left_nano: of a budget refusal, what the scope's budget had left
        (spend and reservations taken from it, at least 0).
    @ivar in_flight: what refused it is held by requests still in flight (it
        would fit were they settled at nothing): a short wait helps.
    """

    allowed: bool
    reason: str | None = None
    scope: str | None = None
    retry_after: float | None = None
    tokens: Quota | None = None
    requests: Quota | None = None
    left_nano: int | None = None
    in_flight: bool = False


class _Window:
    """
    Entries taken in the last L{WINDOW} seconds, oldest first, and their
    sum.  An entry is a time and an amount in two arrays, not an object: a
    busy key's window holds a minute of its requests, and objects that
    live a minute each scatter the heap every request allocates in.  An
    entry is found again by the position L{add} gave it (a reservation
    keeps its own); a removed one stays as a tombstone (amount C{-1})
    until it leaves the window.
    """

    __slots__ = ("_times", "_amounts", "_base", "_head", "total")

    def __init__(self) -> None:
        self._times = array("d")
        self._amounts = array("q")
        #: The position of the arrays' first element; entries before C{_head} have left the window.
        self._base = 0
        self._head = 0
        self.total = 0

    def trim(self, now: float) -> None:
        times, amounts, head = self._times, self._amounts, self._head
        end = len(times)
        oldest_kept = now - WINDOW
        while head < end and times[head] <= oldest_kept:
            amount = amounts[head]
            if amount > 0:
                self.total -= amount
            head += 1
        if head > _COMPACT_FROM and 2 * head > end:
            del times[:head]
            del amounts[:head]
            self._base += head
            head = 0
        self._head = head

    def add(self, amount: int, now: float) -> int:
        """Take C{amount} at C{now}; the entry's position."""
        self._times.append(now)
        self._amounts.append(amount)
        self.total += amount
        return self._base + len(self._times) - 1

    def _index(self, position: int | None) -> int | None:
        """The index of the entry at C{position} while it is in the window (and not removed), else L{None}."""
        if position is None:
            return None
        index = position - self._base
        return index if index >= self._head and self._amounts[index] >= 0 else None

    def amount_at(self, position: int | None) -> int:
        """What the entry at C{position} holds, 0 once it left the window."""
        index = self._index(position)
        return 0 if index is None else self._amounts[index]

    def remove(self, position: int | None) -> None:
        index = self._index(position)
        if index is not None:
            self.total -= self._amounts[index]
            self._amounts[index] = -1

    def settle(self, position: int | None, used: int, reserved: int, now: float) -> None:
        """
        The entry becomes what was used; once it has left the window (trimmed
        yet or not), only an excess counts, from now.
        """
        index = self._index(position)
        if index is not None and self._times[index] <= now - WINDOW:
            self.trim(now)  # it has left the window: it goes, with whatever came before it
            index = self._index(position)
        if index is not None:
            self.total += used - self._amounts[index]
            self._amounts[index] = used
        elif used > reserved:
            self.add(used - reserved, now)

    @property
    def empty(self) -> bool:
        """Nothing is in the window."""
        return all(amount < 0 for amount in self._amounts[self._head:])

    def seconds_until_fits(self, need: int, limit: int, now: float) -> float | None:
        """Seconds until C{need} more fits under C{limit} (L{None}: never, it is more than the limit)."""
        if need > limit:
            return None
        excess = self.total + need - limit
        times, amounts = self._times, self._amounts
        for index in range(self._head, len(times)):
            if excess <= 0:
                break
            amount = amounts[index]
            if amount < 0:
                continue
            excess -= amount
            if excess <= 0:
                return max(0.0, times[index] + WINDOW - now)
        return 0.0

    def quota(self, limit: int, now: float) -> Quota:
        reset = 0.0
        amounts = self._amounts
        index = len(amounts) - 1
        while index >= self._head and amounts[index] < 0:
            index -= 1
        if index >= self._head:
            reset = max(0.0, self._times[index] + WINDOW - now)
        return Quota(limit, max(0, limit - self.total), reset, self.total)


class _Scope:
    __slots__ = ("tokens", "requests", "parallel")

    def __init__(self) -> None:
        self.tokens = _Window()
        self.requests = _Window()
        self.parallel = 0


@attrs.define
class _Held:
    """A reservation held: its ask, and per scope its budget's period and its entries' positions in the windows."""

    ask: Ask
    #: Per scope, its budget's period (one tuple shared by the reservations of a period: see L{Ledger._shared}).
    budget_keys: tuple[str, ...]
    #: Per scope, the positions of its tokens and of its requests entries (L{None}: that scope has no such window).
    tokens_at: tuple[int | None, ...]
    requests_at: tuple[int | None, ...]


class Ledger:
    """
    Every scope's windows, budgets and parallel counts, and the
    reservations not yet settled.

    @ivar committed: nano-dollars per (scope, period key): settled spend
        plus what is reserved.
    @ivar reserved: nano-dollars per (scope, period key) reserved and not
        yet settled.
    """

    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}
        self._held: dict[str, _Held] = {}
        #: The tuples the reservations held share (equal ones made once): the budget periods' (a few a
        #: period) and the request windows' positions of scopes that count no requests.
        self._shared: dict[tuple, tuple] = {}
        #: The earliest expiry among the reservations held (or earlier: one that settled since).
        self._earliest = math.inf
        self.committed: dict[tuple[str, str], int] = {}
        self.reserved: dict[tuple[str, str], int] = {}
        self._next_forget = -math.inf

    def _scope(self, name: str) -> _Scope:
        scope = self._scopes.get(name)
        if scope is None:
            scope = self._scopes[name] = _Scope()
        return scope

    @property
    def holding(self) -> int:
        """Reservations not yet settled (nor lapsed)."""
        return len(self._held)

    def parallel(self, scope: str) -> int:
        """Requests of C{scope} reserved and not yet settled."""
        found = self._scopes.get(scope)
        return found.parallel if found is not None else 0

    def restore(self, scope: str, budget_key: str, nano: int) -> None:
        """Count C{nano} settled in C{scope}'s period C{budget_key} (spend read back after a restart)."""
        key = (scope, budget_key)
        self.committed[key] = self.committed.get(key, 0) + nano

    def reserve(self, ask: Ask, now: float) -> Verdict:
        """Take C{ask} from every scope it falls under, or from none (the verdict says why)."""
        if now >= self._earliest:
            self.lapse(now)
        if now >= self._next_forget:
            self.forget_idle(now)
        scopes, committed = self._scopes, self.committed
        tokens, cost = ask.tokens, ask.cost_nano
        states = []
        refusal = None
        for limits in ask.scopes:
            name = limits.scope
            scope = scopes.get(name)
            if scope is None:
                scope = scopes[name] = _Scope()
            if limits.tokens_per_minute is not None:
                scope.tokens.trim(now)
            if limits.requests_per_minute is not None:
                scope.requests.trim(now)
            budget_key = (name, period_key(limits.budget_period, now))
            states.append((limits, scope, budget_key))
            found = self._refusal(limits, scope, budget_key, ask, now)
            if found is not None and (refusal is None or REFUSAL_ORDER.index(found[0]) < REFUSAL_ORDER.index(refusal[0])):
                refusal = found
        if refusal is not None:
            return self._verdict(states, now, *refusal)
        reserved = self.reserved
        tokens_at = []
        requests_at = []
        for limits, scope, budget_key in states:
            tokens_at.append(scope.tokens.add(tokens, now) if limits.tokens_per_minute is not None else None)
            requests_at.append(scope.requests.add(1, now) if limits.requests_per_minute is not None else None)
            scope.parallel += 1
            committed[budget_key] = committed.get(budget_key, 0) + cost
            reserved[budget_key] = reserved.get(budget_key, 0) + cost
        budget_keys = tuple([state[2][1] for state in states])
        shared = self._shared
        if len(shared) > 1000:
            shared.clear()  # periods pass: those of earlier ones are shared no more
        budget_keys = shared.setdefault(budget_keys, budget_keys)
        requests_positions = tuple(requests_at)
        if requests_positions.count(None) == len(requests_positions):
            # Most scopes count no requests: one tuple for all.
            requests_positions = shared.setdefault(requests_positions, requests_positions)
        self._held[ask.reservation_id] = _Held(ask, budget_keys, tuple(tokens_at), requests_positions)
        if ask.expires_at < self._earliest:
            self._earliest = ask.expires_at
        return self._verdict(states, now)

    def _refusal(
        self, limits: ScopeLimits, scope: _Scope, budget_key: tuple[str, str], ask: Ask, now: float
    ) -> tuple | None:
        """
        Why C{ask} does not fit C{limits}: C{(reason, scope, retry_after,
        left_nano, in_flight)}, or L{None}.  A wait is said only where
        waiting helps: a short one when reservations in flight are what
        block it, else until the window or the period makes room; none for
        an ask larger than the whole limit.
        """
        budget = limits.budget_nano
        if budget is not None:
            committed = self.committed.get(budget_key, 0)
            if committed + ask.cost_nano > budget:
                left = max(0, budget - committed)
                if ask.cost_nano > budget:
                    return BUDGET_EXCEEDED, limits.scope, None, left, False
                if committed - self.reserved.get(budget_key, 0) + ask.cost_nano <= budget:
                    return BUDGET_EXCEEDED, limits.scope, IN_FLIGHT_RETRY, left, True
                end = period_end(limits.budget_period, now)
                return BUDGET_EXCEEDED, limits.scope, None if end is None else end - now, left, False
        if limits.max_parallel is not None and scope.parallel + 1 > limits.max_parallel:
            return TOO_MANY_PARALLEL, limits.scope, None, None, False
        if limits.requests_per_minute is not None and scope.requests.total + 1 > limits.requests_per_minute:
            return RATE_LIMITED, limits.scope, scope.requests.seconds_until_fits(1, limits.requests_per_minute, now), None, False
        tokens_per_minute = limits.tokens_per_minute
        if tokens_per_minute is not None and scope.tokens.total + ask.tokens > tokens_per_minute:
            if ask.tokens <= tokens_per_minute:
                in_flight = self._tokens_in_flight(limits.scope, scope.tokens)
                if scope.tokens.total - in_flight + ask.tokens <= tokens_per_minute:
                    return TOKENS_EXCEEDED, limits.scope, IN_FLIGHT_RETRY, None, True
            return TOKENS_EXCEEDED, limits.scope, scope.tokens.seconds_until_fits(ask.tokens, tokens_per_minute, now), None, False
        return None

    def _tokens_in_flight(self, name: str, window: _Window) -> int:
        """The tokens the reservations still held take in the scope C{name}'s window (C{window})."""
        in_flight = 0
        for held in self._held.values():
            for limits, tokens_at in zip(held.ask.scopes, held.tokens_at):
                if limits.scope == name:
                    in_flight += window.amount_at(tokens_at)
        return in_flight

    @staticmethod
    def _verdict(
        states: list, now: float, reason: str | None = None, scope: str | None = None, retry_after: float | None = None,
        left_nano: int | None = None, in_flight: bool = False,
    ) -> Verdict:
        # The tightest window of each kind (the first of equals), and only its quota made.
        tokens_window = requests_window = None
        tokens_left = requests_left = 0
        for limits, state, _ in states:
            limit = limits.tokens_per_minute
            if limit is not None:
                left = max(0, limit - state.tokens.total)
                if tokens_window is None or left < tokens_left:
                    tokens_window, tokens_limit, tokens_left = state.tokens, limit, left
            limit = limits.requests_per_minute
            if limit is not None:
                left = max(0, limit - state.requests.total)
                if requests_window is None or left < requests_left:
                    requests_window, requests_limit, requests_left = state.requests, limit, left
        return Verdict(
            reason is None, reason, scope, retry_after,
            tokens_window.quota(tokens_limit, now) if tokens_window is not None else None,
            requests_window.quota(requests_limit, now) if requests_window is not None else None,
            left_nano, in_flight,
        )

    def settle(self, ask: Ask, tokens: int, cost_nano: int, now: float) -> bool:
        """
        Replace C{ask}'s reservation by what it used: C{tokens} and
        C{cost_nano}.  A reservation that already lapsed (or was never
        made here) is charged as new spend at C{now}.

        @return: whether the reservation was still held.
        """
        if now >= self._earliest:
            self.lapse(now)
        tokens = bounded(tokens, TOKENS_BOUND)
        cost_nano = bounded(cost_nano, NANO_BOUND)
        held = self._held.pop(ask.reservation_id, None)
        if held is None:
            for limits in ask.scopes:
                scope = self._scope(limits.scope)
                if limits.tokens_per_minute is not None and tokens > 0:
                    scope.tokens.add(tokens, now)
                key = (limits.scope, limits.budget_key(now))
                self.committed[key] = self.committed.get(key, 0) + cost_nano
            return False
        scopes, committed, reserved = self._scopes, self.committed, self.reserved
        reserved_cost = ask.cost_nano
        for limits, budget_key, tokens_at in zip(ask.scopes, held.budget_keys, held.tokens_at):
            name = limits.scope
            scope = scopes[name]  # a scope holding a reservation is never forgotten
            if limits.tokens_per_minute is not None:
                scope.tokens.settle(tokens_at, tokens, ask.tokens, now)
            scope.parallel -= 1
            key = (name, budget_key)
            committed[key] = committed.get(key, 0) + cost_nano - reserved_cost
            reserved[key] = reserved.get(key, 0) - reserved_cost
        return True

    def renew(self, reservation_ids: list[str], expires_at: float) -> int:
        """
        Move the expiry of the reservations still held among
        C{reservation_ids} to C{expires_at} (never earlier); how many were.
        """
        renewed = 0
        for reservation_id in reservation_ids:
            held = self._held.get(reservation_id)
            if held is not None and held.ask.expires_at < expires_at:
                held.ask.expires_at = expires_at
                renewed += 1
        return renewed

    def lapse(self, now: float) -> list[str]:
        """
        Give back every reservation whose expiry has passed; their ids.
        It looks at the reservations held (those in flight: few), and only
        once the earliest expiry among them has come.
        """
        lapsed = []
        earliest = math.inf
        for reservation_id, held in list(self._held.items()):
            expires_at = held.ask.expires_at
            if expires_at > now:
                earliest = min(earliest, expires_at)
                continue
            del self._held[reservation_id]
            lapsed.append(reservation_id)
            for limits, budget_key, tokens_at, requests_at in zip(held.ask.scopes, held.budget_keys, held.tokens_at, held.requests_at):
                scope = self._scope(limits.scope)
                scope.tokens.remove(tokens_at)
                scope.requests.remove(requests_at)
                scope.parallel -= 1
                key = (limits.scope, budget_key)
                self.committed[key] = self.committed.get(key, 0) - held.ask.cost_nano
                self.reserved[key] = self.reserved.get(key, 0) - held.ask.cost_nano
        self._earliest = earliest
        return lapsed

    def forget_idle(self, now: float) -> int:
        """
        Forget what the passing scopes (end users') no longer need: the
        windows of one with nothing in flight and nothing in its last
        minute, and the budgets of periods that have ended with nothing
        reserved in them.  A ledger whose callers are many stays the size
        of those calling now (and of this period's spenders).  Runs at
        most every L{FORGET_INTERVAL} seconds (from L{reserve}).

        @return: how many entries were forgotten.
        """
        self._next_forget = now + FORGET_INTERVAL
        forgotten = 0
        for name in [name for name in self._scopes if name.startswith(PASSING_SCOPE)]:
            scope = self._scopes[name]
            scope.tokens.trim(now)
            scope.requests.trim(now)
            if scope.parallel == 0 and scope.tokens.empty and scope.requests.empty:
                del self._scopes[name]
                forgotten += 1
        reserved = self.reserved
        for key in [key for key in self.committed if key[0].startswith(PASSING_SCOPE)]:
            if not reserved.get(key) and not is_current(key[1], now):
                del self.committed[key]
                reserved.pop(key, None)
                forgotten += 1
        return forgotten

    def quotas(self, limits: ScopeLimits, now: float) -> tuple[Quota | None, Quota | None]:
        """C{limits}' tokens and requests quotas now (for the operator's view)."""
        scope = self._scope(limits.scope)
        scope.tokens.trim(now)
        scope.requests.trim(now)
        tokens = scope.tokens.quota(limits.tokens_per_minute, now) if limits.tokens_per_minute is not None else None
        requests = scope.requests.quota(limits.requests_per_minute, now) if limits.requests_per_minute is not None else None
        return tokens, requests


def whole_seconds(seconds: float | None) -> int | None:
    """Seconds for a C{Retry-After}: whole, rounded up, at least 1."""
    return None if seconds is None else max(1, math.ceil(seconds))
