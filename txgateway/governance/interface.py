"""The seam between the governor and where the ledger lives."""

from __future__ import annotations

import heapq
from typing import Any

import attrs
from zope.interface import Attribute, Interface

from txgateway.observability.window import add_counts

__all__ = ["IGovernanceStore", "ModelUse", "Settled", "SpendReport", "TOP_END_USERS", "top_end_users"]


@attrs.define
class ModelUse:
    """What one model (as the gateway sent it) used of one request, and its cost."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int


@attrs.define
class Settled:
    """
    What a request used, replacing its reservation: the tokens counted
    against per-minute limits, the cost, and the same per model.
    """

    key: str
    team: str | None
    tokens: int
    cost_nano: int
    models: tuple[ModelUse, ...] = ()
    #: The end user the request was for (its spend is kept under them too), or L{None}.
    end_user: str | None = None


class IGovernanceStore(Interface):
    """Where the ledger lives: this process (and a SQLite file), or Redis."""

    description = Attribute("What C{/health} shows under C{budgets}: a JSON-able dict.")

    def reserve(ask):
        """
        Reserve L{txgateway.governance.ledger.Ask} in one step.

        @return: a L{Deferred} firing with a
            L{txgateway.governance.ledger.Verdict}; it never fails.
        """

    def settle(ask, settled):
        """
        Replace C{ask}'s reservation by L{Settled}.

        @return: a L{Deferred} that fires when the store has it (it never fails).
        """

    def renew(reservation_ids, expires_at):
        """
        Keep the reservations of C{reservation_ids} (calls still running)
        from lapsing before C{expires_at}; one already settled or lapsed is
        left alone.

        @return: a L{Deferred} that fires when the store has it (it never fails).
        """

    def spend(scopes, days):
        """
        What C{/spend.json} shows: for each L{ScopeLimits} of C{scopes}
        its spend and reservations in the current period, and spend per
        (day, key, team, model) and the top end users over the last
        C{days} days.

        @return: a L{Deferred} firing with a L{SpendReport}.
        """

    def close():
        """Flush what is pending and release files, connections and timers; a L{Deferred}."""


@attrs.frozen
class ScopeSpend:
    """One scope's spend in its current budget period, and its per-minute quotas now."""

    scope: str
    period: str
    spent_nano: int
    reserved_nano: int
    parallel: int
    tokens: object = None
    requests: object = None


@attrs.frozen
class SpendReport:
    """
    What C{/spend.json} shows.

    @ivar days: C{(day, key, team, model, prompt_tokens, completion_tokens,
        cost_nano, requests)} rows, oldest day first.
    @ivar end_users: C{(key, end_user, prompt_tokens, completion_tokens,
        cost_nano, requests)} over the same days: the L{TOP_END_USERS}
        end users who spent the most, dearest first.
    """

    scopes: tuple[ScopeSpend, ...]
    days: tuple[tuple, ...]
    end_users: tuple[tuple, ...] = ()


#: The end users a spend report names (those who spent the most).
TOP_END_USERS = 100


def top_end_users(rows: Any) -> tuple[tuple, ...]:
    """
    The L{TOP_END_USERS} dearest C{(key, end_user, prompt_tokens,
    completion_tokens, cost_nano, requests)} of C{rows} of
    C{(day, key, end_user, ...)} summed over their days.
    """
    sums: dict[tuple[str, str], list[int]] = {}
    for _day, key, end_user, *counts in rows:
        add_counts(sums, (key, end_user), counts)
    dearest = heapq.nlargest(TOP_END_USERS, sums.items(), key=lambda item: (item[1][2], item[1][3]))
    return tuple((key, end_user, *counts) for (key, end_user), counts in dearest)
