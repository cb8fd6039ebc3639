"""
Governed keys through a whole gateway on a Clock: the reservation and its
headers, refusals in the error shape before any backend is called, the
settle priced by the model that answered, a stream whose client leaves,
models and services a key may not call, and the spend file.
"""

from __future__ import annotations

import json

import treq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from tests.test_openai import JSON, SSE, chunk, completion, usage_chunk
from txgateway.config.gateway import ConfigError, parse_config
from txgateway.governance.interface import ModelUse, Settled
from txgateway.governance.ledger import Ask, ScopeLimits
from txgateway.governance.local import FLUSH_INTERVAL, LocalLedgerStore
from txgateway.governance.spendfile import SpendFile

import pytest

INI = GATEWAY_HEAD + """
[service:primary]
url = http://primary.test/v1
retries = 0
[service:cheap]
url = http://cheap.test/v1
retries = 0
[service:files]
url = http://files.test
retries = 0
[model:gpt-4o]
targets = primary, cheap:gpt-4o-mini
[model:o1]
targets = primary
[team:ml]
tokens_per_minute = 100000
[key:alice]
secret = alice-secret
team = ml
models = gpt-4o
services = files
tokens_per_minute = 2000
requests_per_minute = 50
{alice}
[key:bob]
secret = bob-secret
max_parallel = 1
[price:gpt-4o]
prompt = 2.5
completion = 10
[price:gpt-4o-mini]
prompt = 0.15
completion = 0.6
"""


def harness(alice: str = "") -> Harness:
    return Harness(INI.format(alice=alice))


def chat(h: Harness, key: str = "alice-secret", model: str = "gpt-4o", stream: bool = False, **fields):
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100, **fields}
    if stream:
        body["stream"] = True
    return h.request(
        "POST", "/v1/chat/completions", data=json.dumps(body).encode(), unbuffered=stream,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )


def error_of(response) -> dict:
    return json.loads(result_of(treq.content(response)))["error"]


# "Say hello" + "user": 13 bytes -> 5 tokens, one message -> 4: 9, plus max_tokens 100.
RESERVED = 109


def test_a_governed_call_reserves_its_worst_case_and_says_its_quotas_as_openai_does():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=3)))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders("x-ratelimit-limit-tokens") == ["2000"]
    assert headers.getRawHeaders("x-ratelimit-remaining-tokens") == [str(2000 - RESERVED)]
    assert headers.getRawHeaders("x-ratelimit-reset-tokens") == ["1m0s"]
    assert headers.getRawHeaders("x-ratelimit-limit-requests") == ["50"]
    assert headers.getRawHeaders("x-ratelimit-remaining-requests") == ["49"]
    result_of(treq.content(response))
    [line] = h.access.lines
    assert (line["key"], line["team"], line["reserved_tokens"]) == ("alice", "ml", RESERVED)
    assert line["cost_usd"] == pytest.approx((9 * 2.5 + 3 * 10) / 1e6)


def test_the_settle_gives_back_what_the_backend_did_not_use():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=3)))
    h.flush()
    result_of(treq.content(result_of(d)))
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o")))
    h.flush()
    # The first call settled at 12 tokens; the second reserved its 109.
    assert result_of(d).headers.getRawHeaders("x-ratelimit-remaining-tokens") == [str(2000 - 12 - RESERVED)]


def test_a_fallback_to_a_cheaper_model_costs_the_cheaper_price():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(503, JSON, b'{"error":"busy"}'))
    h.flush()
    h.agents["cheap"].last.respond(FakeResponse(200, JSON, completion("gpt-4o-mini", prompt=9, done=3)))
    h.flush()
    result_of(treq.content(result_of(d)))
    [line] = h.access.lines
    assert line["cost_usd"] == pytest.approx((9 * 0.15 + 3 * 0.6) / 1e6)
    exposition = h.gateway.metrics.exposition().decode()
    assert 'txgateway_spend_usd_total{key="alice",model="gpt-4o-mini",team="ml"}' in exposition


