"""The Redis store's fallback and recovery, on a Clock with a scripted Redis."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock

from tests.fakes import result_of
from txgateway.ratelimit.bucket import BucketSpec
from txgateway.ratelimit.redis import TOKEN_BUCKET_LUA, TOKEN_BUCKET_SHA, RedisRateLimitStore

SPEC = BucketSpec("default", capacity=2, window=60.0)


class ScriptedRedis:
    """Answers EVALSHA like the script would, or hangs, or fails, as told."""

    def __init__(self) -> None:
        self.mode = "up"
        self.loads: list[str] = []
        self.calls: list[tuple] = []
        self.pending: list[Deferred] = []
        self.tokens: dict[str, float] = {}
        self.forgot_script = False

    def script_load(self, script: str) -> Deferred:
        self.loads.append(script)
        self.forgot_script = False
        return self._answer(TOKEN_BUCKET_SHA)

    def evalsha(self, sha: str, keys: list, args: list) -> Deferred:
        self.calls.append((sha, tuple(keys), tuple(args)))
        if self.forgot_script:
            return fail(Exception("NOSCRIPT No matching script. Please use EVAL."))
        answers = []
        for n, key in enumerate(keys):
            left = self.tokens.get(key, float(args[1 + 2 * n]))
            allowed = left >= 1
            self.tokens[key] = left - 1 if allowed else left
            answers.append(f"{1 if allowed else 0} {self.tokens[key]!r}")
        return self._answer(" ".join(answers))

    def _answer(self, value) -> Deferred:
        if self.mode == "hang":
            d = Deferred()
            self.pending.append(d)
            return d
        if self.mode == "down":
            return fail(ConnectionError("Not connected"))
        return succeed(value)


def make(timeout=0.5, retry_interval=5.0):
    clock, redis = Clock(), ScriptedRedis()
    store = RedisRateLimitStore(redis, clock, timeout, retry_interval, structlog.get_logger())
    return clock, redis, store


def test_the_script_is_loaded_once_and_called_by_sha():
    _, redis, store = make()
    for _ in range(3):
        result_of(store.take("ip:a", SPEC))
    assert redis.loads == [TOKEN_BUCKET_LUA]
    assert [c[0] for c in redis.calls] == [TOKEN_BUCKET_SHA] * 3
    assert redis.calls[0][1] == ("txgateway:ratelimit:default:ip:a",)
    assert redis.calls[0][2][1:] == (2, "60.0")


def test_decisions_come_from_redis_while_it_answers():
    _, redis, store = make()
    decisions = [result_of(store.take("ip:a", SPEC)) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2].retry_after == 30
    assert store.description == {"backend": "redis", "healthy": True, "serving_from": "redis"}


def test_a_redis_that_forgot_the_script_gets_it_again():
    _, redis, store = make()
    result_of(store.take("ip:a", SPEC))
    redis.forgot_script = True
    assert result_of(store.take("ip:a", SPEC)).allowed
    assert len(redis.loads) == 2


def test_a_hanging_redis_costs_one_timeout_then_local_buckets_answer():
    clock, redis, store = make()
    redis.mode = "hang"
    d = store.take("ip:a", SPEC)
    clock.advance(0.499)
    assert not d.called
    clock.advance(0.001)
    assert result_of(d).allowed
    assert not store.healthy
    asked = len(redis.pending)
    for _ in range(5):  # no more waiting: Redis is left alone
        store.take("ip:a", SPEC)
    assert len(redis.pending) == asked
    assert store.description["serving_from"] == "memory"


def test_local_buckets_still_limit_while_redis_is_away():
    _, redis, store = make()
    redis.mode = "down"
    decisions = [result_of(store.take("ip:a", SPEC)) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]


def test_the_change_is_logged_once_each_way():
    clock, redis, store = make(retry_interval=5)
    with capture_logs() as logs:
        redis.mode = "down"
        for _ in range(3):
            result_of(store.take("ip:a", SPEC))
            clock.advance(6)  # each later request is a trial that fails again
        redis.mode = "up"
        result_of(store.take("ip:a", SPEC))
        result_of(store.take("ip:a", SPEC))
    events = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert events == ["ratelimit_redis_unavailable", "ratelimit_redis_recovered"]


def test_redis_is_tried_again_after_the_retry_interval_and_recovery_is_automatic():
    clock, redis, store = make(retry_interval=5)
    redis.mode = "down"
    result_of(store.take("ip:a", SPEC))
    calls_when_down = len(redis.calls) + len(redis.loads)
    redis.mode = "up"
    clock.advance(4.999)
    result_of(store.take("ip:a", SPEC))
    assert len(redis.calls) + len(redis.loads) == calls_when_down
    clock.advance(0.001)
    result_of(store.take("ip:a", SPEC))
    assert store.healthy
    assert store.description["serving_from"] == "redis"


def test_close_leaves_no_timer_behind():
    clock, redis, store = make()
    redis.mode = "down"
    result_of(store.take("ip:a", SPEC))
    assert clock.getDelayedCalls()
    result_of(store.close())
    assert clock.getDelayedCalls() == []


def test_a_client_leaving_while_redis_is_asked_is_no_verdict_on_redis():
    clock, redis, store = make()
    result_of(store.take("ip:a", SPEC))
    redis.mode = "hang"
    d = store.take("ip:a", SPEC)
    d.cancel()
    d.addErrback(lambda failure: failure.trap(CancelledError))
    assert store.healthy
    assert clock.getDelayedCalls() == []


def test_takes_that_arrive_while_redis_is_asked_go_together_in_the_next_call():
    _, redis, store = make()
    result_of(store.take("ip:a", SPEC))  # loads the script
    redis.mode = "hang"
    first = store.take("ip:a", SPEC)
    waiting = [store.take("ip:b", SPEC), store.take("ip:a", SPEC), store.take("ip:c", SPEC)]
    assert len(redis.calls) == 2  # the three wait for the call in flight
    redis.pending[0].callback("1 0.0")
    assert result_of(first).allowed
    assert len(redis.calls) == 3  # then go in one call, in their order
    assert redis.calls[-1][1] == (
        "txgateway:ratelimit:default:ip:b", "txgateway:ratelimit:default:ip:a", "txgateway:ratelimit:default:ip:c",
    )
    redis.pending[1].callback("1 1.0 0 0.0 1 1.0")
    assert [result_of(d).allowed for d in waiting] == [True, False, True]


def test_one_client_leaving_a_batch_leaves_the_others_their_answer():
    _, redis, store = make()
    result_of(store.take("ip:a", SPEC))
    redis.mode = "hang"
    store.take("ip:a", SPEC)
    mine, theirs = store.take("ip:b", SPEC), store.take("ip:c", SPEC)
    redis.pending[0].callback("1 0.0")
    mine.cancel()
    mine.addErrback(lambda failure: failure.trap(CancelledError))
    assert not redis.pending[1].called  # the batch still asks for the other client
    redis.pending[1].callback("1 1.0 1 1.0")
    assert result_of(theirs).allowed
