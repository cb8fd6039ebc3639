"""
Each end user of a shared key with an allowance of their own
(C{user_budget_usd}, C{user_tokens_per_minute}, C{user_requests_per_minute}),
taken together with the key's and the team's, all or nothing; their spend
kept across a restart; the spend per end user on C{/spend.json} and the
status page, bounded however many end users call.
"""

from __future__ import annotations

import json

import pytest
import treq
from twisted.internet.task import Clock

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from tests.test_governance import synchronously
from tests.test_openai import JSON, completion
from txgateway.config.gateway import ConfigError, parse_config
from txgateway.governance.governor import end_user_of_scope, user_limits
from txgateway.governance.interface import ModelUse, Settled, SpendReport, top_end_users
from txgateway.governance.ledger import FORGET_INTERVAL, Ask, Ledger, ScopeLimits
from txgateway.governance.local import FLUSH_INTERVAL, LocalLedgerStore
from txgateway.governance.redis import settle_json
from txgateway.governance.spendfile import SpendFile
from txgateway.observability.window import MOST_SPENDERS_PER_MINUTE, OTHER_SPENDERS, RecentSpenders
from txgateway.workers import codec

INI = GATEWAY_HEAD + """
[service:primary]
url = http://primary.test/v1
retries = 0
[model:gpt-4o]
targets = primary
[team:ml]
tokens_per_minute = 100000
[key:app]
secret = app-secret
team = ml
tokens_per_minute = 5000
{extra}
[price:gpt-4o]
prompt = 2.5
completion = 10
"""

# "Say hello" + "user": 9 prompt tokens estimated, plus max_tokens 100.
RESERVED = 109


def harness(extra: str = "user_tokens_per_minute = 250") -> Harness:
    return Harness(INI.format(extra=extra))


def answered(h: Harness, user: str | None, prompt: int = 9, done: int = 3):
    """One call of C{user} answered with C{prompt} and C{done} tokens; its response (read whole)."""
    before = len(h.agents["primary"].requests)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
    if user is not None:
        body["user"] = user
    d = h.request(
        "POST", "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer app-secret"},
    )
    if len(h.agents["primary"].requests) > before:
        h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=prompt, done=done)))
        h.flush()
    response = result_of(d)
    response.text = result_of(treq.content(response))
    return response


def error_of(response) -> dict:
    return json.loads(response.text)["error"]


def body_of(response) -> dict:
    return json.loads(result_of(treq.content(response)))


# -- configuration


def test_the_per_user_keys_are_read_and_make_a_key_governed():
    config = parse_config(INI.format(extra="user_budget_usd = 0.5\nuser_requests_per_minute = 3"), "test.ini", {})
    [key] = config.auth.keys
    assert (key.user_budget_usd, key.user_tokens_per_minute, key.user_requests_per_minute) == (0.5, None, 3)
    assert key.limits_users and key.governed
    assert config.end_user_budget_periods == {"app": "month"}