def test_a_call_that_does_not_fit_is_refused_before_any_backend_is_called():
    h = harness()
    d = chat(h, max_tokens=5000)
    response = result_of(d)
    assert response.code == 429
    error = error_of(response)
    assert error["type"] == "tokens_exceeded" and "5009 tokens" in error["message"] and error["request_id"]
    assert response.headers.getRawHeaders("retry-after") is None  # it never fits: waiting does not help
    assert h.agents["primary"].requests == []
    assert 'txgateway_governance_refusals_total{key="alice",reason="tokens_exceeded"} 1.0' in h.gateway.metrics.exposition().decode()


def test_a_request_dearer_than_the_whole_budget_says_so_and_no_wait():
    h = harness("budget_usd = 0.0001\nbudget_period = day")
    d = chat(h)  # reserves 9 x 2.5 + 100 x 10 = 1022.5 micro-dollars: over 100
    response = result_of(d)
    assert response.code == 429
    error = error_of(response)
    assert error["type"] == "budget_exceeded"
    assert error["message"] == (
        "the request may cost up to $0.0010225 (9 prompt tokens and up to 100 completion tokens, at the dearest price"
        " of its models), more than the whole budget of the key 'alice' ($0.0001 a day); or set max_tokens to at most 7,"
        " which it can pay for now"
    )
    assert response.headers.getRawHeaders("x-should-retry") == ["false"]
    assert response.headers.getRawHeaders("retry-after") is None  # waiting helps nothing
    assert h.agents["primary"].requests == []


def test_spend_json_says_a_key_is_short_when_what_is_left_does_not_pay_for_its_last_request():
    h = harness("budget_usd = 0.0015\nbudget_period = day")
    answer_whole(h, chat(h), done=3)  # 52.5 micro-dollars spent, 1,447.5 left
    alice = body_of(result_of(h.request("GET", "/spend.json")))["keys"]["alice"]
    assert alice["next_request_usd"] == pytest.approx(0.0010225) and alice["short"] is False
    answer_whole(h, chat(h), done=50)  # 522.5 more: 925 left, less than the next 1,022.5
    alice = body_of(result_of(h.request("GET", "/spend.json")))["keys"]["alice"]
    assert alice["short"] is True and alice["remaining_usd"] == pytest.approx(0.000925)


def answer_whole(h, d, done: int = 100):
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=done)))
    h.flush()
    result_of(treq.content(result_of(d)))


def test_a_budget_spent_too_far_for_the_request_says_when_it_renews_and_the_max_tokens_that_fits():
    h = harness("budget_usd = 0.002\nbudget_period = day")
    answer_whole(h, chat(h))  # 1,022.5 micro-dollars spent
    response = result_of(chat(h))
    message = error_of(response)["message"]
    assert "more than the key 'alice' has left of its budget ($0.0009775); it renews in 86400 s" in message
    assert message.endswith("set max_tokens to at most 95, which it can pay for now")  # (977.5 - 22.5) / 10
    assert response.headers.getRawHeaders("retry-after") == ["86400"]
    assert response.headers.getRawHeaders("x-should-retry") == ["false"]


def test_a_budget_held_by_a_request_in_flight_says_retry_in_a_second():
    h = harness("budget_usd = 0.0015\nbudget_period = day")
    first = chat(h)  # in flight, 1,022.5 reserved
    response = result_of(chat(h))
    assert error_of(response)["type"] == "budget_exceeded"
    assert "its requests in flight hold the rest until they settle; retry in 1 s" in error_of(response)["message"]
    assert response.headers.getRawHeaders("retry-after") == ["1"]
    assert response.headers.getRawHeaders("x-should-retry") is None  # the SDK's own retry helps
    answer_whole(h, first, done=3)
    chat(h)  # settled at 52.5: it fits, and goes to the backend
    assert len(h.agents["primary"].requests) == 2


