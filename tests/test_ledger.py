"""
The ledger's arithmetic, on plain numbers for time: reserve then settle,
key and team together, sliding minutes, budgets per UTC period, parallel
slots, lapsed reservations; and the estimates and prices it is fed.
"""

from __future__ import annotations

import calendar
import tracemalloc
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txgateway.config.keys import ModelPrice
from txgateway.governance.estimate import Prices, completion_cap, estimate_prompt_tokens
from txgateway.governance.governor import duration_text
from txgateway.governance.ledger import IN_FLIGHT_RETRY, NANO_BOUND, TOKENS_BOUND, WINDOW, Ask, Ledger, ScopeLimits, _Window
from txgateway.governance.periods import period_end, period_key

NOON = float(calendar.timegm((2026, 12, 3, 12, 0, 0)))


def ask(n: int, tokens: int = 100, cost: int = 0, *scopes: ScopeLimits, expires_in: float = 300.0, now: float = NOON) -> Ask:
    return Ask(f"r{n}", scopes, tokens, cost, now + expires_in)


KEY = ScopeLimits("key:alice", tokens_per_minute=2500)


def test_exactly_the_reservations_that_fit_a_tokens_per_minute_limit_are_admitted():
    ledger = Ledger()
    verdicts = [ledger.reserve(ask(n, 100, 0, KEY), NOON) for n in range(40)]
    assert sum(v.allowed for v in verdicts) == 25
    refused = verdicts[25]
    assert refused.reason == "tokens_exceeded" and refused.scope == "key:alice"
    # The 25 are in flight: they settle (and give back) long before they leave the window.
    assert refused.retry_after == IN_FLIGHT_RETRY and refused.in_flight
    assert refused.tokens.remaining == 0 and refused.tokens.limit == 2500


def test_once_what_fills_the_window_is_settled_the_wait_is_until_it_leaves_the_window():
    ledger = Ledger()
    for n in range(25):
        taken = ask(n, 100, 0, KEY)
        assert ledger.reserve(taken, NOON).allowed
        ledger.settle(taken, 100, 0, NOON + 5)
    refused = ledger.reserve(ask(99, 100, 0, KEY), NOON + 5)
    assert refused.retry_after == pytest.approx(55.0) and not refused.in_flight


def test_in_flight_reservations_and_settled_use_together_wait_for_the_window():
    ledger = Ledger()
    settled = ask(1, 2000, 0, KEY)
    ledger.reserve(settled, NOON)
    ledger.settle(settled, 2000, 0, NOON + 1)
    assert ledger.reserve(ask(2, 400, 0, KEY), NOON + 10).allowed  # in flight
    refused = ledger.reserve(ask(3, 600, 0, KEY), NOON + 20)  # 2,000 settled + 600 > 2,500 whatever the 400 give back
    assert refused.retry_after == pytest.approx(40.0) and not refused.in_flight


def test_a_request_larger_than_the_whole_limit_can_never_fit():
    verdict = Ledger().reserve(ask(1, 2501, 0, KEY), NOON)
    assert verdict.reason == "tokens_exceeded" and verdict.retry_after is None


def test_the_window_slides_entries_leave_it_a_minute_after_they_came():
    ledger = Ledger()
    for n, tokens, at in ((1, 2000, NOON), (2, 500, NOON + 30)):
        taken = ask(n, tokens, 0, KEY)
        assert ledger.reserve(taken, at).allowed
        ledger.settle(taken, tokens, 0, at)
    late = ledger.reserve(ask(3, 600, 0, KEY), NOON + 40)
    assert late.reason == "tokens_exceeded" and late.retry_after == pytest.approx(20.0)
    assert ledger.reserve(ask(4, 600, 0, KEY), NOON + 60).allowed


def test_settling_gives_back_what_was_not_used():
    ledger = Ledger()
    first = ask(1, 2500, 0, KEY)
    ledger.reserve(first, NOON)
    assert not ledger.reserve(ask(2, 100, 0, KEY), NOON).allowed
    ledger.settle(first, 300, 0, NOON + 1)
    verdict = ledger.reserve(ask(3, 2200, 0, KEY), NOON + 1)
    assert verdict.allowed and verdict.tokens.remaining == 0


