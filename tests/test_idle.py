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


def test_a_thousand_timers_of_a_clock_share_one_reactor_timer_and_each_says_idle_on_time():
    clock = Clock()
    idled: list[tuple[int, float]] = []
    timers = [IdleTimer(clock, 10.0, lambda n=n: idled.append((n, clock.seconds()))) for n in range(1000)]
    for n, idle in enumerate(timers):
        idle.start()
        if n % 100 == 99:
            clock.advance(0.5)
    assert len(clock.getDelayedCalls()) == 1  # a thousand streams, one reactor timer
    for n in range(0, 1000, 2):
        timers[n].seen()  # at 5 s: those wait until 15 s
    clock.pump([0.5] * 200)
    expected = sorted([(n, 10.0 + 0.5 * (n // 100)) for n in range(1, 1000, 2)] + [(n, 15.0) for n in range(0, 1000, 2)], key=lambda e: (e[1], e[0]))
    assert sorted(idled, key=lambda e: (e[1], e[0])) == expected
    assert clock.getDelayedCalls() == []


def test_timers_of_different_timeouts_each_say_idle_on_time_in_one_heap():
    clock = Clock()
    idled: list[str] = []
    slow = IdleTimer(clock, 60.0, lambda: idled.append(f"slow {clock.seconds()}"))
    quick = IdleTimer(clock, 5.0, lambda: idled.append(f"quick {clock.seconds()}"))
    slow.start()
    clock.advance(1)
    quick.start()  # due before the one the reactor timer waits for
    clock.advance(4.9)
    assert idled == []
    clock.advance(0.1)
    assert idled == ["quick 6.0"]
    clock.advance(53.9)
    assert idled == ["quick 6.0"]
    clock.advance(0.1)
    assert idled == ["quick 6.0", "slow 60.0"]


def test_a_timer_that_says_idle_may_stop_restart_or_close_others_due_with_it():
    clock = Clock()
    idled: list[tuple[str, float]] = []
    timers: dict[str, IdleTimer] = {}

    def first_idle():
        idled.append(("first", clock.seconds()))
        if len(idled) == 1:
            timers["second"].stop()  # due at the same time: it must not say idle
            timers["third"].close()
        timers["first"].start()  # again, from now

    timers["first"] = IdleTimer(clock, 10.0, first_idle)
    timers["second"] = IdleTimer(clock, 10.0, lambda: idled.append(("second", clock.seconds())))
    timers["third"] = IdleTimer(clock, 10.0, lambda: idled.append(("third", clock.seconds())))
    for idle in timers.values():
        idle.start()
    clock.advance(10)
    assert idled == [("first", 10.0)]
    assert timers["first"].running and not timers["second"].running and not timers["third"].running
    clock.advance(5)
    timers["second"].start()  # at 15 s
    timers["third"].start()  # closed: never again
    clock.pump([1.0] * 30)
    assert idled == [("first", 10.0), ("first", 20.0), ("second", 25.0), ("first", 30.0), ("first", 40.0)]


def test_a_timer_stopped_and_started_before_it_came_due_says_idle_a_timeout_after_the_start():
    idle, clock, idled = timer()
    idle.start()
    clock.advance(4)
    idle.stop()
    clock.advance(3)
    idle.start()  # at 7 s
    clock.advance(9.9)
    assert idled == []
    clock.advance(0.1)
    assert idled == [pytest.approx(17.0)]


def test_stopped_timers_do_not_pile_up_in_the_heap():
    # Short answers each watch and stop a timer long before it would come due.
    from txgateway.dataplane.idle import _IdleSchedule

    clock = Clock()
    streaming = IdleTimer(clock, 300.0, lambda: None)
    streaming.start()
    for _ in range(10_000):
        brief = IdleTimer(clock, 300.0, lambda: None)
        brief.start()
        clock.advance(0.001)
        brief.close()
    assert len(_IdleSchedule.of(clock)._heap) <= 2 * 51 + 1
    assert len(clock.getDelayedCalls()) == 1


def test_a_timer_started_again_while_its_stopped_entry_waits_is_not_lost_when_others_stop():
    clock = Clock()
    idled: list[str] = []
    first = IdleTimer(clock, 10.0, lambda: idled.append("first"))
    second = IdleTimer(clock, 10.0, lambda: idled.append("second"))
    third = IdleTimer(clock, 100.0, lambda: idled.append("third"))
    third.start()
    first.start()
    first.stop()
    first.start()  # its entry is still in the heap: it is armed again, not added twice
    second.start()
    second.stop()
    third.stop()  # two stopped of three: the heap is not emptied
    clock.advance(10)
    assert idled == ["first"]
    assert clock.getDelayedCalls() == []


def test_a_sweep_made_by_a_timer_saying_idle_leaves_the_heap_whole():
    # Stopped timers are swept out once they are many; a went_idle that stops one more
    # sweeps while the timers due with it are being looked at.
    clock = Clock()
    idled: list[tuple[str, float]] = []
    later = IdleTimer(clock, 20.0, lambda: idled.append(("later", clock.seconds())))
    due: list[IdleTimer] = []

    def first_idle():
        idled.append(("first", clock.seconds()))
        if len(idled) == 1:
            later.stop()  # the 51st stopped in the heap: the sweep
        due[0].start()

    due.append(IdleTimer(clock, 10.0, first_idle))
    due.extend(IdleTimer(clock, 10.0, lambda n=n: idled.append((f"due {n}", clock.seconds()))) for n in range(1, 5))
    for idle in [later, *due]:
        idle.start()
    for _ in range(50):
        brief = IdleTimer(clock, 10.0, lambda: None)
        brief.start()
        brief.stop()
    clock.advance(10)
    assert idled[0] == ("first", 10.0)
    assert sorted(idled[1:]) == [(f"due {n}", 10.0) for n in range(1, 5)]
    clock.advance(2)
    later.start()  # at 12 s
    clock.pump([1.0] * 20)
    assert idled[5:] == [("first", 20.0), ("first", 30.0), ("later", 32.0)]
    due[0].close()
    assert clock.getDelayedCalls() == []


def test_a_went_idle_that_raises_leaves_the_other_timers_their_reactor_timer():
    clock = Clock()
    idled: list[float] = []

    def broken():
        raise RuntimeError("a bug in one owner")

    IdleTimer(clock, 10.0, broken).start()
    IdleTimer(clock, 20.0, lambda: idled.append(clock.seconds())).start()
    with pytest.raises(RuntimeError):
        clock.advance(10)
    clock.advance(10)
    assert idled == [20.0]


def test_a_stopped_timer_holds_its_owner_no_longer_while_its_entry_waits():
    # A finished stream's relay stops its timer; the stream must not live on until the entry comes due.
    import gc
    import weakref

    class Stream:
        def went_idle(self) -> None:
            pass

    clock = Clock()
    IdleTimer(clock, 300.0, lambda: None).start()  # another stream: the heap is not emptied
    stream = Stream()
    stream.idle = IdleTimer(clock, 300.0, stream.went_idle)
    stream.idle.start()
    stream.idle.stop()
    gone = weakref.ref(stream)
    del stream
    gc.collect()
    assert gone() is None


def test_a_clocks_idle_schedule_goes_with_the_clock():
    # One schedule per clock, kept by nothing but the clock's timers: a test's clock (and all
    # that its timers' owners hold) must not live on.
    import gc
    import weakref

    clock = Clock()
    IdleTimer(clock, 10.0, lambda: None).start()
    gone = weakref.ref(clock)
    del clock
    gc.collect()
    assert gone() is None