def test_tokens_held_by_a_request_in_flight_say_retry_in_a_second():
    h = Harness(INI.format(alice="").replace("tokens_per_minute = 2000", "tokens_per_minute = 200"))
    first = chat(h)
    response = result_of(chat(h))
    assert error_of(response)["type"] == "tokens_exceeded" and "requests in flight hold the rest" in error_of(response)["message"]
    assert response.headers.getRawHeaders("retry-after") == ["1"]
    answer_whole(h, first, done=3)
    chat(h)
    assert len(h.agents["primary"].requests) == 2


def test_when_short_cap_lowers_max_tokens_to_what_the_budget_pays_for_and_says_so():
    h = harness("budget_usd = 0.0005\nbudget_period = day").__class__(
        INI.format(alice="budget_usd = 0.0005\nbudget_period = day") + "[budgets]\nwhen_short = cap\n")
    d = chat(h)
    sent = json.loads(h.agents["primary"].last.body)
    assert sent["max_tokens"] == 47  # (500 - 22.5) / 10 micro-dollars
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=47)))
    h.flush()
    response = result_of(d)
    assert response.code == 200 and response.headers.getRawHeaders("x-gateway-capped-max-tokens") == ["47"]
    result_of(treq.content(response))
    # What is left now pays for fewer than 16 tokens: refused as before.
    refused = result_of(chat(h))
    assert refused.code == 429 and error_of(refused)["type"] == "budget_exceeded"


def test_a_call_capped_by_its_budget_is_never_kept_by_the_response_cache():
    ini = INI.format(alice="budget_usd = 0.0005\nbudget_period = day").replace(
        "url = http://primary.test/v1\nretries = 0", "url = http://primary.test/v1\nretries = 0\ncache = memory\ncache_methods = POST")
    h = Harness(ini + "[budgets]\nwhen_short = cap\n")
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, {**JSON, b"cache-control": b"max-age=60"}, completion("gpt-4o", prompt=9, done=3)))
    h.flush()
    response = result_of(d)
    result_of(treq.content(response))
    assert response.headers.getRawHeaders("x-gateway-capped-max-tokens") == ["47"]
    # The same request again goes to the backend (capped anew to what is left): the capped answer was not kept.
    chat(h)
    assert len(h.agents["primary"].requests) == 2


def test_when_short_cap_sets_the_field_a_translated_call_is_sent_in():
    h = Harness(INI.format(alice="budget_usd = 0.0005\nbudget_period = day").replace(
        "url = http://primary.test/v1\nretries = 0", "url = http://primary.test/v1\napi = anthropic\nretries = 0")
        + "[budgets]\nwhen_short = cap\n")
    chat(h)
    sent = json.loads(h.agents["primary"].last.body)
    assert sent["max_tokens"] == 47 and "messages" in sent


def test_max_parallel_refuses_the_second_call_in_flight():
    h = harness()
    first = chat(h, key="bob-secret", model="o1")
    second = result_of(chat(h, key="bob-secret", model="o1"))
    assert second.code == 429 and error_of(second)["type"] == "too_many_parallel"
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("o1")))
    h.flush()
    result_of(treq.content(result_of(first)))
    third = chat(h, key="bob-secret", model="o1")
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("o1")))
    h.flush()
    assert result_of(third).code == 200


def test_a_model_the_key_may_not_call_is_forbidden_and_not_listed():
    h = harness()
    response = result_of(chat(h, model="o1"))
    assert response.code == 403 and error_of(response)["type"] == "model_not_allowed"
    listed = result_of(h.request("GET", "/v1/models", headers={"Authorization": "Bearer alice-secret"}))
    assert [m["id"] for m in json.loads(result_of(treq.content(listed)))["data"]] == ["gpt-4o"]
    everything = result_of(h.request("GET", "/v1/models", headers={"Authorization": "Bearer bob-secret"}))
    assert [m["id"] for m in json.loads(result_of(treq.content(everything)))["data"]] == ["gpt-4o", "o1"]


