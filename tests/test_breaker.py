"""The circuit breaker's state table, pinned down on a Clock."""

import pytest
import structlog
from automat import NoTransition
from structlog.testing import capture_logs
from twisted.internet.task import Clock

from txgateway.resilience.breaker import BreakerStatus, CircuitBreaker


def make(threshold=5, cooldown=60.0):
    clock = Clock()
    return clock, CircuitBreaker("ai", clock, threshold, cooldown, structlog.get_logger())


def fail(breaker, times, request_id="r"):
    for n in range(times):
        breaker.failed(breaker.admit(f"{request_id}{n}"), "status 502")


def test_a_new_breaker_is_closed_and_admits():
    _, breaker = make()
    assert breaker.status().state == "closed"
    assert breaker.admit("r").allowed


def test_four_consecutive_failures_keep_it_closed():
    _, breaker = make()
    fail(breaker, 4)
    assert breaker.status().state == "closed"
    assert breaker.status().consecutive_failures == 4


def test_fifth_consecutive_failure_opens_circuit():
    _, breaker = make()
    fail(breaker, 5)
    assert breaker.status().state == "open"


def test_a_success_resets_the_count():
    _, breaker = make()
    fail(breaker, 4)
    breaker.succeeded(breaker.admit("ok"))
    fail(breaker, 4)
    assert breaker.status().state == "closed"
    assert breaker.status().consecutive_failures == 4


def test_open_circuit_refuses_with_whole_seconds_left():
    clock, breaker = make()
    fail(breaker, 5)
    refused = breaker.admit("x")
    assert not refused.allowed and refused.retry_after == 60
    clock.advance(0.5)
    assert breaker.admit("x").retry_after == 60
    clock.advance(58.5)
    assert breaker.admit("x").retry_after == 1
    clock.advance(0.9)
    assert breaker.admit("x").retry_after == 1


def test_cooldown_boundary_is_exact():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(59.999)
    assert breaker.status().state == "open"
    assert not breaker.admit("early").allowed
    clock.advance(0.001)
    assert breaker.status().state == "half_open"


def test_half_open_admits_exactly_one_trial():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    trial = breaker.admit("trial")
    assert trial.allowed and trial.trial
    other = breaker.admit("other")
    assert not other.allowed and other.retry_after == 1


def test_trial_success_closes_the_circuit():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    breaker.succeeded(breaker.admit("trial"))
    assert breaker.status().state == "closed"
    assert breaker.status().consecutive_failures == 0
    assert breaker.admit("next").allowed


def test_trial_failure_reopens_for_another_full_cooldown():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    breaker.failed(breaker.admit("trial"), "timeout")
    assert breaker.status().state == "open"
    assert breaker.admit("x").retry_after == 60
    clock.advance(59.999)
    assert breaker.status().state == "open"
    clock.advance(0.001)
    assert breaker.status().state == "half_open"


def test_an_abandoned_trial_frees_the_trial_slot():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    breaker.abandoned(breaker.admit("gone"))
    assert breaker.admit("next").trial


def test_late_verdicts_of_attempts_admitted_before_opening_change_nothing():
    clock, breaker = make()
    early = [breaker.admit(f"early{n}") for n in range(2)]
    fail(breaker, 5)
    breaker.succeeded(early[0])
    breaker.failed(early[1], "late")
    assert breaker.status().state == "open"
    assert breaker.admit("x").retry_after == 60


def test_status_says_when_the_trial_becomes_possible():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(15)
    assert breaker.status().trial_in == 45


INPUTS = {
    "admit": ("r",), "succeeded": ("r",), "failed": ("r", "boom"), "trial_succeeded": ("r",),
    "trial_failed": ("r", "boom"), "trial_abandoned": ("r",), "trip": ("r", "boom"),
    "cooldown_elapsed": (), "status": (), "stop": (), "may_admit": (),
}