@pytest.mark.parametrize("extra, message", [
    ("user_budget_usd = -1", "[key:app] user_budget_usd"),
    ("user_tokens_per_minute = 0", "[key:app] user_tokens_per_minute"),
    ("user_requests_per_minute = many", "[key:app] user_requests_per_minute"),
])
def test_a_bad_per_user_value_names_its_section_and_key(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(INI.format(extra=extra), "test.ini", {})


def test_an_end_users_scope_names_its_key_and_the_end_user_whatever_it_holds():
    config = parse_config(INI.format(extra="user_budget_usd = 2"), "test.ini", {})
    limits = user_limits(config.auth.keys[0], "a:b|c")
    assert limits.scope == "user:app:a:b|c" and limits.budget_nano == 2_000_000_000
    assert end_user_of_scope(limits.scope) == ("app", "a:b|c")
    assert end_user_of_scope("team:ml") is None


# -- the allowance of each end user


def test_each_end_user_gets_their_own_tokens_per_minute_within_the_key():
    h = harness()
    first = answered(h, "u1", done=100)
    assert first.code == 200
    # The tightest quota is the end user's: 250 - 109 reserved.
    assert first.headers.getRawHeaders("x-ratelimit-limit-tokens") == ["250"]
    assert first.headers.getRawHeaders("x-ratelimit-remaining-tokens") == [str(250 - RESERVED)]
    assert answered(h, "u1", done=100).code == 200  # 109 settled + 109 reserved: fits
    refused = answered(h, "u1")  # 218 + 109 > 250
    assert refused.code == 429
    error = error_of(refused)
    assert error["type"] == "tokens_exceeded" and "the end user 'u1' of the key 'app'" in error["message"]
    assert refused.headers.getRawHeaders("Retry-After") == ["60"]
    # Another end user of the same key has their own allowance; a call naming none, the key's alone.
    assert answered(h, "u2").code == 200
    no_user = answered(h, None)
    assert no_user.code == 200 and no_user.headers.getRawHeaders("x-ratelimit-limit-tokens") == ["5000"]


def test_an_end_users_refusal_takes_nothing_from_the_key_or_the_team():
    h = harness("user_requests_per_minute = 1")
    assert answered(h, "u1", prompt=9, done=3).code == 200
    spent = body_of(result_of(h.request("GET", "/spend.json")))
    assert answered(h, "u1").code == 429
    after = body_of(result_of(h.request("GET", "/spend.json")))
    assert after["keys"]["app"]["tokens_per_minute"] == spent["keys"]["app"]["tokens_per_minute"]
    assert after["teams"]["ml"]["tokens_per_minute"] == spent["teams"]["ml"]["tokens_per_minute"]
    assert after["keys"]["app"]["in_flight"] == 0


def test_the_keys_limit_still_binds_every_end_user_together():
    h = Harness(INI.format(extra="user_tokens_per_minute = 250").replace("tokens_per_minute = 5000", "tokens_per_minute = 300"))
    assert answered(h, "u1", done=100).code == 200
    assert answered(h, "u2", done=100).code == 200
    refused = answered(h, "u3")  # the end user has 250 left, the key 300 - 218 < 109
    assert refused.code == 429 and "the key 'app'" in error_of(refused)["message"]
    assert "end user" not in error_of(refused)["message"]


def test_an_end_users_budget_is_refused_without_retry_until_the_keys_period_renews():
    # A call of 9 + 100 tokens costs 9 * 2.5 + 100 * 10 = 1,022.5 micro-dollars: reserved, then settled.
    h = harness("user_budget_usd = 0.0011\nbudget_period = day")
    assert answered(h, "u1", done=100).code == 200
    refused = answered(h, "u1")  # 1,022.5 spent + 1,022.5 reserved > 1,100
    assert refused.code == 429
    error = error_of(refused)
    assert error["type"] == "budget_exceeded" and "the end user 'u1'" in error["message"]
    assert refused.headers.getRawHeaders("x-should-retry") == ["false"]
    assert answered(h, "u2").code == 200
    h.advance(86400)
    assert answered(h, "u1").code == 200


def test_the_end_user_comes_from_the_services_end_user_header_before_the_body():
    h = Harness(INI.format(extra="user_requests_per_minute = 1").replace(
        "retries = 0", "retries = 0\nend_user_header = x-app-user"))

    def call(header: str, user: str):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "user": user}
        before = len(h.agents["primary"].requests)
        d = h.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers={
            "Content-Type": "application/json", "Authorization": "Bearer app-secret", "x-app-user": header,
        })
        if len(h.agents["primary"].requests) > before:
            h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o")))
            h.flush()
        return result_of(d).code

    assert call("alice", "same") == 200
    assert call("alice", "other") == 429  # the header names alice again
    assert call("bob", "same") == 200


# -- what the operator sees


def test_spend_json_names_the_dearest_end_users_and_answers_for_one():
    h = harness("user_budget_usd = 1")
    for user, done in (("u1", 3), ("u2", 30), ("u1", 3)):
        assert answered(h, user, done=done).code == 200
    assert answered(h, None).code == 200
    spend = body_of(result_of(h.request("GET", "/spend.json")))
    assert [(row["end_user"], row["requests"], row["completion_tokens"]) for row in spend["end_users"]] == [
        ("u2", 1, 30), ("u1", 2, 6),
    ]
    assert spend["end_users"][1]["cost_usd"] == pytest.approx(2 * (9 * 2.5 + 3 * 10) / 1e6)
    assert spend["keys"]["app"]["per_end_user"] == {"budget_usd": 1.0, "tokens_per_minute": None, "requests_per_minute": None}
    one = body_of(result_of(h.request("GET", "/spend.json?key=app&end_user=u1")))["end_user"]
    assert one["key"] == "app" and one["end_user"] == "u1" and one["budget_usd"] == 1.0
    assert one["spent_usd"] == pytest.approx(2 * (9 * 2.5 + 3 * 10) / 1e6)
    assert one["remaining_usd"] == pytest.approx(1 - one["spent_usd"])
    nobody = body_of(result_of(h.request("GET", "/spend.json?key=app&end_user=nobody")))["end_user"]
    assert nobody["spent_usd"] == 0 and nobody["remaining_usd"] == 1.0


