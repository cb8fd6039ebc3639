"""The one guarded Redis client every store uses: timeout, breaker, NOSCRIPT reload, one line each way."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from tests.fakes import result_of
from txgateway.resilience.guarded import GuardedRedis, script_sha


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.lines.append((event, fields))

    def debug(self, event: str, **fields) -> None:
        pass

    info = debug


class NoScript(Exception):
    def __str__(self) -> str:
        return "NOSCRIPT No matching script. Please use EVAL."


class ScriptedRedis:
    """Knows the scripts it was given; forgets them on L{restart}."""

    def __init__(self) -> None:
        self.scripts: dict[str, str] = {}
        self.calls: list[str] = []
        self.hang = False

    def restart(self) -> None:
        self.scripts.clear()

    def script_load(self, script: str) -> Deferred:
        self.calls.append("load")
        self.scripts[script_sha(script)] = script
        return succeed(script_sha(script))

    def evalsha(self, sha: str, keys: list, args: list) -> Deferred:
        self.calls.append("evalsha")
        if self.hang:
            return Deferred()
        if sha not in self.scripts:
            return fail(NoScript())
        return succeed(f"ran {len(args)}")


def guarded(redis=None, log=None, clock=None) -> tuple[GuardedRedis, ScriptedRedis, RecordingLog, Clock]:
    clock, redis, log = clock or Clock(), redis or ScriptedRedis(), log or RecordingLog()
    return GuardedRedis(redis, clock, 0.5, 2.0, log, "store_redis", {"serving_from": "memory"}), redis, log, clock


def test_a_script_is_loaded_once_then_called_by_its_sha():
    client, redis, _, _ = guarded()
    assert result_of(Deferred.fromCoroutine(client.script("return 1", ["k"], [1, 2]))) == "ran 2"
    assert result_of(Deferred.fromCoroutine(client.script("return 1", ["k"], [1]))) == "ran 1"
    assert redis.calls == ["load", "evalsha", "evalsha"]


def test_a_redis_that_forgot_its_scripts_gets_the_script_again_once():
    client, redis, _, _ = guarded()
    result_of(Deferred.fromCoroutine(client.script("return 1", [], [])))
    redis.restart()
    assert result_of(Deferred.fromCoroutine(client.script("return 1", [], []))) == "ran 0"
    assert redis.calls == ["load", "evalsha", "evalsha", "load", "evalsha"]


def test_a_call_that_takes_longer_than_the_timeout_fails_on_the_clock():
    client, redis, _, clock = guarded()
    redis.hang = True
    called = Deferred.fromCoroutine(client.script("return 1", [], []))
    clock.advance(0.49)
    assert not called.called
    clock.advance(0.01)
    failures = []
    called.addErrback(failures.append)
    assert failures and "TimeoutError" in type(failures[0].value).__name__


def test_down_and_back_are_logged_once_each_and_redis_is_left_alone_meanwhile():
    client, _, log, clock = guarded()
    for _ in range(3):
        admission = client.admit("k")
        if admission.allowed:
            client.failed(admission, ConnectionRefusedError("refused"))
    assert client.down and not client.healthy and not client.may_ask
    assert [event for event, _ in log.lines] == ["store_redis_unavailable"]
    assert log.lines[0][1]["serving_from"] == "memory" and "refused" in log.lines[0][1]["reason"]
    clock.advance(2.0)
    assert client.may_ask
    trial = client.admit("k")
    assert trial.allowed and not client.admit("k").allowed  # one trial at a time
    assert client.succeeded(trial, serving_from="redis") is True
    assert client.succeeded(client.admit("k")) is False
    assert [event for event, _ in log.lines] == ["store_redis_unavailable", "store_redis_recovered"]
    assert client.healthy and not client.down


def test_close_stops_the_breaker_and_disconnects():
    closed, clock = [], Clock()
    client = GuardedRedis(ScriptedRedis(), clock, 0.5, 2.0, RecordingLog(), "x", disconnect=lambda: closed.append(1) or succeed(None))
    client.failed(client.admit("k"), ConnectionRefusedError())
    result_of(client.close())
    assert closed == [1]
    assert clock.getDelayedCalls() == []
