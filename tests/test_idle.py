"""L{IdleTimer} on a Clock: one timer, sightings that cost a clock read, an exact timeout."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from txgateway.dataplane.idle import IdleTimer


def timer(timeout: float = 10.0) -> tuple[IdleTimer, Clock, list]:
    clock = Clock()
    idled: list[float] = []
    return IdleTimer(clock, timeout, lambda: idled.append(clock.seconds())), clock, idled


def test_nothing_seen_for_the_timeout_is_idle_once():
    idle, clock, idled = timer()
    idle.start()
    clock.advance(9.9)
    assert idled == []
    clock.advance(0.1)
    assert idled == [10.0] and not idle.running
    clock.advance(100)
    assert idled == [10.0]


def idle_once_a_timeout_from_now(clock: Clock, idled: list) -> None:
    """One timer is armed, and it says idle exactly a timeout (10 s) from now, not before."""
    assert len(clock.getDelayedCalls()) == 1
    now = clock.seconds()
    clock.advance(9.99)
    assert idled == []
    clock.advance(0.01)
    assert idled == [pytest.approx(now + 10.0)]


def test_a_sighting_moves_the_timeout_exactly_without_a_second_timer():
    idle, clock, idled = timer()
    idle.start()
    for _ in range(5):
        clock.advance(3)
        idle.seen()
    idle_once_a_timeout_from_now(clock, idled)  # at 25 s


def test_starting_again_counts_from_then_on_the_same_timer():
    idle, clock, idled = timer()
    idle.start()
    clock.advance(6)
    idle.start()
    idle_once_a_timeout_from_now(clock, idled)  # at 16 s


def test_a_stopped_timer_says_nothing_until_started_again():
    idle, clock, idled = timer()
    idle.start()
    idle.stop()
    assert not idle.running and clock.getDelayedCalls() == []
    clock.advance(60)
    idle.start()
    clock.advance(10)
    assert idled == [70.0]


def test_a_closed_timer_is_never_armed_again():
    idle, clock, idled = timer()
    idle.start()
    idle.close()
    idle.start()
    assert not idle.running and clock.getDelayedCalls() == []
    clock.advance(60)
    assert idled == []