def test_using_more_than_reserved_is_charged_and_later_requests_wait():
    ledger = Ledger()
    first = ask(1, 100, 0, KEY)
    ledger.reserve(first, NOON)
    ledger.settle(first, 3000, 0, NOON + 1)  # no max_tokens: the backend wrote more
    verdict = ledger.reserve(ask(2, 1, 0, KEY), NOON + 2)
    assert verdict.reason == "tokens_exceeded" and verdict.retry_after == pytest.approx(58.0)


def test_a_request_must_fit_its_key_and_its_team_and_takes_from_neither_when_one_refuses():
    team = ScopeLimits("team:ml", tokens_per_minute=150)
    ledger = Ledger()
    assert ledger.reserve(ask(1, 100, 0, KEY, team), NOON).allowed
    refused = ledger.reserve(ask(2, 100, 0, KEY, team), NOON)
    assert refused.reason == "tokens_exceeded" and refused.scope == "team:ml"
    # The key kept its 2400: nothing was taken by the refused request.
    assert refused.tokens.remaining == 50  # the tightest quota is the team's
    alone = ledger.reserve(ask(3, 2400, 0, KEY), NOON)
    assert alone.allowed


def test_a_budget_refuses_what_would_go_over_it_until_the_period_ends():
    budget = ScopeLimits("key:alice", budget_nano=1000, budget_period="day")
    ledger = Ledger()
    first = ask(1, 0, 600, budget)
    assert ledger.reserve(first, NOON).allowed
    ledger.settle(first, 0, 600, NOON)
    refused = ledger.reserve(ask(2, 0, 500, budget), NOON)
    assert refused.reason == "budget_exceeded" and refused.retry_after == 12 * 3600
    assert refused.left_nano == 400 and not refused.in_flight
    assert ledger.reserve(ask(3, 0, 400, budget), NOON).allowed
    tomorrow = NOON + 12 * 3600
    assert ledger.reserve(ask(4, 0, 1000, budget), tomorrow).allowed


def test_a_budget_held_by_requests_in_flight_says_a_short_wait():
    budget = ScopeLimits("key:alice", budget_nano=1000, budget_period="day")
    ledger = Ledger()
    assert ledger.reserve(ask(1, 0, 600, budget), NOON).allowed
    refused = ledger.reserve(ask(2, 0, 500, budget), NOON)
    assert refused.retry_after == IN_FLIGHT_RETRY and refused.in_flight and refused.left_nano == 400


def test_a_request_dearer_than_the_whole_budget_is_told_no_wait():
    budget = ScopeLimits("key:alice", budget_nano=1000, budget_period="day")
    refused = Ledger().reserve(ask(1, 0, 1001, budget), NOON)
    assert refused.reason == "budget_exceeded" and refused.retry_after is None and refused.left_nano == 1000


def test_a_budget_is_refused_first_so_that_clients_do_not_retry_it():
    both = ScopeLimits("key:alice", tokens_per_minute=10, budget_nano=10, budget_period="month")
    verdict = Ledger().reserve(ask(1, 100, 100, both), NOON)
    assert verdict.reason == "budget_exceeded"


def test_settled_spend_replaces_the_reserved_cost():
    budget = ScopeLimits("key:alice", budget_nano=1000, budget_period="month")
    ledger = Ledger()
    first = ask(1, 0, 900, budget)
    ledger.reserve(first, NOON)
    ledger.settle(first, 0, 250, NOON + 5)
    assert ledger.committed[("key:alice", "m2026-12")] == 250
    assert ledger.reserved[("key:alice", "m2026-12")] == 0
    assert ledger.reserve(ask(2, 0, 750, budget), NOON + 5).allowed


def test_max_parallel_counts_reservations_until_they_settle():
    limits = ScopeLimits("key:alice", max_parallel=2)
    ledger = Ledger()
    first, second = ask(1, 0, 0, limits), ask(2, 0, 0, limits)
    assert ledger.reserve(first, NOON).allowed and ledger.reserve(second, NOON).allowed
    assert ledger.reserve(ask(3, 0, 0, limits), NOON).reason == "too_many_parallel"
    ledger.settle(first, 0, 0, NOON + 1)
    assert ledger.reserve(ask(4, 0, 0, limits), NOON + 1).allowed


