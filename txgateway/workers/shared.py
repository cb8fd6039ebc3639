"""
A worker's side of the shared state: the rate-limit store and the ledger
that ask the supervisor, batched; the circuit verdicts it tells and hears.

Every decision the supervisor makes is exact for the whole daemon.  While
it cannot be asked (it is gone, or a call timed out) a worker decides
alone, in memory, logs it once, and shows it in C{/health}: a request is
never refused or lost for the supervisor's sake.
"""

from __future__ import annotations

from typing import Any, Callable
from weakref import WeakValueDictionary

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.errors import describe_failure
from txgateway.governance.interface import IGovernanceStore, Settled, SpendReport
from txgateway.governance.ledger import Ask, ScopeLimits, Verdict
from txgateway.governance.local import LocalLedgerStore
from txgateway.ratelimit.bucket import BucketSpec, Decision
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.workers import codec

__all__ = ["BatchedCalls", "CircuitShare", "FAILED_ELSEWHERE", "OPENED_ELSEWHERE", "SharedLedgerStore", "SharedRateLimitStore"]

#: The reason a circuit gives when another worker opened it.
OPENED_ELSEWHERE = "opened by worker"
#: The reason a circuit gives when failures counted with other workers opened it.
FAILED_ELSEWHERE = "counted with worker"


class BatchedCalls:
    """
    Calls to the supervisor, batched without a timer: a call goes at once
    when none is in flight; calls made while one is go together in the next
    (one message, answered in order).

    @param call: sends C{("batch", [[name, args], ...])} and returns a
        L{Deferred} of the answers (a L{txgateway.workers.channel.CallChannel}'s C{call}).
    @param timeout: seconds a batch may wait for its answers.
    """

    def __init__(self, call: Callable[[str, Any], Deferred], clock: IReactorTime, timeout: float) -> None:
        self._call = call
        self._clock = clock
        self._timeout = timeout
        self._waiting: list[tuple[str, Any, Deferred]] = []
        self._in_flight = False

    def call(self, name: str, args: Any) -> Deferred:
        """One call, answered with its result (or failed with the batch)."""
        answer: Deferred = Deferred()
        self._waiting.append((name, args, answer))
        if not self._in_flight:
            self._send()
        return answer

    def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        self._in_flight = True
        try:
            sent = self._call("batch", [[name, args] for name, args, _ in batch])
        except Exception:
            sent = Deferred()
            sent.errback()
        sent.addTimeout(self._timeout, self._clock)
        sent.addBoth(self._answered, batch)

    def _answered(self, result: Any, batch: list[tuple[str, Any, Deferred]]) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            for _, _, answer in batch:
                answer.errback(result)
        else:
            for (_, _, answer), value in zip(batch, result):
                answer.callback(value)
        if self._waiting:
            self._send()


class _Fallback:
    """Logs once when the supervisor stops answering and once when it answers again."""

    def __init__(self, log: Any, what: str) -> None:
        self._log = log
        self._what = what
        self.alone = False

    def failed(self, failure: Failure) -> None:
        if not self.alone:
            self.alone = True
            self._log.warning(f"{self._what}_supervisor_unavailable", reason=describe_failure(failure.value),
                              deciding="alone, in this worker's memory")

    def answered(self) -> None:
        if self.alone:
            self.alone = False
            self._log.warning(f"{self._what}_supervisor_recovered")


@implementer(IRateLimitStore)
class SharedRateLimitStore:
    """The memory rate limiter held by the supervisor: every worker takes from the same buckets."""

    def __init__(self, calls: BatchedCalls, clock: IReactorTime, log: Any) -> None:
        self._calls = calls
        self._local = MemoryRateLimitStore(clock)
        self._fallback = _Fallback(log, "ratelimit")

    @property
    def description(self) -> dict:
        return {"backend": "memory", "shared_by": "supervisor", "healthy": not self._fallback.alone}

    def take(self, key: str, spec: BucketSpec) -> Deferred[Decision]:
        taking = self._calls.call("take", [key, codec.spec_to(spec)])

        def decided(value: list) -> Decision:
            self._fallback.answered()
            return codec.decision_from(value)

        def alone(failure: Failure) -> Decision:
            self._fallback.failed(failure)
            return self._local.decide(key, spec)

        return taking.addCallbacks(decided, alone)

    def close(self) -> Deferred[None]:
        return self._local.close()


