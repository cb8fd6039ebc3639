"""The backoff schedule and Retry-After parsing."""

import random
from datetime import datetime, timezone
from email.utils import format_datetime

from txgateway.resilience.retry import RETRYABLE_STATUSES, RetryPolicy, is_breaker_failure, parse_retry_after


def test_default_schedule_is_one_two_four_seconds():
    policy = RetryPolicy()
    assert [policy.delay_before_retry(n) for n in range(3)] == [1.0, 2.0, 4.0]


def test_delays_are_capped_by_max_delay():
    policy = RetryPolicy(retries=10, delay=1, multiplier=3, max_delay=10)
    assert [policy.delay_before_retry(n) for n in range(5)] == [1, 3, 9, 10, 10]


def test_three_retries_mean_four_attempts():
    policy = RetryPolicy(retries=3)
    assert [policy.attempts_left(n) for n in range(1, 5)] == [True, True, True, False]


def test_jitter_spreads_delays_within_its_fraction():
    policy = RetryPolicy(jitter=0.25)
    rng = random.Random(1)
    delays = [policy.delay_before_retry(1, rng) for _ in range(200)]
    assert all(1.5 <= d <= 2.5 for d in delays)
    assert len(set(delays)) > 100


def test_no_jitter_means_the_exact_schedule_whatever_the_randomness():
    assert RetryPolicy().delay_before_retry(2, random.Random(3)) == 4.0


def test_only_429_500_502_503_504_and_anthropics_529_are_retried():
    assert RETRYABLE_STATUSES == {429, 500, 502, 503, 504, 529}
    assert not any(code in RETRYABLE_STATUSES for code in range(400, 500) if code != 429)


def test_a_silent_backend_gets_a_request_again_only_when_that_is_safe():
    from txgateway.resilience.retry import may_resend_after_silence as may

    assert may("idempotent", b"GET", False) and may("idempotent", b"PUT", False) and may("idempotent", b"DELETE", False)
    assert not may("idempotent", b"POST", False) and not may("idempotent", b"PATCH", False)
    assert may("idempotent", b"POST", True)  # an Idempotency-Key makes it safe
    assert may("always", b"POST", False) and not may("never", b"GET", True)


def test_the_retry_budget_is_a_share_of_the_requests_in_flight_with_a_floor():
    from txgateway.resilience.retry import retry_budget_allows as allows

    assert allows(2, 10, 20, 3) and not allows(3, 10, 20, 3)  # the floor: 3
    assert allows(19, 100, 20, 3) and not allows(20, 100, 20, 3)  # 20% of 100
    assert allows(99, 100, 100, 3)  # 100% lifts it


def test_every_5xx_counts_against_the_breaker_and_nothing_else_does():
    assert all(is_breaker_failure(code) for code in (500, 501, 502, 503, 504, 599))
    assert not any(is_breaker_failure(code) for code in (200, 301, 400, 404, 429, 499))


def test_retry_after_in_seconds():
    assert parse_retry_after(b"7", now=1000.0) == 7.0
    assert parse_retry_after(b" 0 ", now=0) == 0.0


def test_retry_after_as_http_date_is_relative_to_the_clock():
    when = datetime(2026, 1, 1, 12, 0, 30, tzinfo=timezone.utc)
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True).encode(), now) == 30.0


def test_retry_after_in_the_past_means_now():
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", now=2e9) == 0.0


def test_unreadable_retry_after_is_ignored():
    for value in (None, b"", b"soon", b"-5", b"1.5"):
        assert parse_retry_after(value, now=0) is None


def test_jitter_never_takes_a_delay_past_its_cap():
    policy = RetryPolicy(retries=10, delay=1.0, multiplier=2.0, max_delay=5.0, jitter=0.5)
    rng = random.Random(3)
    delays = [policy.delay_before_retry(retry, rng) for retry in range(3, 10) for _ in range(50)]
    assert max(delays) == 5.0  # at the cap, jitter only ever shortens
    assert min(delays) >= 2.5 and len(set(delays)) > 1