def test_a_service_the_key_may_not_call_is_forbidden_and_requests_per_minute_apply_elsewhere():
    h = harness()
    forbidden = result_of(h.request("GET", "/api/primary/x", headers={"Authorization": "Bearer alice-secret"}))
    assert forbidden.code == 403 and error_of(forbidden)["type"] == "service_not_allowed"
    d = h.request("GET", "/api/files/x", headers={"Authorization": "Bearer alice-secret"})
    h.agents["files"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    response = result_of(d)
    assert response.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["49"]
    assert response.headers.getRawHeaders("x-ratelimit-limit-tokens") is None  # tokens are not counted here


def test_a_stream_whose_client_leaves_settles_what_was_relayed():
    h = harness()
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk(role="assistant", content="") + chunk("one") + chunk(" two") + chunk(" three"))
    h.flush()
    response = result_of(d)
    treq.collect(response, lambda data: None)
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()
    [line] = h.access.lines
    # No usage arrived: the prompt estimate (9) and the text relayed counted by its length
    # ("one two three": 13 bytes, 5 tokens at 3 bytes a token), not one token a chunk (3).
    assert line["cost_usd"] == pytest.approx((9 * 2.5 + 5 * 10) / 1e6)
    assert h.gateway.broker.governor.store.ledger.holding == 0


def test_a_stream_settles_the_usage_its_backend_reported():
    h = harness()
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("Hi", finish="stop") + usage_chunk(20, 7) + b"data: [DONE]\n\n")
    upstream.finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    [line] = h.access.lines
    assert line["cost_usd"] == pytest.approx((20 * 2.5 + 7 * 10) / 1e6)


def test_a_backend_error_costs_nothing_and_gives_the_reservation_back():
    h = harness()
    d = chat(h, model="gpt-4o")
    h.agents["primary"].last.respond(FakeResponse(400, JSON, b'{"error":{"message":"bad"}}'))
    h.flush()
    response = result_of(d)
    assert response.code == 400
    result_of(treq.content(response))
    [line] = h.access.lines
    assert line["cost_usd"] == 0
    assert h.gateway.broker.governor.store.ledger.holding == 0


def test_a_key_without_limits_under_auth_keys_is_not_governed():
    h = Harness(GATEWAY_HEAD + "[auth]\nkeys = plain:secret\n[service:primary]\nurl = http://primary.test\n")
    assert h.gateway.broker.governor is None