def test_spend_json_refuses_half_an_end_user_query_and_an_unknown_key():
    h = harness()
    half = result_of(h.request("GET", "/spend.json?end_user=u1"))
    assert half.code == 400 and body_of(half)["error"]["type"] == "bad_request"
    unknown = result_of(h.request("GET", "/spend.json?key=nope&end_user=u1"))
    assert unknown.code == 404 and "nope" in body_of(unknown)["error"]["message"]


def test_the_status_page_shows_the_top_spenders_of_the_last_hour():
    h = harness()
    answered(h, "u1", done=3)
    answered(h, "u2", done=40)
    top = body_of(result_of(h.request("GET", "/status.json")))["governance"]["top_end_users_last_hour"]
    assert [(row["end_user"], row["key"], row["requests"]) for row in top] == [("u2", "app", 1), ("u1", "app", 1)]
    assert top[0]["tokens"] == 49
    h.advance(3600)
    assert body_of(result_of(h.request("GET", "/status.json")))["governance"]["top_end_users_last_hour"] == []


# -- bounded however many end users call


def test_recent_spenders_keep_a_bounded_number_per_minute_and_count_the_rest_together():
    clock = Clock()
    spenders = RecentSpenders(clock)
    for number in range(MOST_SPENDERS_PER_MINUTE + 50):
        spenders.add("app", f"user-{number}", 1, 1)
    top = spenders.top(MOST_SPENDERS_PER_MINUTE + 100)
    assert len(top) == MOST_SPENDERS_PER_MINUTE + 1
    assert top[0][:3] == ("app", OTHER_SPENDERS, 50)


def test_recent_spenders_of_several_processes_add_up():
    clock = Clock()
    one, two, merged = RecentSpenders(clock), RecentSpenders(clock), RecentSpenders(clock)
    one.add("app", "u1", 10, 5)
    two.add("app", "u1", 7, 2)
    two.add("app", "u2", 1, 1)
    merged.absorb(one.state())
    merged.absorb(two.state())
    assert merged.top(5) == [("app", "u1", 17, 7, 2), ("app", "u2", 1, 1, 1)]


def test_the_ledger_forgets_idle_end_users_but_not_this_periods_spend():
    ledger = Ledger()
    now = 1796299200.0  # 2026-12-03
    user = ScopeLimits("user:app:u1", tokens_per_minute=100, budget_nano=1000, budget_period="day")
    key = ScopeLimits("key:app", tokens_per_minute=1000)
    ask = Ask("r1", (key, user), 10, 400, now + 30)
    assert ledger.reserve(ask, now).allowed
    ledger.settle(ask, 10, 400, now)
    assert ledger.forget_idle(now + 1) == 0  # its token window still holds the call
    assert ledger.forget_idle(now + 61) == 1  # the window, gone; the day's spend kept
    assert ledger.committed[("user:app:u1", "d2026-12-03")] == 400
    assert not ledger.reserve(Ask("r2", (key, user), 10, 601, now + 90), now + 62).allowed
    # The next day, yesterday's spend of an end user is forgotten too (a key's is not).
    ledger.committed[("key:app", "d2026-12-03")] = 1
    ledger.forget_idle(now + 86400)
    assert ("user:app:u1", "d2026-12-03") not in ledger.committed and ("key:app", "d2026-12-03") in ledger.committed


def test_the_ledger_sweeps_idle_end_users_as_it_reserves():
    ledger = Ledger()
    now = 1796299200.0
    for number in range(100):
        scope = ScopeLimits(f"user:app:{number}", requests_per_minute=5)
        ask = Ask(f"r{number}", (scope,), 0, 0, now + 10)
        ledger.reserve(ask, now)
        ledger.settle(ask, 0, 0, now)
    assert ledger.reserve(Ask("last", (ScopeLimits("key:app"),), 0, 0, now + 200), now + FORGET_INTERVAL + 61).allowed
    assert [name for name in ledger._scopes if name.startswith("user:")] == []


