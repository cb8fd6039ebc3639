"""
The official C{openai} client through the running daemon, against a fake
OpenAI-compatible backend process (tests/openai_backend.py) that fails on
purpose in every way the gateway must survive.
"""

from __future__ import annotations

import time

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend, request, wait_until

pytestmark = pytest.mark.integration

FULL = "".join(f"w{i} " for i in range(1, 61))


class OpenAIBackend(Backend):
    def __init__(self, tmp) -> None:
        super().__init__(tmp, script="openai_backend.py", base_path="/v1")

    def flap(self, state: str) -> None:
        request(self.port, "POST", f"/v1/control/flap/{state}", body=b"")


@pytest.fixture
def backend(tmp_path):
    server = OpenAIBackend(tmp_path)
    yield server
    server.process.stop()


def ini(url: str) -> str:
    common = "timeout = 2\nretry_delay = 0.05\nfirst_token_timeout = 1\nidle_timeout = 1\nbreaker_threshold = 2\nbreaker_cooldown = 1\n"
    return DAEMON_HEAD + f"""[auth]
keys = sdk:gateway-key
[service:cloud]
url = {url}
api_key = sk-cloud-secret
resume = prefill
retries = 1
{common}
[service:cloudonce]
url = {url}
api_key = sk-cloud-secret
retries = 0
{common}
[service:strict]
url = {url}
resume = prefill
retries = 0
{common}
[service:local]
url = {url}
api_key_env = LOCAL_KEY
resume = prefill
retries = 0
{common}
[model:chat]
targets = cloud:plain-model
[model:cut]
targets = cloud:cut40, local:local-model
[model:reset]
targets = cloud:reset, local:local-model
[model:busy]
targets = cloud:status-503, local:local-model
[model:limited]
targets = cloud:status-429, local:local-model
[model:hang]
targets = cloud:hang, local:local-model
[model:slow]
targets = cloud:slow, local:local-model
[model:stall]
targets = cloud:stall, local:local-model
[model:malformed]
targets = cloud:malformed, local:local-model
[model:nodone]
targets = cloud:nodone
[model:long]
targets = cloud:context, local:local-model
[model:filtered]
targets = cloud:filter, local:local-model
[model:picky]
targets = cloudonce:cut40, strict:noprefill, local:local-model
[model:flappy]
targets = cloudonce:flap, local:local-model
"""


@pytest.fixture
def gateway(start_gateway, backend):
    return start_gateway(ini(backend.url), env={"LOCAL_KEY": "sk-local-secret"})


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="gateway-key", max_retries=0, timeout=20)


def streamed(client, model: str, **options) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to sixty"}], stream=True, **options
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def access_line(gateway, request_id: str) -> dict:
    [line] = [e for e in gateway.story(request_id) if e["event"] in ("request_completed", "request_aborted")]
    return line


def test_a_plain_completion_with_usage_and_the_backend_key(client, gateway, backend):
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi there"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == FULL
    assert answer.model == "plain-model" and answer.usage.completion_tokens == 60
    assert raw.headers["x-gateway-service"] == "cloud"
    assert backend.calls()["plain-model"]["authorization"] == "Bearer sk-cloud-secret"
    line = access_line(gateway, raw.headers["x-request-id"])
    assert (line["model"], line["prompt_tokens"], line["completion_tokens"]) == ("plain-model", 2, 60)
    metrics = gateway.request("GET", "/metrics").body.decode()
    assert 'txgateway_tokens_total{kind="completion",model="plain-model",service="cloud"} 60.0' in metrics
    assert "sk-cloud-secret" not in gateway.log_file.read_text()
    assert "sk-cloud-secret" not in gateway.request("GET", "/health").body.decode()


def test_models_are_listed_for_the_sdk(client):
    ids = [model.id for model in client.models.list()]
    assert ids[:3] == ["chat", "cut", "reset"] and "flappy" in ids