# -- configuration


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[key:x]\nteam = nobody\nsecret = s\n", "[key:x] team: no [team:nobody] section"),
        ("[key:x]\n", "[key:x] secret: give secret or secret_sha256"),
        ("[key:x]\nsecret = s\nsecret_sha256 = ab\n", "[key:x] secret: give secret or secret_sha256"),
        ("[key:x]\nsecret_sha256 = abc\n", "[key:x] secret_sha256: expected the SHA-256 digest"),
        ("[key:x]\nsecret = s\ntokens_per_minute = -1\n", "[key:x] tokens_per_minute: expected a whole number of at least 1"),
        ("[key:x]\nsecret = s\nbudget_usd = lots\n", "[key:x] budget_usd: expected a number"),
        ("[key:x]\nsecret = s\nbudget_period = year\n", "[key:x] budget_period: expected one of day, week, month, total"),
        ("[key:x]\nsecret = s\nservices = nowhere\n", "[key:x] services: no service is named 'nowhere'"),
        ("[team:t]\nbudget_usd = -3\n", "[team:t] budget_usd: expected a number from 0"),
        ("[price:gpt-4o]\nprompt = free\n", "[price:gpt-4o] prompt: expected a number"),
        ("[price:gpt 4o]\nprompt = 1\n", "[price:gpt 4o]: a model name is"),
        ("[budgets]\nstore = etcd\n", "[budgets] store: expected one of sqlite, redis"),
        ("[key:x]\nsecret = s\n[key:y]\nsecret = s\n", "[key:y] secret: the same secret as key 'x'"),
        ("[key:bad name]\nsecret = s\n", "[key:bad name]: a key name is"),
    ],
)
def test_a_bad_governance_value_names_its_section_and_key(extra, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(GATEWAY_HEAD + "[service:s]\nurl = http://s.test\n" + extra, "g.ini", {})
    assert message in str(raised.value) and str(raised.value).startswith("g.ini: ")


def test_a_keys_file_in_ini_syntax_holds_keys_and_teams(tmp_path):
    keys = tmp_path / "keys.ini"
    keys.write_text("[team:ml]\nbudget_usd = 5\n[key:carol]\nsecret = c\nteam = ml\ntokens_per_minute = 10\n")
    config = parse_config(GATEWAY_HEAD + f"[service:s]\nurl = http://s.test\n[auth]\nkeys_file = {keys}\n", "g.ini", {})
    [carol] = config.auth.keys
    assert (carol.name, carol.team, carol.tokens_per_minute) == ("carol", "ml", 10)
    assert config.teams["ml"].budget_usd == 5.0 and config.governed


# -- the spend file


def settled(cost: int, model: str = "gpt-4o") -> Settled:
    return Settled("alice", "ml", 10, cost, (ModelUse(model, 6, 4, cost),))


def synchronously(f, *args):
    return maybeDeferred(f, *args)


def test_settled_spend_is_written_within_the_flush_interval_and_read_back_after_a_restart(tmp_path):
    path = str(tmp_path / "state" / "txgateway.db")
    clock = Clock()
    clock.advance(1796299200)  # 2026-12-03 midnight UTC
    budget = ScopeLimits("key:alice", budget_nano=1000, budget_period="month")
    store = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None)
    first = Ask("r1", (budget,), 0, 600, clock.seconds() + 60)
    assert result_of(store.reserve(first)).allowed
    result_of(store.settle(first, settled(600)))
    assert SpendFile(path).rows() == []
    clock.advance(FLUSH_INTERVAL)
    assert SpendFile(path).rows() == [("2026-12-03", "alice", "ml", "gpt-4o", 6, 4, 600, 1)]
    # A new gateway on the same file knows the month's spend.
    again = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None)
    assert result_of(again.reserve(Ask("r2", (budget,), 0, 401, clock.seconds() + 60))).reason == "budget_exceeded"
    assert result_of(again.reserve(Ask("r3", (budget,), 0, 400, clock.seconds() + 60))).allowed
    result_of(store.close())
    result_of(again.close())


def test_stopping_flushes_what_is_not_yet_written(tmp_path):
    path = str(tmp_path / "spend.db")
    clock = Clock()
    store = LocalLedgerStore(clock, SpendFile(path), synchronously, log=None)
    ask = Ask("r1", (ScopeLimits("key:alice"),), 0, 5, 60.0)
    result_of(store.reserve(ask))
    result_of(store.settle(ask, settled(5)))
    result_of(store.close())
    assert [row[6] for row in SpendFile(path).rows()] == [5]


def test_a_failed_write_is_kept_for_the_next_one(tmp_path):
    path = str(tmp_path / "spend.db")
    clock = Clock()
    attempts = []

    def failing_once(f, *args):
        attempts.append(f)
        if len(attempts) == 1:
            return maybeDeferred(lambda: 1 / 0)
        return maybeDeferred(f, *args)

    log = type("Log", (), {
        "errors": [], "error": lambda self, event, **kw: self.errors.append(event), "warning": lambda self, event, **kw: None,
    })()
    store = LocalLedgerStore(clock, SpendFile(path), failing_once, log)
    ask = Ask("r1", (ScopeLimits("key:alice"),), 0, 5, 60.0)
    result_of(store.reserve(ask))
    result_of(store.settle(ask, settled(5)))
    clock.advance(FLUSH_INTERVAL)
    assert log.errors == ["budgets_write_failed"] and SpendFile(path).rows() == []
    clock.advance(FLUSH_INTERVAL)
    assert [row[6] for row in SpendFile(path).rows()] == [5]
    result_of(store.close())
    assert store.description["unwritten_rows"] == 0 and len(log.errors) == 1  # written once, not twice


