"""
The ledger in this gateway's memory, with settled spend kept in a SQLite
file: exact for one gateway, no server needed.

Reservations and per-minute windows live only in memory (a restart
forgets them, which gives every reservation back).  Settled spend is
written off the reactor thread, batched every L{FLUSH_INTERVAL} seconds,
and flushed at stop; a gateway killed outright loses at most the spend
settled in its last L{FLUSH_INTERVAL} seconds (and a write in progress).
At start the file's rows are read back into every budget period they
fall in; an end user's, into the current period of their key's budget
(only for the keys whose end users have budgets of their own).
"""

from __future__ import annotations

import calendar
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from txgateway.governance.interface import IGovernanceStore, ScopeSpend, Settled, SpendReport, top_end_users
from txgateway.governance.ledger import Ask, Ledger, ScopeLimits, Verdict, end_user_scope
from txgateway.governance.periods import day_of, period_key
from txgateway.governance.spendfile import EndUserRow, SpendFile, SpendRow
from txgateway.observability.window import add_counts

__all__ = ["END_USER_DAYS", "FLUSH_INTERVAL", "LocalLedgerStore", "MOST_END_USER_ROWS"]

#: Seconds settled spend may wait before it is written to the file.
FLUSH_INTERVAL = 0.2
#: Days of end users' spend kept in memory for the spend report.
END_USER_DAYS = 40
#: The most (day, key, end user) rows kept in memory for the spend report:
#: past it, a day's new end users are reported together as L{OTHER_END_USERS}
#: (their budgets are still each their own; the file keeps every row).
MOST_END_USER_ROWS = 200_000
#: The end user the report counts past L{MOST_END_USER_ROWS} under.
OTHER_END_USERS = "(others)"

_PERIODS = ("day", "week", "month", "total")


def _day_start(day: str) -> float:
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