def test_requests_per_minute_counts_each_request_once():
    limits = ScopeLimits("key:alice", requests_per_minute=3)
    ledger = Ledger()
    assert all(ledger.reserve(ask(n, 0, 0, limits), NOON + n).allowed for n in range(3))
    refused = ledger.reserve(ask(9, 0, 0, limits), NOON + 10)
    assert refused.reason == "rate_limited" and refused.retry_after == pytest.approx(50.0)
    assert refused.requests.limit == 3 and refused.requests.remaining == 0


def test_a_reservation_never_settled_lapses_and_gives_everything_back():
    limits = ScopeLimits("key:alice", tokens_per_minute=100, budget_nano=100, budget_period="total", max_parallel=1)
    ledger = Ledger()
    assert ledger.reserve(ask(1, 100, 100, limits, expires_in=40), NOON).allowed
    assert not ledger.reserve(ask(2, 1, 1, limits), NOON + 39).allowed
    verdict = ledger.reserve(ask(3, 100, 100, limits, expires_in=40, now=NOON + 40), NOON + 40)
    assert verdict.allowed
    assert ledger.holding == 1 and ledger.committed[("key:alice", "total")] == 100


def test_a_settle_after_its_reservation_lapsed_is_charged_as_new_spend():
    limits = ScopeLimits("key:alice", budget_nano=1000, budget_period="total")
    ledger = Ledger()
    late = ask(1, 0, 100, limits, expires_in=10)
    ledger.reserve(late, NOON)
    assert ledger.lapse(NOON + 11) == ["r1"]
    assert ledger.settle(late, 0, 70, NOON + 12) is False
    assert ledger.committed[("key:alice", "total")] == 70 and ledger.holding == 0


@pytest.mark.parametrize(
    ("period", "moment", "key", "end"),
    [
        ("day", (2026, 12, 31, 23, 59, 59), "d2026-12-31", (2027, 1, 1)),
        ("week", (2026, 12, 3, 12, 0, 0), "w2026-11-30", (2026, 12, 7)),
        ("week", (2026, 11, 30, 0, 0, 0), "w2026-11-30", (2026, 12, 7)),
        ("month", (2026, 12, 31, 23, 59, 59), "m2026-12", (2027, 1, 1)),
        ("month", (2028, 2, 29, 8, 0, 0), "m2028-02", (2028, 3, 1)),
        ("total", (2026, 12, 3, 0, 0, 0), "total", None),
    ],
)
def test_periods_are_utc_calendar_periods(period, moment, key, end):
    now = float(calendar.timegm(moment))
    assert period_key(period, now) == key
    expected = None if end is None else float(calendar.timegm((*end, 0, 0, 0)))
    assert period_end(period, now) == expected


def test_a_month_rolls_over_at_midnight_utc_into_a_new_counter():
    budget = ScopeLimits("key:alice", budget_nano=100, budget_period="month")
    ledger = Ledger()
    last_second = float(calendar.timegm((2026, 12, 31, 23, 59, 59)))
    assert ledger.reserve(ask(1, 0, 100, budget, now=last_second), last_second).allowed
    assert ledger.reserve(ask(2, 0, 1, budget, now=last_second), last_second + 0.5).reason == "budget_exceeded"
    assert ledger.reserve(ask(3, 0, 100, budget, now=last_second), last_second + 1).allowed


def test_the_prompt_estimate_counts_a_token_per_three_bytes_and_four_per_message():
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 30}, {"role": "system", "content": "y" * 6}]}
    # "user", "system" and the contents are text: 4 + 30 + 6 + 6 = 46 bytes -> 16 tokens, plus 2 messages x 4.
    assert estimate_prompt_tokens(body) == 16 + 8
    assert estimate_prompt_tokens({"model": "m", "prompt": "abcdef"}) == 2
    assert estimate_prompt_tokens({"model": "m", "input": ["héllo"]}) == 2