# -- what the operator sees


def body_of(response) -> dict:
    return json.loads(result_of(treq.content(response)))


def test_spend_json_shows_each_key_and_team_and_spend_per_model_per_day():
    h = harness("budget_usd = 1\nbudget_period = day")
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=3)))
    h.flush()
    result_of(treq.content(result_of(d)))
    spend = body_of(result_of(h.request("GET", "/spend.json")))
    alice = spend["keys"]["alice"]
    cost = (9 * 2.5 + 3 * 10) / 1e6
    assert alice["spent_usd"] == pytest.approx(cost) and alice["reserved_usd"] == 0
    assert alice["remaining_usd"] == pytest.approx(1 - cost) and alice["period"] == "d1970-01-01"
    assert alice["tokens_per_minute"] == {"limit": 2000, "remaining": 1988, "used": 12, "reset_s": 60.0}
    assert spend["teams"]["ml"]["spent_usd"] == pytest.approx(cost)
    assert spend["models_by_day"] == [
        {"day": "1970-01-01", "model": "gpt-4o", "prompt_tokens": 9, "completion_tokens": 3, "cost_usd": pytest.approx(cost), "requests": 1}
    ]
    status = body_of(result_of(h.request("GET", "/status.json")))
    assert status["governance"]["tokens_per_second"]["gpt-4o"][-1] == 12
    assert {"name": "budgets", "backend": "memory", "healthy": True} in status["stores"]
    assert body_of(result_of(h.request("GET", "/health")))["budgets"]["healthy"] is True


def test_spend_json_is_not_served_when_no_key_is_governed():
    h = Harness(GATEWAY_HEAD + "[service:primary]\nurl = http://primary.test\n")
    assert result_of(h.request("GET", "/spend.json")).code == 404


def test_refusals_are_counted_for_the_status_page():
    h = harness()
    result_of(chat(h, model="o1"))
    status = body_of(result_of(h.request("GET", "/status.json")))
    assert status["governance"]["refusals_last_minute"] == 1


def test_a_cache_hit_costs_nothing():
    h = Harness(GATEWAY_HEAD + """
[service:cached]
url = http://cached.test/v1
api = openai
cache = memory
cache_methods = POST
[model:gpt-4o]
targets = cached
[key:alice]
secret = alice-secret
tokens_per_minute = 2000
[price:*]
prompt = 1
completion = 1
""")
    first = chat(h)
    h.agents["cached"].last.respond(FakeResponse(200, {**JSON, b"cache-control": b"max-age=60"}, completion("gpt-4o", prompt=9, done=3)))
    h.flush()
    result_of(treq.content(result_of(first)))
    second = result_of(chat(h))
    result_of(treq.content(second))
    assert len(h.agents["cached"].requests) == 1
    paid, hit = h.access.lines
    assert paid["cost_usd"] == pytest.approx(12e-6) and hit["cache"] == "hit" and hit["cost_usd"] == 0
    # The hit's reservation came back whole: 2000 less the first call's 12 tokens.
    assert second.headers.getRawHeaders("x-ratelimit-remaining-tokens") == [str(2000 - 12 - RESERVED)]


def test_a_model_with_no_price_costs_nothing_and_says_so_once():
    import structlog.testing

    with structlog.testing.capture_logs() as logs:
        h = Harness(INI.format(alice="").replace("[price:gpt-4o-mini]\nprompt = 0.15\ncompletion = 0.6\n", ""))
        for _ in range(3):
            d = chat(h, key="bob-secret")
            h.agents["primary"].last.respond(FakeResponse(503, JSON, b'{"error":"busy"}'))
            h.flush()
            h.agents["cheap"].last.respond(FakeResponse(200, JSON, completion("gpt-4o-mini", prompt=9, done=3)))
            h.flush()
            result_of(treq.content(result_of(d)))
    assert [entry["model"] for entry in logs if entry["event"] == "model_unpriced"] == ["gpt-4o-mini"]
    assert [line["cost_usd"] for line in h.access.lines] == [0, 0, 0]