def test_a_stream_cut_after_40_of_60_words_is_resumed_to_the_full_text(client, gateway, backend):
    text, chunks = streamed(client, "cut")
    assert text == FULL
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert not any(c.usage for c in chunks)  # the client did not ask for usage
    calls = backend.calls()["cut40"]
    assert (calls["count"], calls["prefills"], calls["authorization"]) == (2, 1, "Bearer sk-cloud-secret")
    # Without [tracing], both attempts carry the gateway's span as the parent.
    first, second = calls["traceparents"]
    assert first == second and first.startswith("00-")
    [line] = gateway.logged("request_completed", requested_model="cut")
    assert line["resumed"] == 1 and line["resumed_on"] == ["cloud:cut40"] and line["status"] == 200
    assert line["completion_tokens"] == 20  # the cut stream sent no usage; the resume's 20 words


def test_a_fallback_that_rejects_prefill_is_skipped_for_the_next(client, gateway, backend):
    text, chunks = streamed(client, "picky", stream_options={"include_usage": True})
    assert text == FULL
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    calls = backend.calls()
    assert calls["noprefill"]["prefills"] == 1 and calls["local-model"]["prefills"] == 1
    assert calls["local-model"]["authorization"] == "Bearer sk-local-secret"
    [line] = gateway.logged("request_completed", requested_model="picky")
    assert line["resumed_on"] == ["local:local-model"] and line["model"] == "local-model"


@pytest.mark.parametrize("model", ["reset", "busy", "hang", "slow", "limited"])
def test_a_primary_that_fails_before_its_first_token_is_served_by_the_fallback(client, gateway, model):
    text, chunks = streamed(client, model, stream_options={"include_usage": True})
    assert text == FULL
    assert {c.model for c in chunks} == {"local-model"}
    assert chunks[-1].usage.completion_tokens == 60  # the usage names the fallback's model
    [line] = gateway.logged("request_completed", requested_model=model)
    assert line["served_by"] == "local" and line["fallback_from"] == [f"cloud:{model if model not in ('busy', 'limited') else {'busy': 'status-503', 'limited': 'status-429'}[model]}"]
    assert line["model"] == "local-model"


def test_a_json_answer_from_the_fallback_names_its_model(client):
    answer = client.chat.completions.create(model="busy", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "local-model" and answer.choices[0].message.content == FULL


@pytest.mark.parametrize("model", ["stall", "malformed"])
def test_a_stream_that_stalls_or_sends_garbage_midway_is_resumed(client, gateway, model):
    text, chunks = streamed(client, model)
    assert text == FULL
    [line] = gateway.logged("request_completed", requested_model=model)
    assert line["resumed"] == 1


def test_a_stream_without_done_is_complete_at_once(client):
    started = time.monotonic()
    text, chunks = streamed(client, "nodone")
    assert text == FULL and time.monotonic() - started < 5


def test_context_length_exceeded_moves_to_the_next_target(client, backend):
    answer = client.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "local-model"
    assert backend.calls()["context"]["count"] == 1


def test_a_content_filter_refusal_is_passed_through(client, backend):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="filtered", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "content_filter"
    assert "local-model" not in backend.calls()


def test_gateway_errors_reach_the_sdk_as_its_errors(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "model_not_found"
    wrong = openai.OpenAI(base_url=client.base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])


def test_a_flapping_primary_is_covered_by_the_fallback_and_back_within_its_cooldown(client, gateway, backend):
    def served_by() -> str:
        raw = client.chat.completions.with_raw_response.create(model="flappy", messages=[{"role": "user", "content": "hi"}])
        return raw.headers["x-gateway-service"]

    assert served_by() == "cloudonce"
    backend.flap("down")
    assert [served_by() for _ in range(4)] == ["local"] * 4
    health = gateway.request("GET", "/health").json()
    assert health["models"]["flappy"]["targets"][0] == {"service": "cloudonce", "model": "flap", "circuit": "open"}
    backend.flap("up")
    # The breaker's cooldown is 1 s: a trial then finds the primary healthy.
    wait_until(lambda: served_by() == "cloudonce", timeout=5)
    assert served_by() == "cloudonce"
