"""
Governed keys through the running daemon, against the fake OpenAI
backend process (which reports usage), a real redis-server shared by two
gateways, SQLite state files, and the official C{openai} client: exact
admission under 200 parallel requests, budgets, a client that leaves, a
gateway killed mid-stream, restarts, and Redis stopped under traffic.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, Process, request, wait_until
from tests.integration.test_openai_sdk import OpenAIBackend
from tests.integration.test_redis import RedisServer, redis_server_binary

pytestmark = pytest.mark.integration

KEY = "team-key-secret"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
# "hi" and "user": 6 bytes -> 2 tokens, one message -> 4, plus max_tokens 100.
RESERVED = 106


@pytest.fixture
def backend(tmp_path):
    server = OpenAIBackend(tmp_path)
    yield server
    server.process.stop()


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def governed(url: str, key: str = "", budgets: str = "", deadline: float = 30) -> str:
    """A gateway.ini with one service, the models the tests call, one key (C{key}: its limits)."""
    return DAEMON_HEAD.replace("[ratelimit]", f"[budgets]\n{budgets}\nreservation_margin = 1\n[ratelimit]") + f"""
[service:cloud]
url = {url}
retries = 0
timeout = 10
idle_timeout = 10
deadline = {deadline}
[model:plain]
targets = cloud:plain-model
[model:slow]
targets = cloud:slow
[model:drip]
targets = cloud:drip
[price:*]
prompt = 1
completion = 1
[key:team]
secret = {KEY}
{key}
"""


def redis_budgets(redis_url: str) -> str:
    return f"store = redis\nredis_url = {redis_url}\nredis_timeout = 0.3"


def chat_body(model: str = "slow", stream: bool = True, max_tokens: int = 100) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def call(port: int, model: str = "slow", stream: bool = True) -> tuple[int, str | None]:
    """One request through the gateway read to its end: its status and, when refused, the error type."""
    answer = request(port, "POST", "/v1/chat/completions", body=chat_body(model, stream), headers=HEADERS, timeout=30)
    return answer.status, answer.error["type"] if answer.status >= 400 else None


def in_parallel(ports: list[int], count: int, model: str = "slow") -> list[tuple[int, str | None]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda n: call(ports[n % len(ports)], model), range(count)))


def spend(gateway) -> dict:
    answer = gateway.request("GET", "/spend.json")
    assert answer.status == 200, answer.body
    return answer.json()


def test_200_parallel_requests_on_one_gateway_admit_exactly_the_25_that_fit(start_gateway, backend):
    gateway = start_gateway(governed(backend.url, f"tokens_per_minute = {25 * RESERVED}"))
    outcomes = in_parallel([gateway.port], 200)
    assert outcomes.count((200, None)) == 25
    assert outcomes.count((429, "tokens_exceeded")) == 175
    assert (gateway.workdir / "state" / "txgateway.db").exists()  # beside the log directory


def test_200_parallel_requests_through_two_gateways_sharing_redis_admit_exactly_25(start_gateway, backend, redis):
    ini = governed(backend.url, f"tokens_per_minute = {25 * RESERVED}", redis_budgets(redis.url))
    first, second = start_gateway(ini), start_gateway(ini)
    outcomes = in_parallel([first.port, second.port], 200)
    assert outcomes.count((200, None)) == 25
    assert outcomes.count((429, "tokens_exceeded")) == 175


def test_a_dollar_budget_through_two_gateways_sharing_redis_admits_exactly_25(start_gateway, backend, redis):
    # At $1 a million tokens a reservation of 106 tokens costs $0.000106.
    ini = governed(backend.url, f"budget_usd = {25 * RESERVED / 1e6}\nbudget_period = day", redis_budgets(redis.url))
    first, second = start_gateway(ini), start_gateway(ini)
    outcomes = in_parallel([first.port, second.port], 200)
    assert outcomes.count((200, None)) == 25
    assert outcomes.count((429, "budget_exceeded")) == 175


def user_call(port: int, user: str) -> tuple[str, int, str | None]:
    """One slow stream for end user C{user}: who, its status and, when refused, the error type."""
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                       "stream": True, "user": user}).encode()
    answer = request(port, "POST", "/v1/chat/completions", body=body, headers=HEADERS, timeout=30)
    return user, answer.status, answer.error["type"] if answer.status >= 400 else None


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest.mark.parametrize("limit, each, refusal", [
    (f"user_tokens_per_minute = {2 * RESERVED}", 2, "tokens_exceeded"),
    # At $1 a million tokens a reservation of 106 tokens costs $0.000106.
    (f"user_budget_usd = {3 * RESERVED / 1e6}\nbudget_period = day", 3, "budget_exceeded"),
])
def test_200_parallel_calls_of_10_end_users_on_one_key_admit_exactly_each_ones_allowance(
    start_gateway, backend, redis, store, limit, each, refusal,
):
    budgets = redis_budgets(redis.url) if store == "redis" else ""
    ini = governed(backend.url, f"tokens_per_minute = 1000000\n{limit}", budgets)
    # Redis: two gateways sharing it; SQLite: one daemon, its workers sharing the supervisor's ledger.
    gateways = [start_gateway(ini), start_gateway(ini)] if store == "redis" else [start_gateway(ini)]
    users = [f"user-{number}" for number in range(10)]
    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(lambda n: user_call(gateways[n % len(gateways)].port, users[n % 10]), range(200)))
    for user in users:
        mine = [(status, error) for who, status, error in outcomes if who == user]
        assert mine.count((200, None)) == each, (user, mine)
        assert mine.count((429, refusal)) == 20 - each, (user, mine)
    # Each end user's spend is kept apart, on whichever gateway settled it.
    wait_until(lambda: len(spend(gateways[0])["end_users"]) == 10)
    report = spend(gateways[-1])
    assert sorted((row["end_user"], row["requests"]) for row in report["end_users"]) == [(user, each) for user in users]
    assert report["keys"]["team"]["per_end_user"]["tokens_per_minute" if each == 2 else "budget_usd"] is not None
    one = gateways[0].request("GET", "/spend.json?key=team&end_user=user-3").json()["end_user"]
    assert one["end_user"] == "user-3" and one["reserved_usd"] == 0 and one["in_flight"] == 0


def test_an_exhausted_budget_reaches_the_gateway_once_through_the_official_sdk(start_gateway, backend):
    gateway = start_gateway(governed(backend.url, "budget_usd = 0.00001\nbudget_period = month"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=KEY, timeout=10)  # retries left on
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.body["type"] == "budget_exceeded"
    time.sleep(0.5)  # a retry, if the SDK made one, would be logged by now
    refused = [line for line in gateway.log_lines() if line.get("event") == "request_completed" and line.get("outcome") == "budget_exceeded"]
    assert len(refused) == 1 and backend.calls() == {}


@pytest.mark.parametrize("limit, refusal", [
    ("budget_usd = 0.00015\nbudget_period = day", "budget_exceeded"),  # 106 reserved each, at $1 a million tokens
    ("tokens_per_minute = 150", "tokens_exceeded"),
])
def test_a_limit_held_by_a_request_in_flight_is_retried_by_the_official_sdk_within_2_s(start_gateway, backend, limit, refusal):
    gateway = start_gateway(governed(backend.url, limit))
    # A stream in flight holds 106 of the 150: a second call's 106 does not fit until it settles.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=chat_body("drip"), headers=HEADERS)
    response = connection.getresponse()
    response.fp.readline()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=KEY, max_retries=2)
    leaving = threading.Timer(0.3, lambda: (connection.sock.shutdown(socket.SHUT_RDWR), connection.close()))
    leaving.start()  # the stream's client leaves: it settles the few tokens it relayed
    started = time.monotonic()
    answer = client.chat.completions.with_raw_response.create(
        model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=100,
    )
    took = time.monotonic() - started
    assert answer.http_response.status_code == 200 and took < 2.0, took

    def outcomes() -> list:
        return [line.get("outcome") for line in gateway.log_lines()
                if line.get("event") == "request_completed" and line.get("requested_model") == "plain"]

    wait_until(lambda: len(outcomes()) == 2)  # refused once, then answered: the SDK's one retry
    assert outcomes()[0] == refusal and outcomes()[1] != refusal, outcomes()


def test_a_request_dearer_than_the_whole_budget_is_not_retried_and_says_what_fits(start_gateway, backend):
    gateway = start_gateway(governed(backend.url, "budget_usd = 0.00005\nbudget_period = day"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=KEY, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert time.monotonic() - started < 1.0
    assert "retry-after" not in raised.value.response.headers
    message = raised.value.body["message"]
    assert "more than the whole budget of the key 'team' ($0.00005 a day)" in message
    assert message.endswith("set max_tokens to at most 44, which it can pay for now")  # 50 - 6 for the prompt


def test_a_stream_whose_client_leaves_after_3_chunks_settles_what_was_relayed(start_gateway, backend):
    gateway = start_gateway(governed(backend.url, "tokens_per_minute = 100000"))
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=chat_body("drip"), headers=HEADERS)
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 4:  # the role chunk, then 3 words
        if response.fp.readline().startswith(b"data: "):
            events += 1
    request_id = response.headers["X-Request-ID"]
    connection.sock.shutdown(socket.SHUT_RDWR)  # the response's file holds the socket open: shut it
    connection.close()
    [line] = [e for e in gateway.story(request_id) if e["event"] in ("request_completed", "request_aborted")]
    relayed = round(line["cost_usd"] * 1e6) - 6  # at $1 a million, less the prompt's estimate of 6
    assert 3 <= relayed <= 6, line
    assert line["prompt_tokens"] is None  # no usage arrived: what was relayed is what was settled


def test_a_gateway_killed_mid_stream_leaves_a_reservation_that_lapses(start_gateway, backend, redis):
    ini = governed(backend.url, f"tokens_per_minute = {RESERVED}", redis_budgets(redis.url), deadline=2)
    doomed, survivor = start_gateway(ini), start_gateway(ini)
    connection = http.client.HTTPConnection("127.0.0.1", doomed.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=chat_body("slow"), headers=HEADERS)
    wait_until(lambda: backend.calls().get("slow", {}).get("count", 0) == 1)
    doomed.process.proc.send_signal(signal.SIGKILL)
    doomed.process.proc.wait()
    assert call(survivor.port) == (429, "tokens_exceeded")  # the dead gateway's reservation still holds
    time.sleep(2 + 1 + 0.2)  # its deadline and reservation_margin later it lapses
    assert call(survivor.port, "plain") == (200, None)
    connection.close()


def spent_of(gateway) -> float:
    return spend(gateway)["keys"]["team"]["spent_usd"]


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_spend_is_carried_over_a_restart_exactly(start_gateway, backend, redis, tmp_path, store):
    budgets = redis_budgets(redis.url) if store == "redis" else f"state_file = {tmp_path / 'spend.db'}"
    ini = governed(backend.url, "budget_usd = 10", budgets)
    gateway = start_gateway(ini)
    for _ in range(5):
        assert call(gateway.port, "plain", stream=False) == (200, None)
    wait_until(lambda: spent_of(gateway) > 0)
    before = spend(gateway)
    gateway.stop()
    gateway.logged("gateway_stopped")  # a clean stop: what was settled is flushed
    again = start_gateway(ini)
    after = spend(again)
    assert after["keys"]["team"]["spent_usd"] == before["keys"]["team"]["spent_usd"] == pytest.approx(5 * 61e-6)
    assert after["models_by_day"] == before["models_by_day"]
    if store == "sqlite":
        [(requests,)] = sqlite3.connect(tmp_path / "spend.db").execute("SELECT SUM(requests) FROM spend").fetchall()
        assert requests == 5


def test_a_gateway_killed_outright_loses_at_most_the_last_flush_of_spend(start_gateway, backend, tmp_path):
    ini = governed(backend.url, "budget_usd = 10", f"state_file = {tmp_path / 'spend.db'}")
    gateway = start_gateway(ini)
    for _ in range(3):
        assert call(gateway.port, "plain", stream=False) == (200, None)
    time.sleep(0.5)  # more than the 0.2 s flush interval
    gateway.process.proc.send_signal(signal.SIGKILL)
    gateway.process.proc.wait()
    [(requests,)] = sqlite3.connect(tmp_path / "spend.db").execute("SELECT SUM(requests) FROM spend").fetchall()
    assert requests == 3


class AofRedis(RedisServer):
    """A redis-server that keeps what it was told across a restart (AOF, as the README advises)."""

    def start(self) -> None:
        self.process = Process(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--dir", str(self.workdir)],
            self.workdir,
        )
        self.process.wait_for(lambda line: "Ready to accept connections" in line)


@pytest.mark.parametrize("outage", ["stopped", "killed"])
def test_redis_away_under_traffic_costs_no_client_an_error_and_loses_no_spend(start_gateway, backend, tmp_path, outage):
    redis = AofRedis(tmp_path)
    try:
        ini = governed(backend.url, "budget_usd = 10\ntokens_per_minute = 10000000", redis_budgets(redis.url))
        gateway = start_gateway(ini)
        answered: list[tuple[int, float]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                started = time.monotonic()
                status, _ = call(gateway.port, "plain", stream=False)
                answered.append((status, time.monotonic() - started))

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(0.5)
        if outage == "stopped":
            redis.process.proc.send_signal(signal.SIGSTOP)
        else:
            redis.stop()
        time.sleep(3)
        health = gateway.request("GET", "/health").json()
        if outage == "stopped":
            redis.process.proc.send_signal(signal.SIGCONT)
        else:
            redis.start()
        time.sleep(1.5)
        stop.set()
        worker.join()
        assert health["budgets"]["serving_from"] == "memory" and health["status"] == "degraded"
        assert {status for status, _ in answered} == {200} and len(answered) > 20
        assert max(seconds for _, seconds in answered) < 0.3 + 0.7  # redis_timeout plus the request's own time
        wait_until(lambda: gateway.request("GET", "/health").json()["budgets"] == {
            "backend": "redis", "healthy": True, "serving_from": "redis", "journal": 0})
        # Every request settled 1 + 60 tokens at $1 a million: Redis has every one of them, once.
        assert spent_of(gateway) == pytest.approx(len(answered) * 61e-6)
        gateway.logged("budgets_redis_recovered")  # the log writer may not have written it yet
        events = [e["event"] for e in gateway.log_lines() if e.get("event", "").startswith("budgets_redis")]
        assert events == ["budgets_redis_unavailable", "budgets_redis_recovered"]
    finally:
        if redis.process.proc.poll() is None:
            redis.process.proc.send_signal(signal.SIGCONT)
            redis.stop()


def test_a_keys_file_in_ini_syntax_is_read_again_on_sighup(start_gateway, backend, tmp_path):
    keys = tmp_path / "keys.ini"
    keys.write_text("[team:t]\ntokens_per_minute = 100000\n[key:first]\nsecret = first-secret\nteam = t\n")
    ini = governed(backend.url).replace("[key:team]", f"[auth]\nkeys_file = {keys}\n[key:team]")
    gateway = start_gateway(ini)
    body = chat_body("plain", stream=False)
    second = {"Content-Type": "application/json", "Authorization": "Bearer second-secret"}
    assert request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=second).status == 401
    keys.write_text(keys.read_text() + "[key:second]\nsecret = second-secret\nmodels = plain\n")
    gateway.process.proc.send_signal(signal.SIGHUP)
    gateway.logged("config_reloaded")
    answer = request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=second)
    assert answer.status == 200
    refused = request(gateway.port, "POST", "/v1/chat/completions", body=chat_body("slow", stream=False), headers=second)
    assert refused.status == 403 and refused.error["type"] == "model_not_allowed"
    keys.write_text("[key:broken]\nsecret = x\nbudget_usd = lots\n")
    gateway.process.proc.send_signal(signal.SIGHUP)
    [line] = gateway.logged("config_reload_rejected")
    assert "[key:broken] budget_usd: expected a number" in line["reason"] and str(keys) in line["reason"]
    assert request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=second).status == 200


def _twenty_calls(gateway, body: bytes) -> dict:
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(
            lambda _: request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=HEADERS, timeout=30).status,
            range(20),
        ))
    assert statuses == [200] * 20
    return spend(gateway)["keys"]["team"]["tokens_per_minute"]


def test_streams_of_a_backend_ignoring_max_tokens_are_cut_and_spend_no_more_than_they_reserved(start_gateway, backend):
    # max_tokens 10 reserves 6 + 10 = 16 tokens; the fake backend ignores it and would write 60.
    gateway = start_gateway(governed(backend.url, f"tokens_per_minute = {20 * 16}"))
    body = chat_body("slow", stream=True, max_tokens=10)
    tokens = _twenty_calls(gateway, body)
    # Each stream cut at its bound and settled at it: the minute is full, not overspent.
    assert tokens["used"] == 20 * 16 and tokens["remaining"] == 0
    refused = request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=HEADERS)
    assert refused.status == 429 and refused.error["type"] == "tokens_exceeded"
    assert 50 <= int(refused.headers["Retry-After"]) <= 60
