"""
Which attempt outcomes are retried, and after how long.

Pure decisions, no I/O: the broker asks, and schedules the wait on its
injected clock.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

import attrs

__all__ = [
    "IDEMPOTENT_METHODS",
    "RetryPolicy",
    "RETRYABLE_STATUSES",
    "may_resend_after_silence",
    "retry_budget_allows",
    "is_breaker_failure",
    "parse_retry_after",
]

#: Upstream statuses worth another attempt: 429 (the backend's own limit;
#: never a breaker failure) and these 5xx.  Every other status is final.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})

#: Statuses whose Retry-After header may set the delay of the next attempt.
RETRY_AFTER_STATUSES = frozenset({429, 503, 529})

#: Methods a silent backend may be sent again (RFC 9110 9.2.2 idempotent
#: methods); others only with an Idempotency-Key header.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_resend_after_silence(rule: str, method: bytes, has_idempotency_key: bool) -> bool:
    """
    Whether a request whose backend stayed silent (no answer within the
    timeout) may go to the same endpoint again, by C{retry_timeouts}:
    C{always}, C{never}, or C{idempotent} (idempotent methods, or any with an
    C{Idempotency-Key}): retrying a silent generation only multiplies its
    cost and the client's wait.
    """
    if rule == "always":
        return True
    if rule == "never":
        return False
    return method in IDEMPOTENT_METHODS or has_idempotency_key


def retry_budget_allows(retrying_others: int, in_flight: int, percent: float, minimum: int) -> bool:
    """
    Whether one more request may begin a retry: the service's other
    requests that are retrying must number fewer than C{max(minimum,
    percent% of its requests in flight)}.
    """
    return retrying_others < max(minimum, percent / 100.0 * in_flight)


def is_breaker_failure(status: int) -> bool:
    """A 5xx answer counts against the circuit breaker; anything else does not."""
    return status >= 500


def parse_retry_after(value: bytes | None, now: float) -> float | None:
    """
    The delay a C{Retry-After} header asks for, in seconds from C{now}
    (seconds since the epoch), or L{None} when absent or unreadable.
    Both forms are understood: delta-seconds and an HTTP-date.
    """
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


@attrs.frozen
class RetryPolicy:
    """
    Exponential backoff: retry C{n} (from 0) waits
    C{delay * multiplier ** n}, spread by C{jitter} and capped by
    C{max_delay}.

    @ivar retries: extra attempts after the first.
    @ivar jitter: 0 for the exact schedule; 0.2 spreads each delay over
        +/- 20%.
    """

    retries: int = 3
    delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.0

    def delay_before_retry(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number C{retry} (0 for the first retry)."""
        base = min(self.delay * self.multiplier**retry, self.max_delay)
        if self.jitter and rng is not None:
            base *= 1.0 + self.jitter * rng.uniform(-1.0, 1.0)
        return min(max(0.0, base), self.max_delay)

    def attempts_left(self, attempts_made: int) -> bool:
        """Whether another attempt is allowed after C{attempts_made} attempts."""
        return attempts_made <= self.retries