# -- kept across a restart


def user_settled(user: str, cost: int) -> Settled:
    return Settled("app", "ml", 10, cost, (ModelUse("gpt-4o", 6, 4, cost),), user)


def test_an_end_users_spend_is_written_and_their_budget_read_back_after_a_restart(tmp_path):
    path = str(tmp_path / "spend.db")
    clock = Clock()
    clock.advance(1796299200)  # 2026-12-03
    budget = ScopeLimits("user:app:u1", budget_nano=1000, budget_period="month")
    store = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None, end_user_budget_periods={"app": "month"})
    ask = Ask("r1", (ScopeLimits("key:app"), budget), 0, 600, clock.seconds() + 60)
    assert result_of(store.reserve(ask)).allowed
    result_of(store.settle(ask, user_settled("u1", 600)))
    clock.advance(FLUSH_INTERVAL)
    result_of(store.close())
    assert SpendFile(path)._db.execute("SELECT * FROM end_user_spend").fetchall() == [("2026-12-03", "app", "u1", 6, 4, 600, 1)]
    clock.advance(86400 * 3)  # the same month
    again = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None, end_user_budget_periods={"app": "month"})
    assert result_of(again.reserve(Ask("r2", (budget,), 0, 401, clock.seconds() + 60))).reason == "budget_exceeded"
    assert result_of(again.reserve(Ask("r3", (budget,), 0, 400, clock.seconds() + 60))).allowed
    report = result_of(again.spend([], 31))
    assert report.end_users == (("app", "u1", 6, 4, 600, 1),)
    # A gateway whose key has no end user budget reads none of it into its ledger (the report still has it).
    unlimited = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None)
    assert not [key for key in unlimited.ledger.committed if key[0].startswith("user:")]
    assert result_of(unlimited.spend([], 31)).end_users == (("app", "u1", 6, 4, 600, 1),)
    for each in (again, unlimited):
        result_of(each.close())


def test_a_total_budget_of_an_end_user_is_read_back_over_every_day(tmp_path):
    path = str(tmp_path / "spend.db")
    spend_file = SpendFile(path)
    spend_file.add([], [("2025-01-01", "app", "u1", 1, 1, 700, 1), ("2026-12-01", "app", "u1", 1, 1, 200, 1)])
    spend_file.close()
    clock = Clock()
    clock.advance(1796299200)
    store = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None, end_user_budget_periods={"app": "total"})
    assert store.ledger.committed[("user:app:u1", "total")] == 900
    result_of(store.close())


# -- carried between processes and to Redis


def test_the_end_user_crosses_between_worker_and_supervisor():
    settled = user_settled('quo"te', 5)
    assert codec.settled_from(json.loads(json.dumps(codec.settled_to(settled)))) == settled
    report = SpendReport((), (), (("app", "u1", 1, 2, 3, 4),))
    assert codec.report_from(json.loads(json.dumps(codec.report_to(report)))) == report


def test_a_settle_for_redis_writes_any_end_user_id_as_json():
    scope = ScopeLimits('user:app:a"b\\c', budget_nano=10, budget_period="total")
    ask = Ask("r1", (ScopeLimits("key:app"), scope), 1, 1, 100.0)
    decoded = json.loads(settle_json(ask, user_settled('a"b\\c', 1), 50.0, 7))
    assert decoded["user"] == 'a"b\\c' and decoded["seq"] == 7
    assert decoded["scopes"][1] == {"s": 'user:app:a"b\\c', "tpm": 0, "rpm": 0, "bk": "total"}
    assert "user" not in json.loads(settle_json(ask, Settled("app", None, 1, 1), 50.0, 8))


def test_the_report_names_the_dearest_end_users_over_its_days():
    rows = [("2026-12-01", "app", "u1", 1, 1, 5, 1), ("2026-12-02", "app", "u1", 1, 1, 5, 1), ("2026-12-02", "app", "u2", 0, 0, 8, 1)]
    assert top_end_users(rows) == (("app", "u1", 2, 2, 10, 2), ("app", "u2", 0, 0, 8, 1))