def test_the_completion_reserved_is_the_maximum_asked_times_the_choices_else_the_default():
    assert completion_cap({"max_tokens": 50}, True, 1024) == 50
    assert completion_cap({"max_completion_tokens": 40, "max_tokens": 50}, True, 1024) == 40
    assert completion_cap({"max_tokens": 50, "n": 3}, True, 1024) == 150
    assert completion_cap({}, True, 1024) == 1024
    assert completion_cap({"max_tokens": 50}, False, 1024) == 0  # embeddings complete nothing


def test_prices_are_per_million_tokens_with_a_catch_all_and_cached_prompts():
    prices = Prices({"gpt-4o": ModelPrice("gpt-4o", 2.5, 10.0, 1.25), "*": ModelPrice("*", 1.0, 2.0)})
    assert prices.of("gpt-4o").cost_nano(1_000_000, 0) == 2_500_000_000
    assert prices.of("gpt-4o").cost_nano(1000, 100) == 2500 * 1000 + 1000 * 1000
    assert prices.of("gpt-4o").cost_nano(1000, 0, cached_tokens=400) == 600 * 2500 + 400 * 1250
    assert prices.of("llama3").cost_nano(10, 10) == 10 * 1000 + 10 * 2000
    assert Prices({}).of("x").cost_nano(10**6, 10**6) == 0
    assert prices.dearest(["llama3", "gpt-4o"], 100, 100) == prices.of("gpt-4o").cost_nano(100, 100)


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (59.0, "59s"), (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_reset_durations_are_written_the_way_openai_writes_them(seconds, text):
    assert duration_text(seconds) == text


_HOSTILE_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_HOSTILE_NUMBERS, _HOSTILE_NUMBERS, _HOSTILE_NUMBERS, _HOSTILE_NUMBERS), min_size=1, max_size=8))
def test_hostile_numbers_never_refund_never_raise_and_stay_within_bounds(calls):
    ledger = Ledger()
    limits = ScopeLimits("key:mallory", tokens_per_minute=10**13, budget_nano=10**17, budget_period="total", max_parallel=100)
    for n, (tokens, cost, used_tokens, used_cost) in enumerate(calls):
        ask = Ask(f"r{n}", (limits,), tokens, cost, 1000.0)
        verdict = ledger.reserve(ask, 0.0)
        if verdict.allowed:
            ledger.settle(ask, used_tokens, used_cost, 1.0)
    committed = ledger.committed.get(("key:mallory", "total"), 0)
    assert 0 <= committed <= len(calls) * NANO_BOUND
    assert ledger.reserved.get(("key:mallory", "total"), 0) == 0
    assert ledger.holding == 0 and ledger.parallel("key:mallory") == 0
    tokens, _ = ledger.quotas(limits, 1.0)
    assert 0 <= tokens.used <= len(calls) * TOKENS_BOUND


def test_each_image_is_reserved_by_the_providers_largest_rule_not_by_its_url():
    parts = [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}] * 20
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"}, *parts]}]}
    assert estimate_prompt_tokens(body) >= 20 * 2_700


def test_a_low_detail_image_is_85_tokens_and_its_base64_data_is_not_text():
    data = "data:image/png;base64," + "A" * 300_000
    low = {"type": "image_url", "image_url": {"url": data, "detail": "low"}}
    claude = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 300_000}}
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": [low]}]}) == 85 + 2 + 4
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": [claude]}]}) == 2_700 + 2 + 4


def test_the_estimate_walks_any_depth_without_recursion():
    deep: object = "x"
    for _ in range(5_000):
        deep = [deep]
    assert estimate_prompt_tokens({"input": deep}) == 1