def test_a_spend_file_that_stays_unwritable_is_said_once_and_makes_the_store_unhealthy_until_it_writes(tmp_path):
    path = str(tmp_path / "spend.db")
    clock = Clock()
    broken = {"on": True}

    def writes(f, *args):
        return maybeDeferred(lambda: 1 / 0) if broken["on"] else maybeDeferred(f, *args)

    log = type("Log", (), {
        "lines": [], "error": lambda self, event, **kw: self.lines.append(event),
        "warning": lambda self, event, **kw: self.lines.append(event),
    })()
    store = LocalLedgerStore(clock, SpendFile(path), writes, log)
    for n in range(3):
        ask = Ask(f"r{n}", (ScopeLimits("key:alice"),), 0, 5, 60.0)
        result_of(store.reserve(ask))
        result_of(store.settle(ask, settled(5)))
        clock.advance(FLUSH_INTERVAL)
    assert log.lines == ["budgets_write_failed"]
    assert store.description["healthy"] is False and "division" in store.description["write_failure"]
    broken["on"] = False
    clock.advance(FLUSH_INTERVAL)
    assert log.lines == ["budgets_write_failed", "budgets_write_recovered"]
    assert store.description["healthy"] is True and [row[6] for row in SpendFile(path).rows()] == [15]
    result_of(store.close())


def test_a_settle_counts_only_whole_numbers_within_the_ledgers_bounds():
    # Whatever the uses a settle is handed say (a float, a negative, more than any ledger holds),
    # the store is given whole numbers within bounds; uses already so are passed on as they are.
    import hashlib

    import structlog

    from txgateway.config.keys import ApiKey
    from txgateway.governance.estimate import Prices
    from txgateway.governance.governor import Governor, Reservation
    from txgateway.governance.ledger import NANO_BOUND, TOKENS_BOUND
    from txgateway.observability.context import CompletionFacts, RequestContext
    from txgateway.observability.metrics import GatewayMetrics

    clock = Clock()
    store = LocalLedgerStore(clock, None, maybeDeferred, structlog.get_logger("test"))
    settled = []
    store.settle = lambda ask, what: settled.append(what) or maybeDeferred(lambda: None)
    key = ApiKey("k", hashlib.sha256(b"k").digest(), budget_usd=10.0)
    governor = Governor(clock, store, [key], {}, Prices({}), lambda model: 100, GatewayMetrics(clock), structlog.get_logger("test"))
    ask = Ask("r1", (ScopeLimits("key:k"),), 10, 10, 60.0)
    reservation = Reservation(governor, ask, key, None, 0, 0)
    ctx = RequestContext("r1", "127.0.0.1", 0.0, structlog.get_logger("test"), completion=CompletionFacts())
    honest = ModelUse("a", 3, 4, 5)
    uses = [honest, ModelUse("b", 12.0, 4, 5.0), ModelUse("c", 2**70, -5, 10**20), ModelUse("d", 1, 7.5, -1)]
    governor.settle(reservation, ctx, uses)
    (what,) = settled
    assert what.models[0] is honest
    assert [(use.prompt_tokens, use.completion_tokens, use.cost_nano) for use in what.models[1:]] == [
        (12, 4, 5), (TOKENS_BOUND, 0, NANO_BOUND), (1, 8, 0),
    ]
    assert all(type(n) is int for use in what.models for n in (use.prompt_tokens, use.completion_tokens, use.cost_nano))
    assert (what.tokens, what.cost_nano) == (3 + 4 + 12 + 4 + TOKENS_BOUND + 1 + 8, 5 + 5 + NANO_BOUND)
