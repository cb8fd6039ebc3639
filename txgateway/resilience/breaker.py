"""
A circuit breaker per service, as an Automat state table on an injected
clock.

    closed --(threshold consecutive failures)--> open
    open --(cooldown elapsed, on the clock)--> half_open
    half_open --(the one trial succeeds)--> closed
    half_open --(the one trial fails)--> open

Every attempt the gateway makes first asks L{CircuitBreaker.admit}; the
L{Admission} it gets back must be settled exactly once, with
L{CircuitBreaker.succeeded}, L{CircuitBreaker.failed} or
L{CircuitBreaker.abandoned}.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import attrs
from automat import NoTransition, TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Admission", "BreakerStatus", "CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@attrs.frozen
class Admission:
    """
    The breaker's answer to one attempt.

    @ivar allowed: the attempt may go to the backend.
    @ivar trial: this attempt is the half-open trial.
    @ivar retry_after: when refused, whole seconds before asking again.
    """

    request_id: str
    allowed: bool
    trial: bool = False
    retry_after: int = 0


@attrs.frozen
class BreakerStatus:
    """What C{/health} shows of one breaker."""

    state: str
    consecutive_failures: int
    trial_in: float | None = None


class _BreakerInputs(Protocol):
    def admit(self, request_id: str) -> Admission:
        "An attempt asks to go to the backend."

    def succeeded(self, request_id: str) -> None:
        "An ordinary (non-trial) attempt got an answer that is not a failure."

    def failed(self, request_id: str, reason: str) -> None:
        "An ordinary attempt failed (connection, timeout, 5xx)."

    def trial_succeeded(self, request_id: str) -> None:
        "The half-open trial got an answer that is not a failure."

    def trial_failed(self, request_id: str, reason: str) -> None:
        "The half-open trial failed."

    def trial_abandoned(self, request_id: str) -> None:
        "The half-open trial ended with no verdict (the client went away)."

    def trip(self, request_id: str, reason: str) -> None:
        "The consecutive failures reached the threshold."

    def failed_elsewhere(self, reason: str) -> None:
        "Another process sharing this backend counted a failure of it: one more here."

    def succeeded_elsewhere(self) -> None:
        "Another process sharing this backend counted a success that ended its failures."

    def cooldown_elapsed(self) -> None:
        "The open state's timer fired."

    def status(self) -> BreakerStatus:
        "Describe the breaker."

    def may_admit(self) -> bool:
        "Whether an attempt could be admitted now (asked without taking the trial)."

    def stop(self) -> None:
        "Cancel any pending timer: the breaker is being discarded."


@attrs.define
class _BreakerCore:
    service: str
    clock: IReactorTime
    threshold: int
    cooldown: float
    log: Any
    on_transition: Callable[[str, str, str, str, str | None], None] | None = None
    transition_level: str = "warning"
    endpoint: str | None = None
    consecutive_failures: int = 0
    #: Told (failed, reason) of each failure this process counts while closed, and
    #: (False, "") of the success that ends them: other processes count them too.
    on_count: Callable[[bool, str], None] | None = None

    def counted(self, failed: bool, reason: str) -> None:
        if self.on_count is not None:
            self.on_count(failed, reason)

    def transition(self, from_state: str, to_state: str, reason: str, request_id: str | None) -> None:
        if self.on_transition is not None:
            self.on_transition(self.service, from_state, to_state, reason, request_id)
        where = {} if self.endpoint is None else {"endpoint": self.endpoint}
        getattr(self.log, self.transition_level)(
            "circuit_transition",
            service=self.service,
            **where,
            **{"from": from_state, "to": to_state},
            reason=reason,
            request_id=request_id,
            consecutive_failures=self.consecutive_failures,
        )


@attrs.define
class _OpenData:
    retry_at: float
    timer: IDelayedCall


@attrs.define
class _HalfOpenData:
    trial_request_id: str | None = None


def _opened(inputs: _BreakerInputs, core: _BreakerCore, request_id: str, reason: str) -> _OpenData:
    timer = core.clock.callLater(core.cooldown, inputs.cooldown_elapsed)
    return _OpenData(retry_at=core.clock.seconds() + core.cooldown, timer=timer)


def _half_opened(inputs: _BreakerInputs, core: _BreakerCore) -> _HalfOpenData:
    return _HalfOpenData()


_builder = TypeMachineBuilder(_BreakerInputs, _BreakerCore)
_closed = _builder.state(CLOSED)
_open = _builder.state(OPEN, _opened)
_half_open = _builder.state(HALF_OPEN, _half_opened)


# -- closed


@_closed.upon(_BreakerInputs.admit).loop()
def _admit_closed(inputs: _BreakerInputs, core: _BreakerCore, request_id: str) -> Admission:
    return Admission(request_id, allowed=True)


@_closed.upon(_BreakerInputs.succeeded).loop()
def _success_closed(inputs: _BreakerInputs, core: _BreakerCore, request_id: str) -> None:
    if core.consecutive_failures:
        core.consecutive_failures = 0
        core.counted(False, "")


@_closed.upon(_BreakerInputs.failed).loop()
def _failure_closed(inputs: _BreakerInputs, core: _BreakerCore, request_id: str, reason: str) -> None:
    core.consecutive_failures += 1
    core.counted(True, reason)
    if core.consecutive_failures >= core.threshold:
        # Re-entrant input: Automat runs it once this transition is done.
        inputs.trip(request_id, reason)


@_closed.upon(_BreakerInputs.failed_elsewhere).loop()
def _failure_elsewhere_closed(inputs: _BreakerInputs, core: _BreakerCore, reason: str) -> None:
    core.consecutive_failures += 1
    if core.consecutive_failures >= core.threshold:
        inputs.trip(None, reason)


@_closed.upon(_BreakerInputs.succeeded_elsewhere).loop()
def _success_elsewhere_closed(inputs: _BreakerInputs, core: _BreakerCore) -> None:
    core.consecutive_failures = 0


@_closed.upon(_BreakerInputs.trip).to(_open)
def _trip(inputs: _BreakerInputs, core: _BreakerCore, request_id: str, reason: str) -> None:
    core.transition(CLOSED, OPEN, reason, request_id)


@_closed.upon(_BreakerInputs.status).loop()
def _status_closed(inputs: _BreakerInputs, core: _BreakerCore) -> BreakerStatus:
    return BreakerStatus(CLOSED, core.consecutive_failures)


_closed.upon(_BreakerInputs.stop).loop().returns(None)
_closed.upon(_BreakerInputs.may_admit).loop().returns(True)


# A trial's later verdict: its headers already closed the circuit (the trial
# succeeded), then its body failed or it was abandoned.  Now it is an
# ordinary attempt of the closed circuit.
@_closed.upon(_BreakerInputs.trial_failed).loop()
def _late_trial_failure_closed(inputs: _BreakerInputs, core: _BreakerCore, request_id: str, reason: str) -> None:
    _failure_closed(inputs, core, request_id, reason)


@_closed.upon(_BreakerInputs.trial_succeeded).loop()
def _late_trial_success_closed(inputs: _BreakerInputs, core: _BreakerCore, request_id: str) -> None:
    _success_closed(inputs, core, request_id)


_closed.upon(_BreakerInputs.trial_abandoned).loop().returns(None)
# No timer runs while closed: a stale cooldown (stopped too late) does nothing.
_closed.upon(_BreakerInputs.cooldown_elapsed).loop().returns(None)


# -- open


@_open.upon(_BreakerInputs.admit).loop()
def _admit_open(
    inputs: _BreakerInputs, core: _BreakerCore, data: _OpenData, request_id: str
) -> Admission:
    left = data.retry_at - core.clock.seconds()
    return Admission(request_id, allowed=False, retry_after=max(1, math.ceil(left)))


# An attempt admitted before the circuit opened may still report; its
# verdict changes nothing until the cooldown is over.
_open.upon(_BreakerInputs.succeeded, nodata=True).loop().returns(None)
_open.upon(_BreakerInputs.failed, nodata=True).loop().returns(None)
# So may an earlier trial (its circuit closed, then opened again).
_open.upon(_BreakerInputs.trial_succeeded, nodata=True).loop().returns(None)
_open.upon(_BreakerInputs.trial_failed, nodata=True).loop().returns(None)
_open.upon(_BreakerInputs.trial_abandoned, nodata=True).loop().returns(None)
# Already open: the threshold reached again by late failures changes nothing.
_open.upon(_BreakerInputs.trip, nodata=True).loop().returns(None)
# Another process's count changes nothing until the cooldown is over.
_open.upon(_BreakerInputs.failed_elsewhere, nodata=True).loop().returns(None)
_open.upon(_BreakerInputs.succeeded_elsewhere, nodata=True).loop().returns(None)
_open.upon(_BreakerInputs.may_admit, nodata=True).loop().returns(False)


@_open.upon(_BreakerInputs.cooldown_elapsed).to(_half_open)
def _cooldown_elapsed(inputs: _BreakerInputs, core: _BreakerCore, data: _OpenData) -> None:
    core.transition(OPEN, HALF_OPEN, "cooldown elapsed", None)


@_open.upon(_BreakerInputs.status).loop()
def _status_open(inputs: _BreakerInputs, core: _BreakerCore, data: _OpenData) -> BreakerStatus:
    left = max(0.0, data.retry_at - core.clock.seconds())
    return BreakerStatus(OPEN, core.consecutive_failures, trial_in=left)


@_open.upon(_BreakerInputs.stop).loop()
def _stop_open(inputs: _BreakerInputs, core: _BreakerCore, data: _OpenData) -> None:
    if data.timer.active():
        data.timer.cancel()


# -- half_open


@_half_open.upon(_BreakerInputs.admit).loop()
def _admit_half_open(
    inputs: _BreakerInputs, core: _BreakerCore, data: _HalfOpenData, request_id: str
) -> Admission:
    if data.trial_request_id is None:
        data.trial_request_id = request_id
        return Admission(request_id, allowed=True, trial=True)
    return Admission(request_id, allowed=False, retry_after=1)


@_half_open.upon(_BreakerInputs.trial_succeeded).to(_closed)
def _trial_succeeded(
    inputs: _BreakerInputs, core: _BreakerCore, data: _HalfOpenData, request_id: str
) -> None:
    core.consecutive_failures = 0
    core.transition(HALF_OPEN, CLOSED, "trial succeeded", request_id)


@_half_open.upon(_BreakerInputs.trial_failed).to(_open)
def _trial_failed(
    inputs: _BreakerInputs, core: _BreakerCore, data: _HalfOpenData, request_id: str, reason: str
) -> None:
    core.consecutive_failures += 1
    core.transition(HALF_OPEN, OPEN, f"trial failed: {reason}", request_id)


@_half_open.upon(_BreakerInputs.trial_abandoned).loop()
def _trial_abandoned(
    inputs: _BreakerInputs, core: _BreakerCore, data: _HalfOpenData, request_id: str
) -> None:
    data.trial_request_id = None


_half_open.upon(_BreakerInputs.succeeded, nodata=True).loop().returns(None)
_half_open.upon(_BreakerInputs.failed, nodata=True).loop().returns(None)


@_half_open.upon(_BreakerInputs.status).loop()
def _status_half_open(
    inputs: _BreakerInputs, core: _BreakerCore, data: _HalfOpenData
) -> BreakerStatus:
    return BreakerStatus(HALF_OPEN, core.consecutive_failures, trial_in=0.0)


_half_open.upon(_BreakerInputs.stop, nodata=True).loop().returns(None)
# A trial may be free (admit says whether it is).
_half_open.upon(_BreakerInputs.may_admit, nodata=True).loop().returns(True)
# The trial decides here, not ordinary failures counting to a threshold,
# and no timer runs.
_half_open.upon(_BreakerInputs.trip, nodata=True).loop().returns(None)
_half_open.upon(_BreakerInputs.cooldown_elapsed, nodata=True).loop().returns(None)
_half_open.upon(_BreakerInputs.failed_elsewhere, nodata=True).loop().returns(None)
_half_open.upon(_BreakerInputs.succeeded_elsewhere, nodata=True).loop().returns(None)


def _indexed(machine: Any) -> Any:
    """
    C{machine} (a built Automat machine) finding each transition in a
    dictionary: Automat scans its whole table for every input, which
    cost an attempt's admission 5 us of its 6 (the table has 39
    transitions, each compared with its states' generated C{__eq__}).
    The states are the builder's own objects, for the machine's life:
    keyed by identity.  The table is the same table, complete: an input
    a state does not handle still raises L{NoTransition}.
    """
    automaton = machine.__automat_automaton__
    table = {
        (id(in_state), symbol): (out_state, outputs)
        for in_state, symbol, out_state, outputs in automaton.allTransitions()
    }

    def output_for_input(in_state: Any, symbol: str) -> tuple[Any, list]:
        found = table.get((id(in_state), symbol))
        if found is None:
            raise NoTransition(state=in_state, symbol=symbol)
        return found[0], list(found[1])

    automaton.outputForInput = output_for_input
    return machine


_BreakerMachine = _indexed(_builder.build())


class CircuitBreaker:
    """
    One service's circuit breaker.

    @param service: the service's name, for logs.
    @param clock: the time source; the cooldown is a C{callLater} on it.
    @param threshold: consecutive failures that open the circuit.
    @param cooldown: seconds the circuit stays open before one trial.
    @param log: a structlog logger for the transitions.
    @param on_transition: called with (service, from, to, reason, request id) on each transition.
    @param transition_level: the log level of transition lines.
    @param endpoint: the endpoint's URL, for the transition lines of a
        service's endpoint.
    @param on_count: told C{(True, reason)} of each failure counted here
        while closed and C{(False, "")} of the success that ends them, for
        other processes sharing the backend (L{failed_elsewhere},
        L{succeeded_elsewhere} is what they do with it).
    """

    def __init__(
        self,
        service: str,
        clock: IReactorTime,
        threshold: int,
        cooldown: float,
        log: Any,
        on_transition: Callable[[str, str, str, str, str | None], None] | None = None,
        transition_level: str = "warning",
        endpoint: str | None = None,
        on_count: Callable[[bool, str], None] | None = None,
    ) -> None:
        self._core = _BreakerCore(
            service, clock, threshold, cooldown, log, on_transition, transition_level, endpoint, on_count=on_count,
        )
        self._machine = _BreakerMachine(self._core)

    def admit(self, request_id: str) -> Admission:
        """Ask whether an attempt of request C{request_id} may go to the backend."""
        return self._machine.admit(request_id)

    def succeeded(self, admission: Admission) -> None:
        """The admitted attempt got an answer that is not a failure (including 4xx)."""
        if admission.trial:
            self._machine.trial_succeeded(admission.request_id)
        elif self._core.consecutive_failures:
            self._machine.succeeded(admission.request_id)
        # else: an ordinary success with no failure counted changes nothing in
        # any state of the table (closed resets a zero count; open and
        # half_open ignore it): the machine is not asked, on every request.

    def failed(self, admission: Admission, reason: str) -> None:
        """The admitted attempt failed: connection, timeout, 5xx, or a broken stream."""
        if admission.trial:
            self._machine.trial_failed(admission.request_id, reason)
        else:
            self._machine.failed(admission.request_id, reason)

    def abandoned(self, admission: Admission) -> None:
        """The admitted attempt ended with no verdict, e.g. its client went away."""
        if admission.trial:
            self._machine.trial_abandoned(admission.request_id)

    def status(self) -> BreakerStatus:
        """The state, the consecutive failures, and when a trial becomes possible."""
        return self._machine.status()

    def may_admit(self) -> bool:
        """Whether an attempt could be let through now (closed, or half open), without taking the trial."""
        return self._machine.may_admit()

    def stop(self) -> None:
        """Cancel the pending cooldown timer, if any: the breaker is discarded."""
        self._machine.stop()

    def open_elsewhere(self, reason: str) -> None:
        """
        Another process sharing this backend opened its circuit: a closed
        circuit opens here too (with its own cooldown); an open or half-open
        one goes on as it is.
        """
        self._machine.trip(None, reason)

    def failed_elsewhere(self, reason: str) -> None:
        """
        Another process sharing this backend counted a failure: a closed
        circuit counts it too (and opens at the threshold, counted across
        processes); an open or half-open one goes on as it is.
        """
        self._machine.failed_elsewhere(reason)

    def succeeded_elsewhere(self) -> None:
        """Another process sharing this backend got a success after failures: a closed circuit's count starts over."""
        self._machine.succeeded_elsewhere()

    def retune(self, threshold: int, cooldown: float) -> None:
        """New settings from a reload; the state and the count are kept."""
        self._core.threshold = threshold
        self._core.cooldown = cooldown