@implementer(IGovernanceStore)
class SharedLedgerStore:
    """The ledger (and its spend file) held by the supervisor: every worker reserves and settles on it."""

    def __init__(self, calls: BatchedCalls, clock: IReactorTime, log: Any, backend: str) -> None:
        self._calls = calls
        self._backend = backend
        self._local = LocalLedgerStore(clock, None, maybeDeferred, log)
        self._fallback = _Fallback(log, "budgets")

    @property
    def description(self) -> dict:
        return {"backend": self._backend, "shared_by": "supervisor", "healthy": not self._fallback.alone}

    def _ask(self, name: str, args: Any, decode: Callable[[Any], Any], alone: Callable[[], Deferred]) -> Deferred:
        def answered(value: Any) -> Any:
            self._fallback.answered()
            return decode(value)

        def failed(failure: Failure) -> Deferred:
            self._fallback.failed(failure)
            return alone()

        return self._calls.call(name, args).addCallbacks(answered, failed)

    def reserve(self, ask: Ask) -> Deferred[Verdict]:
        return self._ask("reserve", codec.ask_to(ask), codec.verdict_from, lambda: self._local.reserve(ask))

    def settle(self, ask: Ask, settled: Settled) -> Deferred[None]:
        return self._ask(
            "settle", [codec.ask_to(ask), codec.settled_to(settled)], lambda value: None,
            lambda: self._local.settle(ask, settled),
        )

    def renew(self, reservation_ids: list[str], expires_at: float) -> Deferred[None]:
        ids = list(reservation_ids)
        self._local.ledger.renew(ids, expires_at)  # those taken here while the supervisor was away
        return self._ask("renew", [ids, expires_at], lambda value: None, lambda: succeed(None))

    def spend(self, scopes: list[ScopeLimits], days: int) -> Deferred[SpendReport]:
        return self._ask(
            "spend", [codec.limits_to(scopes), days], codec.report_from, lambda: self._local.spend(scopes, days)
        )

    def close(self) -> Deferred[None]:
        return self._local.close()


class CircuitShare:
    """
    A worker's breakers by place (service, endpoint), so that a circuit one
    worker opens opens in every worker (L{transitioned} tells the
    supervisor, L{open_here} is what its notice does), and so that the
    consecutive failures that open it are counted across workers, however
    they were spread (L{counted} tells, L{count_here} counts).  Messages go
    only on failures and on the success that ends them: none per request.
    """

    def __init__(self, tell: Callable[[str, Any], None]) -> None:
        self._tell = tell
        self._breakers: WeakValueDictionary = WeakValueDictionary()

    def register(self, service: str, place: str, breaker: Any) -> None:
        """The breaker of C{service} at C{place} (an endpoint URL, or a deployment's)."""
        self._breakers[(service, place)] = breaker

    def transitioned(self, service: str, place: str, to_state: str, reason: str) -> None:
        """A breaker of this worker changed state: an opening of its own is told to the others."""
        if to_state == "open" and not reason.startswith(OPENED_ELSEWHERE):
            self._tell("circuit_opened", [service, place, reason])

    def counted(self, service: str, place: str, failed: bool, reason: str) -> None:
        """A breaker of this worker counted a failure (or the success that ends them): the others count it too."""
        self._tell("circuit_counted", [service, place, failed, reason])

    def count_here(self, service: str, place: str, worker: int, failed: bool, reason: str) -> None:
        """Another worker counted a failure of this backend (or a success after them): counted here too."""
        breaker = self._breakers.get((service, place))
        if breaker is None:
            return
        if failed:
            breaker.failed_elsewhere(f"{FAILED_ELSEWHERE} {worker}: {reason}")
        else:
            breaker.succeeded_elsewhere()

    def open_here(self, service: str, place: str, worker: int, reason: str) -> None:
        """Another worker opened this circuit: open it here too (a closed one; open and half-open stay)."""
        breaker = self._breakers.get((service, place))
        if breaker is not None:
            breaker.open_elsewhere(f"{OPENED_ELSEWHERE} {worker}: {reason}")