@implementer(IGovernanceStore)
class LocalLedgerStore:
    """
    A ledger in memory over a spend file.

    @param spend_file: where settled spend is kept, or L{None} (memory only).
    @param run_in_thread: calls a blocking function off the reactor thread
        and returns a L{Deferred} of its result.
    @param end_user_budget_periods: the budget period of each key whose end
        users have budgets, by key name: their spend is read back at start.
    """

    def __init__(
        self,
        clock: IReactorTime,
        spend_file: SpendFile | None,
        run_in_thread: Callable[..., Deferred],
        log: Any,
        end_user_budget_periods: dict[str, str] | None = None,
    ) -> None:
        self._clock = clock
        self._file = spend_file
        self._run_in_thread = run_in_thread
        self._log = log
        self.ledger = Ledger()
        self._days: dict[tuple, list[int]] = {}
        self._pending: dict[tuple, list[int]] = {}
        #: (day, key, end user) -> [prompt, completion, cost, requests], the last L{END_USER_DAYS} days.
        self._end_user_days: dict[tuple, list[int]] = {}
        self._pending_end_users: dict[tuple, list[int]] = {}
        self._end_users_capped = False
        self._writing: Deferred | None = None
        #: Why the last write of the spend file failed (L{None}: it did not): the store is unhealthy meanwhile.
        self.write_failure: str | None = None
        self._flusher: LoopingCall | None = None
        if spend_file is not None:
            for row in spend_file.rows():
                self._restore(row)
            self._restore_end_users(spend_file, end_user_budget_periods or {})
            self._flusher = LoopingCall(self._flush)
            self._flusher.clock = clock
            self._flusher.start(FLUSH_INTERVAL, now=False)

    def _restore(self, row: SpendRow) -> None:
        day, key, team, model, prompt, completion, cost, requests = row
        add_counts(self._days, (day, key, team, model), (prompt, completion, cost, requests))
        start = _day_start(day)
        for scope in (f"key:{key}", f"team:{team}") if team else (f"key:{key}",):
            for period in _PERIODS:
                self.ledger.restore(scope, period_key(period, start), cost)

    def _restore_end_users(self, spend_file: SpendFile, budget_periods: dict[str, str]) -> None:
        """The end users' rows of the last days (the report's) and their spend in their key's current budget period."""
        now = self._clock.seconds()
        for row in spend_file.end_user_rows(day_of(now - (END_USER_DAYS - 1) * 86400)):
            self._add_end_user_day(row[:3], row[3:])
            day, key, end_user, _, _, cost, _ = row
            period = budget_periods.get(key)
            if period is not None and period != "total":
                budget_key = period_key(period, _day_start(day))
                if budget_key == period_key(period, now):
                    self.ledger.restore(end_user_scope(key, end_user), budget_key, cost)
        if "total" in budget_periods.values():
            for key, end_user, cost in spend_file.end_user_totals():
                if budget_periods.get(key) == "total":
                    self.ledger.restore(end_user_scope(key, end_user), "total", cost)

    def _add_end_user_day(self, where: tuple, amounts: tuple) -> None:
        """Count C{amounts} for the report, within L{MOST_END_USER_ROWS}."""
        if where not in self._end_user_days and len(self._end_user_days) >= MOST_END_USER_ROWS:
            if not self._end_users_capped:
                self._end_users_capped = True
                self._log.warning(
                    "end_user_report_capped", rows=MOST_END_USER_ROWS,
                    reason=f"more end users than the spend report keeps: the others are reported as {OTHER_END_USERS!r}",
                )
            where = (where[0], where[1], OTHER_END_USERS)
        add_counts(self._end_user_days, where, amounts)

    @property
    def description(self) -> dict:
        return {
            "backend": "sqlite" if self._file is not None else "memory",
            "healthy": self.write_failure is None,
            **({"write_failure": self.write_failure} if self.write_failure is not None else {}),
            "state_file": self._file.path if self._file is not None else None,
            "reserved": self.ledger.holding,
            "unwritten_rows": len(self._pending) + len(self._pending_end_users),
        }

    def reserve(self, ask: Ask) -> Deferred[Verdict]:
        return succeed(self.ledger.reserve(ask, self._clock.seconds()))

    def settle(self, ask: Ask, settled: Settled) -> Deferred[None]:
        now = self._clock.seconds()
        self.ledger.settle(ask, settled.tokens, settled.cost_nano, now)
        if settled.models:
            day = day_of(now)
            for position, use in enumerate(settled.models):
                where = (day, settled.key, settled.team or "", use.model)
                amounts = (use.prompt_tokens, use.completion_tokens, use.cost_nano, 0 if position else 1)
                add_counts(self._days, where, amounts)
                if self._file is not None:
                    add_counts(self._pending, where, amounts)
            if settled.end_user is not None:
                where = (day, settled.key, settled.end_user)
                amounts = (
                    sum(use.prompt_tokens for use in settled.models), sum(use.completion_tokens for use in settled.models),
                    settled.cost_nano, 1,
                )
                self._add_end_user_day(where, amounts)
                if self._file is not None:
                    add_counts(self._pending_end_users, where, amounts)
        return succeed(None)

    def renew(self, reservation_ids: list[str], expires_at: float) -> Deferred[None]:
        self.ledger.renew(reservation_ids, expires_at)
        return succeed(None)

    def spend(self, scopes: list[ScopeLimits], days: int) -> Deferred[SpendReport]:
        now = self._clock.seconds()
        self.ledger.lapse(now)
        report = []
        for limits in scopes:
            key = (limits.scope, limits.budget_key(now))
            reserved = self.ledger.reserved.get(key, 0)
            tokens, requests = self.ledger.quotas(limits, now)
            report.append(
                ScopeSpend(
                    limits.scope, key[1], self.ledger.committed.get(key, 0) - reserved, reserved,
                    self.ledger.parallel(limits.scope), tokens, requests,
                )
            )
        first_day = day_of(now - (days - 1) * 86400)
        rows = tuple(sorted(where + tuple(counts) for where, counts in self._days.items() if where[0] >= first_day))
        self._forget_old_end_users(now)
        end_users = top_end_users(where + tuple(counts) for where, counts in self._end_user_days.items() if where[0] >= first_day)
        return succeed(SpendReport(tuple(report), rows, end_users))

    def _forget_old_end_users(self, now: float) -> None:
        first_kept = day_of(now - (END_USER_DAYS - 1) * 86400)
        old = [where for where in self._end_user_days if where[0] < first_kept]
        for where in old:
            del self._end_user_days[where]
        if old:
            self._end_users_capped = False

    def _flush(self) -> Deferred[None] | None:
        """Write what was settled since the last write (one write at a time)."""
        if self._writing is not None or not (self._pending or self._pending_end_users) or self._file is None:
            return self._writing
        batch, self._pending = self._pending, {}
        end_user_batch, self._pending_end_users = self._pending_end_users, {}
        rows = [where + tuple(counts) for where, counts in batch.items()]
        end_user_rows: list[EndUserRow] = [where + tuple(counts) for where, counts in end_user_batch.items()]
        writing = self._writing = self._run_in_thread(self._file.add, rows, end_user_rows)

        def written(result: object) -> None:
            self._writing = None

        def succeeded(result: object) -> None:
            if self.write_failure is not None:
                self.write_failure = None
                self._log.warning("budgets_write_recovered", state_file=self._file.path, rows=len(rows))

        def failed(failure: Any) -> None:
            # Kept for the next write: spend is never dropped for a full disk.
            for where, counts in batch.items():
                add_counts(self._pending, where, tuple(counts))
            for where, counts in end_user_batch.items():
                add_counts(self._pending_end_users, where, tuple(counts))
            if self.write_failure is None:
                # Said once when writes start failing (and once when they work again), not every flush.
                self._log.error("budgets_write_failed", state_file=self._file.path, reason=failure.getErrorMessage(),
                                kept_in_memory=True)
            self.write_failure = failure.getErrorMessage()

        writing.addCallbacks(succeeded, failed).addBoth(written)
        return writing

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        if self._file is None:
            return
        if self._writing is not None:
            await self._writing
        if self._pending or self._pending_end_users:
            await self._flush()
        spend_file, self._file = self._file, None
        await self._run_in_thread(spend_file.close)