class _EntriesById:
    """The window as it was first kept, one (time, amount) per id: the reference the compact one must agree with."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, int]] = {}

    @property
    def total(self) -> int:
        return sum(amount for _, amount in self.entries.values())

    def trim(self, now: float) -> None:
        self.entries = {key: entry for key, entry in self.entries.items() if entry[0] > now - WINDOW}

    def settle(self, key: str, used: int, reserved: int, now: float) -> None:
        if key in self.entries:
            self.entries[key] = (self.entries[key][0], used)
        elif used > reserved:
            self.entries[key + "+"] = (now, used - reserved)

    def seconds_until_fits(self, need: int, limit: int, now: float) -> float | None:
        if need > limit:
            return None
        excess = self.total + need - limit
        for taken_at, amount in self.entries.values():
            if excess <= 0:
                break
            excess -= amount
            if excess <= 0:
                return max(0.0, taken_at + WINDOW - now)
        return 0.0

    def reset(self, now: float) -> float:
        return max(0.0, list(self.entries.values())[-1][0] + WINDOW - now) if self.entries else 0.0


_WINDOW_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 50)),
        st.tuples(st.just("settle"), st.integers(0, 40), st.integers(0, 80)),
        st.tuples(st.just("remove"), st.integers(0, 40)),
        st.tuples(st.just("wait"), st.floats(0.0, 45.0)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(_WINDOW_STEPS, st.integers(0, 200), st.sampled_from([0, 1024]))
def test_the_compact_window_agrees_with_one_entry_per_id_whatever_is_added_settled_removed_and_waited(steps, need, compact_from):
    with mock.patch("txgateway.governance.ledger._COMPACT_FROM", compact_from):  # 0: its arrays cut at every trim
        _agree(steps, need)


def _agree(steps: list, need: int) -> None:
    compact, reference = _Window(), _EntriesById()
    positions: dict[str, int] = {}
    ended: set[str] = set()
    now = NOON
    for step in steps:
        compact.trim(now)
        reference.trim(now)
        if step[0] == "add":
            key = f"r{len(positions)}"
            positions[key] = compact.add(step[1], now)
            reference.entries[key] = (now, step[1])
        elif step[0] == "wait":
            now += step[1]
        elif positions and f"r{step[1] % len(positions)}" not in ended:
            # As the ledger does: each reservation's entry is settled or removed (lapsed), once.
            key = f"r{step[1] % len(positions)}"
            ended.add(key)
            if step[0] == "settle":
                compact.settle(positions[key], step[2], 25, now)
                reference.settle(key, step[2], 25, now)
            else:
                compact.remove(positions[key])
                reference.entries.pop(key, None)
        assert compact.total == reference.total
        assert compact.seconds_until_fits(need, 100, now) == reference.seconds_until_fits(need, 100, now)
        assert compact.quota(100, now).reset == reference.reset(now)
        assert compact.empty == (not reference.entries)


def test_a_minute_of_a_busy_keys_requests_holds_no_object_per_request():
    limits = ScopeLimits("key:busy", tokens_per_minute=10**9, requests_per_minute=10**9, budget_nano=10**15)
    ledger = Ledger()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20_000):
            taken = ask(n, 100, 10, limits, now=NOON + n * 0.003)
            assert ledger.reserve(taken, NOON + n * 0.003).allowed
            ledger.settle(taken, 80, 8, NOON + n * 0.003)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Two windows of 20,000 entries each: a time and an amount, 16 bytes, and the arrays' slack
    # (one entry per id held about 330 bytes a request: 6.5 MB).
    assert held < 20_000 * 2 * 24


def test_reservations_in_flight_hold_little_beside_their_ask():
    # A thousand streams hold a thousand reservations for minutes: what each holds is counted.
    key = ScopeLimits("key:k", tokens_per_minute=10**9, budget_nano=10**15)
    team = ScopeLimits("team:t", tokens_per_minute=10**9, budget_nano=10**15)
    ledger = Ledger()
    asks = [Ask(f"id-{n}", (key, team), 100, 10, NOON + 600) for n in range(1000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, taken in enumerate(asks):
            assert ledger.reserve(taken, NOON + n * 0.001).allowed
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # About 237 B each: the record, its tokens' positions, its share of the dict and the windows' entries.
    # The periods, and the positions of request windows its scopes do not have, are shared (293 B when not).
    assert held < 1000 * 260


def test_a_settle_after_its_entry_left_the_window_counts_only_its_excess_from_then_trimmed_or_not():
    # No reserve came in between to trim the window: the entry has left it all the same
    # (as Redis's script, which trims before it settles, decides).
    ledger = Ledger()
    taken = ask(1, 100, 0, KEY)
    assert ledger.reserve(taken, NOON).allowed
    ledger.settle(taken, 300, 0, NOON + 61)
    tokens, _ = ledger.quotas(KEY, NOON + 61)
    assert tokens.used == 200 and tokens.reset == pytest.approx(60.0)
