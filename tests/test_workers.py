"""
The parts of a daemon of workers, without processes: the values they
exchange, the batched calls, the supervisor's shared state, the merged
view, the restart backoff and the shared circuit verdicts.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txgateway.governance.interface import ModelUse, Settled
from txgateway.governance.ledger import Ask, Quota, ScopeLimits, Verdict
from txgateway.governance.local import LocalLedgerStore
from txgateway.observability.metrics import GatewayMetrics, RecentWindows
from txgateway.ratelimit.bucket import BucketSpec
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.resilience.breaker import CircuitBreaker
from txgateway.workers import codec
from txgateway.workers.channel import CallChannel, ChannelClosed, RemoteCallError
from txgateway.workers.merge import merge_expositions, merge_health
from txgateway.workers.shared import BatchedCalls, CircuitShare, SharedRateLimitStore
from txgateway.workers.state import SharedState
from txgateway.workers.supervisor import restart_delay


class NoLog:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_values_cross_as_json_and_come_back_equal():
    ask = Ask("r1", (ScopeLimits("key:a", 100, 5, 10**9, "day", 2), ScopeLimits("team:t")), 42, 7, 123.5)
    assert codec.ask_from(codec.ask_to(ask)) == ask
    verdict = Verdict(False, "rate_limited", "key:a", 3.0, Quota(100, 0, 12.0, 120), None)
    assert codec.verdict_from(codec.verdict_to(verdict)) == verdict
    settled = Settled("a", "t", 30, 9, (ModelUse("m", 10, 20, 9),))
    assert codec.settled_from(codec.settled_to(settled)) == settled
    spec = BucketSpec("default", 10, 60.0)
    assert codec.spec_from(codec.spec_to(spec)) == spec


def test_the_shared_state_answers_a_batch_in_order_from_one_bucket():
    clock = Clock()
    state = SharedState(MemoryRateLimitStore(clock), None)
    spec = codec.spec_to(BucketSpec("default", 2, 60.0))
    answers = []
    state.batch([["take", ["k", spec]], ["take", ["k", spec]], ["take", ["k", spec]]]).addCallback(answers.append)
    assert [codec.decision_from(value).allowed for value in answers[0]] == [True, True, False]


def test_the_shared_ledger_reserves_and_settles_for_every_worker():
    clock = Clock()
    clock.advance(1000)
    ledger = LocalLedgerStore(clock, None, lambda f, *a: succeed(f(*a)), NoLog())
    state = SharedState(MemoryRateLimitStore(clock), ledger)
    limits = ScopeLimits("key:a", requests_per_minute=1)
    first = Ask("r1", (limits,), 0, 0, 2000.0)
    second = Ask("r2", (limits,), 0, 0, 2000.0)
    answers = []
    state.batch([["reserve", codec.ask_to(first)], ["reserve", codec.ask_to(second)]]).addCallback(answers.append)
    allowed = [codec.verdict_from(value).allowed for value in answers[0]]
    assert allowed == [True, False]
    settled = codec.settled_to(Settled("a", None, 0, 5, (ModelUse("m", 1, 2, 5),)))
    state.batch([["settle", [codec.ask_to(first), settled]]]).addCallback(answers.append)
    report = []
    state.batch([["spend", [codec.limits_to([limits]), 1]]]).addCallback(report.append)
    spend = codec.report_from(report[0][0])
    assert spend.scopes[0].spent_nano == 5


def test_calls_made_while_one_is_in_flight_go_together_in_the_next():
    sent: list[tuple[str, list, Deferred]] = []

    def call(name, args):
        answer = Deferred()
        sent.append((name, args, answer))
        return answer

    calls = BatchedCalls(call, Clock(), 1.0)
    results = []
    for n in range(3):
        calls.call("take", n).addCallback(results.append)
    assert [args for _, args, _ in sent] == [[["take", 0]]]
    sent[0][2].callback(["a"])
    assert [args for _, args, _ in sent][1] == [["take", 1], ["take", 2]]
    sent[1][2].callback(["b", "c"])
    assert results == ["a", "b", "c"]


def test_a_worker_decides_alone_when_the_supervisor_does_not_answer():
    clock = Clock()
    calls = BatchedCalls(lambda name, args: Deferred(), clock, 1.0)
    store = SharedRateLimitStore(calls, clock, NoLog())
    decisions = []
    store.take("k", BucketSpec("default", 1, 60.0)).addCallback(decisions.append)
    assert decisions == []
    clock.advance(1.0)
    assert decisions[0].allowed
    assert store.description["healthy"] is False


def connected_pair():
    left, right = CallChannel({}), CallChannel({})
    left_transport, right_transport = StringTransport(), StringTransport()
    left.makeConnection(left_transport)
    right.makeConnection(right_transport)

    def pump():
        while left_transport.value() or right_transport.value():
            data, _ = left_transport.value(), left_transport.clear()
            right.dataReceived(data)
            data, _ = right_transport.value(), right_transport.clear()
            left.dataReceived(data)

    return left, right, pump


def test_a_call_crosses_the_channel_and_its_answer_comes_back():
    left, right, pump = connected_pair()
    right.handlers["double"] = lambda args: args * 2
    answers = []
    left.call("double", 21).addCallback(answers.append)
    pump()
    assert answers == [42]


def test_a_call_without_a_handler_fails_clearly_and_a_lost_channel_fails_what_waits():
    left, right, pump = connected_pair()
    failures = []
    left.call("nothing").addErrback(lambda failure: failures.append(failure.check(RemoteCallError)))
    pump()
    assert failures == [RemoteCallError]
    waiting = left.call("never")
    left.connectionLost(None)
    waiting.addErrback(lambda failure: failures.append(failure.check(ChannelClosed)))
    assert failures[-1] is ChannelClosed


EXPOSITION = """# HELP txgateway_requests_total Requests.
# TYPE txgateway_requests_total counter
txgateway_requests_total{{service="ai"}} {count}
# HELP txgateway_in_flight_requests In flight.
# TYPE txgateway_in_flight_requests gauge
txgateway_in_flight_requests {flight}
"""


def test_counters_are_summed_and_gauges_labelled_by_worker():
    text = merge_expositions([
        (1, EXPOSITION.format(count=3, flight=1)), (2, EXPOSITION.format(count=4, flight=0)),
    ]).decode()
    assert 'txgateway_requests_total{service="ai"} 7.0' in text
    assert 'txgateway_in_flight_requests{worker="1"} 1.0' in text
    assert 'txgateway_in_flight_requests{worker="2"} 0.0' in text


def test_the_daemons_health_shows_the_most_open_circuit_and_all_in_flight():
    def document(circuit, in_flight):
        endpoint = {"url": "http://b", "circuit": circuit, "consecutive_failures": 5 if circuit == "open" else 0,
                    "trial_in_s": 3.0 if circuit == "open" else None, "in_flight": in_flight}
        return {"status": "ok", "uptime_s": 1, "services": {"ai": {"url": "http://b", "endpoints": [endpoint]}}}

    merged = merge_health([document("closed", 2), document("open", 1)], 10.0)
    assert merged["services"]["ai"]["circuit"] == "open"
    assert merged["services"]["ai"]["endpoints"][0]["in_flight"] == 3
    assert merged["status"] == "degraded"
    assert merged["uptime_s"] == 10.0


def test_windows_of_several_workers_add_up():
    clock = Clock()
    clock.advance(100)
    one, two = GatewayMetrics(clock), GatewayMetrics(clock)
    one.observe_attempt("ai", "http://b", "answered")
    two.observe_attempt("ai", "http://b", "http_5xx")
    merged = RecentWindows(clock)
    merged.absorb(one.window_state())
    merged.absorb(two.window_state())
    series = merged.recent.series("ai", {"http://b": "closed"})
    assert series["requests_per_s"][-1] == 2
    assert series["error_rate"][-1] == 0.5


def test_a_crashing_worker_waits_longer_each_time_up_to_thirty_seconds():
    assert [restart_delay(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_circuit_opened_elsewhere_opens_here_once_and_is_not_told_back():
    clock = Clock()
    told = []
    share = CircuitShare(lambda name, args: told.append(args))
    breaker = CircuitBreaker("ai", clock, 3, 10.0, NoLog(),
                             lambda service, f, to, reason, rid: share.transitioned(service, "http://b", to, reason))
    share.register("ai", "http://b", breaker)
    share.open_here("ai", "http://b", 2, "refused")
    assert breaker.status().state == "open"
    assert told == []
    clock.advance(10.0)
    admission = breaker.admit("r")
    breaker.failed(admission, "refused again")
    assert told == [["ai", "http://b", "trial failed: refused again"]]


class _Wedged:
    """A gateway's view for a link whose supervisor never answers."""

    def __init__(self, clock: Clock) -> None:
        self.metrics = GatewayMetrics(clock)

    def local_health(self) -> dict:
        return {"status": "ok", "uptime_s": 5.0, "services": {}}


