"""
The values the workers and the supervisor exchange, as JSON and back:
buckets and decisions, asks, verdicts, settlements and spend reports.
Pure: each function turns one value into lists and numbers, or back.
"""

from __future__ import annotations

from typing import Any

from txgateway.governance.interface import ModelUse, ScopeSpend, Settled, SpendReport
from txgateway.governance.ledger import Ask, Quota, ScopeLimits, Verdict
from txgateway.ratelimit.bucket import BucketSpec, Decision

__all__ = [
    "ask_from", "ask_to", "decision_from", "decision_to", "report_from", "report_to",
    "settled_from", "settled_to", "spec_from", "spec_to", "verdict_from", "verdict_to",
]


def spec_to(spec: BucketSpec) -> list:
    """A bucket family as C{[name, capacity, window]}."""
    return [spec.name, spec.capacity, spec.window]


def spec_from(value: list) -> BucketSpec:
    """The inverse of L{spec_to}."""
    name, capacity, window = value
    return BucketSpec(name, int(capacity), float(window))


def decision_to(decision: Decision) -> list:
    """A rate-limit decision as a list of its fields."""
    return [decision.allowed, decision.limit, decision.remaining, decision.retry_after, decision.reset]


def decision_from(value: list) -> Decision:
    """The inverse of L{decision_to}."""
    allowed, limit, remaining, retry_after, reset = value
    return Decision(bool(allowed), limit, remaining, retry_after, reset)


def _limits_to(limits: ScopeLimits) -> list:
    return [limits.scope, limits.tokens_per_minute, limits.requests_per_minute, limits.budget_nano,
            limits.budget_period, limits.max_parallel]


def ask_to(ask: Ask) -> list:
    """A reservation's ask, its scopes' limits included."""
    return [ask.reservation_id, [_limits_to(limits) for limits in ask.scopes], ask.tokens, ask.cost_nano, ask.expires_at]


def ask_from(value: list) -> Ask:
    """The inverse of L{ask_to}."""
    reservation_id, scopes, tokens, cost_nano, expires_at = value
    return Ask(reservation_id, tuple(ScopeLimits(*limits) for limits in scopes), tokens, cost_nano, expires_at)


def _quota_to(quota: Quota | None) -> list | None:
    return None if quota is None else [quota.limit, quota.remaining, quota.reset, quota.used]


def _quota_from(value: list | None) -> Quota | None:
    return None if value is None else Quota(*value)


def verdict_to(verdict: Verdict) -> list:
    """A reservation's verdict, with its quotas."""
    return [verdict.allowed, verdict.reason, verdict.scope, verdict.retry_after,
            _quota_to(verdict.tokens), _quota_to(verdict.requests), verdict.left_nano, verdict.in_flight]


def verdict_from(value: list) -> Verdict:
    """The inverse of L{verdict_to}."""
    allowed, reason, scope, retry_after, tokens, requests, left_nano, in_flight = value
    return Verdict(allowed, reason, scope, retry_after, _quota_from(tokens), _quota_from(requests), left_nano, in_flight)


def settled_to(settled: Settled) -> list:
    """What a request used, per model too."""
    models = [[use.model, use.prompt_tokens, use.completion_tokens, use.cost_nano] for use in settled.models]
    return [settled.key, settled.team, settled.tokens, settled.cost_nano, models, settled.end_user]


def settled_from(value: list) -> Settled:
    """The inverse of L{settled_to}."""
    key, team, tokens, cost_nano, models, end_user = value
    return Settled(key, team, tokens, cost_nano, tuple(ModelUse(*use) for use in models), end_user)


def report_to(report: SpendReport) -> list:
    """A spend report: each scope's spend and quotas, and the rows per day."""
    scopes = [
        [spend.scope, spend.period, spend.spent_nano, spend.reserved_nano, spend.parallel,
         _quota_to(spend.tokens), _quota_to(spend.requests)]
        for spend in report.scopes
    ]
    return [scopes, [list(row) for row in report.days], [list(row) for row in report.end_users]]


def report_from(value: list) -> SpendReport:
    """The inverse of L{report_to}."""
    scopes, days, end_users = value
    return SpendReport(
        tuple(
            ScopeSpend(scope, period, spent, reserved, parallel, _quota_from(tokens), _quota_from(requests))
            for scope, period, spent, reserved, parallel, tokens, requests in scopes
        ),
        tuple(tuple(row) for row in days),
        tuple(tuple(row) for row in end_users),
    )


def limits_of(args: Any) -> list[ScopeLimits]:
    """The scopes of a C{spend} call."""
    return [ScopeLimits(*limits) for limits in args]


def limits_to(scopes: list[ScopeLimits]) -> list:
    """The scopes of a C{spend} call, as lists."""
    return [_limits_to(limits) for limits in scopes]