def breaker_in(state: str):
    clock, breaker = make()
    if state != "closed":
        fail(breaker, 5)
    if state == "half_open":
        clock.advance(60)
    assert breaker.status().state == state
    return breaker


@pytest.mark.parametrize("state", ["closed", "open", "half_open"])
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_state_declares_every_input(state, name):
    breaker = breaker_in(state)
    try:
        getattr(breaker._machine, name)(*INPUTS[name])
    except NoTransition:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{state} does not declare {name}")


def test_a_trial_whose_body_fails_after_its_headers_closed_the_circuit_counts_as_a_failure():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    trial = breaker.admit("t")
    assert trial.trial
    breaker.succeeded(trial)  # its headers came: closed
    breaker.failed(trial, "the stream broke")  # then its body did not
    assert breaker.status() == BreakerStatus("closed", 1)


def test_stop_cancels_the_cooldown_timer():
    clock, breaker = make()
    fail(breaker, 5)
    assert len(clock.getDelayedCalls()) == 1
    breaker.stop()
    assert clock.getDelayedCalls() == []


def test_closing_cancels_nothing_left_pending():
    clock, breaker = make()
    fail(breaker, 5)
    clock.advance(60)
    breaker.succeeded(breaker.admit("trial"))
    assert clock.getDelayedCalls() == []


def test_breakers_are_independent():
    clock = Clock()
    log = structlog.get_logger()
    ai = CircuitBreaker("ai", clock, 5, 60, log)
    data = CircuitBreaker("data", clock, 5, 60, log)
    fail(ai, 5)
    assert ai.status().state == "open"
    assert data.status().state == "closed"


def test_every_transition_is_logged_with_service_reason_and_request_id():
    clock, breaker = make()
    with capture_logs() as logs:
        fail(breaker, 5, request_id="req")
        clock.advance(60)
        breaker.succeeded(breaker.admit("trial-req"))
    transitions = [(e["from"], e["to"], e["request_id"]) for e in logs if e["event"] == "circuit_transition"]
    assert transitions == [("closed", "open", "req4"), ("open", "half_open", None), ("half_open", "closed", "trial-req")]
    lines = [e for e in logs if e["event"] == "circuit_transition"]
    assert len(lines) == 3 and all(e["service"] == "ai" and e["reason"] for e in lines)


def test_threshold_and_cooldown_are_configurable():
    clock, breaker = make(threshold=2, cooldown=5)
    fail(breaker, 2)
    assert breaker.status().state == "open"
    clock.advance(5)
    assert breaker.status().state == "half_open"


def test_may_admit_is_asked_of_the_machine_in_every_state():
    clock = Clock()
    breaker = CircuitBreaker("s", clock, 1, 10, structlog.get_logger())
    assert breaker.may_admit() and breaker.status().state == "closed"
    breaker.failed(breaker.admit("r1"), "boom")
    assert not breaker.may_admit() and breaker.status().state == "open"
    clock.advance(10)
    assert breaker.may_admit() and breaker.status().state == "half_open"
    breaker.succeeded(breaker.admit("r2"))
    assert breaker.may_admit() and breaker.status().state == "closed"


def test_the_indexed_table_finds_for_every_state_and_input_what_automats_own_scan_finds():
    from automat._core import Automaton

    from txgateway.resilience.breaker import _BreakerMachine

    automaton = _BreakerMachine.__automat_automaton__
    transitions = automaton.allTransitions()
    states = {in_state for in_state, _, _, _ in transitions} | {out_state for _, _, out_state, _ in transitions}
    symbols = {symbol for _, symbol, _, _ in transitions} | {"no_such_input"}
    assert len(states) == 3 and len(transitions) > 30
    for state in states:
        for symbol in symbols:
            try:
                scanned = Automaton.outputForInput(automaton, state, symbol)
            except NoTransition:
                with pytest.raises(NoTransition):
                    automaton.outputForInput(state, symbol)
            else:
                assert automaton.outputForInput(state, symbol) == scanned