def test_a_probe_is_answered_by_this_worker_alone_when_the_supervisor_does_not_gather():
    from txgateway.workers.link import GATHER_TIMEOUT, SupervisorLink

    clock = Clock()
    logged: list = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            logged.append(event)

    sent = StringTransport()
    link = SupervisorLink(lambda factory: None, clock, 2, Log())
    channel = CallChannel({}, None, lambda channel: None)
    channel.makeConnection(sent)
    link._made(channel)
    gateway = _Wedged(clock)
    link.gateway = lambda: gateway

    health: list = []
    link.health(gateway.local_health()).addCallback(health.append)
    metrics: list = []
    link.exposition(gateway.metrics.exposition()).addCallback(metrics.append)
    assert b"gather" in sent.value() and health == []
    clock.advance(GATHER_TIMEOUT)

    assert health[0]["status"] == "degraded"
    assert health[0]["workers"] == {"configured": None, "answering": 1, "restarts": None, "supervisor": "not answering"}
    assert health[0]["uptime_s"] == 5.0
    assert 'txgateway_workers{kind="answering"} 1.0' in metrics[0].decode()
    assert "txgateway_worker_restarts" not in metrics[0].decode()
    assert logged == ["supervisor_gather_failed", "supervisor_gather_failed"]


def _two_workers(threshold: int = 3) -> tuple[Clock, list[CircuitBreaker]]:
    """Two workers' breakers of one backend, their counts told to each other as the supervisor passes them on."""
    clock = Clock()
    breakers: list[CircuitBreaker] = []
    shares: list[CircuitShare] = []

    def teller(me: int):
        def tell(name: str, args: list) -> None:
            other = shares[1 - me]
            if name == "circuit_counted":
                service, place, failed, reason = args
                other.count_here(service, place, me, failed, reason)
            elif name == "circuit_opened":
                service, place, reason = args
                other.open_here(service, place, me, reason)
        return tell

    for me in (0, 1):
        share = CircuitShare(teller(me))
        breaker = CircuitBreaker(
            "ai", clock, threshold, 10.0, NoLog(),
            lambda service, f, to, reason, rid, share=share: share.transitioned(service, "http://b", to, reason),
            on_count=lambda failed, reason, share=share: share.counted("ai", "http://b", failed, reason),
        )
        share.register("ai", "http://b", breaker)
        shares.append(share)
        breakers.append(breaker)
    return clock, breakers


def _fail(breaker: CircuitBreaker) -> None:
    breaker.failed(breaker.admit("r"), "refused")


def test_three_failures_spread_over_two_workers_open_the_circuit_in_both():
    _, (one, two) = _two_workers(threshold=3)
    _fail(one)
    _fail(two)
    assert one.status().state == two.status().state == "closed"
    _fail(one)
    assert one.status().state == two.status().state == "open"


def test_a_success_in_either_worker_starts_the_count_over_in_both():
    _, (one, two) = _two_workers(threshold=3)
    _fail(one)
    _fail(one)
    two.succeeded(two.admit("r"))
    assert one.status().consecutive_failures == two.status().consecutive_failures == 0
    _fail(two)
    _fail(one)
    assert one.status().state == "closed"


def test_an_ordinary_success_with_no_failure_counted_tells_nobody():
    told = []
    share = CircuitShare(lambda name, args: told.append(name))
    breaker = CircuitBreaker("ai", Clock(), 3, 10.0, NoLog(), on_count=lambda f, r: share.counted("ai", "u", f, r))
    for _ in range(5):
        breaker.succeeded(breaker.admit("r"))
    assert told == []
