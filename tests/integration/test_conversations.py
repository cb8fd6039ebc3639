"""
Conversations the gateway holds, through the running daemon with the
official C{openai} client: a Response kept (JSON and streamed, from a
native target, a chat-only one and Claude), retrieved, listed, deleted;
a conversation by C{previous_response_id} that moves to another kind of
target when its first fails; each key sees only its own; the SQLite
file across a restart; two gateways sharing a real Redis.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend, free_port, request
from tests.integration.test_redis import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend(chat_and_claude):
    return chat_and_claude[0]


@pytest.fixture(scope="module")
def claude(chat_and_claude):
    return chat_and_claude[1]


def conversations_ini(backend: Backend, claude: Backend, responses: str = "") -> str:
    """Two keys; a native target, a chat-only one, Claude, and a model whose native target is down (falls to chat)."""
    return DAEMON_HEAD + f"""[auth]
keys = alice:alice-key, bob:bob-key
[responses]
{responses}
[service:native]
url = {backend.url}
api = openai
responses = native
retries = 0
[model:agent]
targets = native:resp-model
[service:chatonly]
url = {backend.url}
api = openai
retries = 0
[model:selfhosted]
targets = chatonly:plain-model
[service:anthropic]
url = {claude.url}
api = anthropic
retries = 0
[model:claude]
targets = anthropic:claude-test
[service:down]
url = http://127.0.0.1:{free_port()}/v1
api = openai
responses = native
retries = 0
[model:failover]
targets = down:resp-model, chatonly:plain-model
[model:crlf-agent]
targets = native:resp-crlf
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, backend, claude):
    from tests.integration.conftest import Gateway

    daemon = Gateway(tmp_path_factory.mktemp("gateway"), conversations_ini(backend, claude))
    yield daemon
    daemon.stop()


def client_of(gateway, key: str = "alice-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=key, max_retries=0)


def texts(messages: list) -> list[str]:
    """The text of each chat message a backend was sent."""
    return [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"]) for m in messages]


@pytest.mark.parametrize("model", ["agent", "selfhosted", "claude"])
def test_a_kept_response_is_retrieved_listed_and_deleted_on_every_kind_of_target(gateway, model):
    client = client_of(gateway)
    made = client.responses.create(model=model, instructions="Be brief.", input="Count")
    assert made.id.startswith("resp_")
    again = client.responses.retrieve(made.id)
    assert (again.id, again.output_text) == (made.id, made.output_text)
    items = client.responses.input_items.list(made.id)
    assert [item.content[0].text for item in items.data] == ["Count"]
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


@pytest.mark.parametrize("model", ["agent", "selfhosted", "claude", "crlf-agent"])
def test_a_streamed_response_is_kept_too(gateway, model):
    client = client_of(gateway)
    with client.responses.stream(model=model, input="Count") as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_a_conversation_begun_on_a_native_target_goes_on_after_a_failover_to_a_chat_target(gateway, backend):
    client = client_of(gateway)
    first = client.responses.create(model="agent", input="Say hello")
    assert first.output_text == "Hello from the test backend."
    raw = client.responses.with_raw_response.create(model="failover", previous_response_id=first.id, input="Count")
    second = raw.parse()
    assert raw.headers["x-gateway-attempts"] == "2"  # the native target was down: the chat target answered
    sent = backend.calls()["plain-model"]["last_messages"]
    assert texts(sent) == ["Say hello", "Hello from the test backend.", "Count"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    # And back to Claude, with the whole conversation.
    third = client.responses.create(model="claude", previous_response_id=second.id, input="Count")
    assert third.output_text
    listed = client.responses.input_items.list(third.id, order="asc")
    assert [item.type for item in listed.data] == ["message"] * 5
    assert listed.data[-1].content[0].text == "Count"


def test_a_native_target_gets_the_conversation_as_its_input_not_the_gateways_id(gateway, backend):
    client = client_of(gateway)
    first = client.responses.create(model="selfhosted", input="Count")
    client.responses.create(model="agent", previous_response_id=first.id, input="Say hello")
    body = backend.calls()["responses:resp-model"]["last_body"]
    assert "previous_response_id" not in body
    assert [item.get("role") for item in body["input"]] == ["user", "assistant", "user"]


def test_store_false_keeps_nothing(gateway):
    client = client_of(gateway)
    made = client.responses.create(model="selfhosted", input="Count", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="selfhosted", previous_response_id=made.id, input="more")
    assert caught.value.body["type"] == "previous_response_not_found"


def test_each_key_sees_only_its_own_responses(gateway):
    alice, bob = client_of(gateway), client_of(gateway, "bob-key")
    made = alice.responses.create(model="selfhosted", input="Count")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(made.id)
    with pytest.raises(openai.NotFoundError) as caught:
        bob.responses.create(model="selfhosted", previous_response_id=made.id, input="more")
    assert caught.value.body["type"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(made.id)
    assert alice.responses.retrieve(made.id).id == made.id


def test_what_the_gateway_does_not_serve_is_refused_by_name(gateway):
    client = client_of(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="selfhosted", input="Count", background=True)
    assert "background" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="selfhosted", input="Count", conversation="conv_1")
    assert "Conversations API" in caught.value.body["message"]
    answer = request(gateway.port, "POST", "/v1/conversations", b"{}", {"Authorization": "Bearer alice-key"})
    assert answer.status == 404


def test_kept_responses_survive_a_restart_of_the_daemon(start_gateway, backend, claude, tmp_path):
    ini = conversations_ini(backend, claude, f"state_file = {tmp_path / 'kept' / 'responses.db'}")
    first = start_gateway(ini)
    made = client_of(first).responses.create(model="selfhosted", input="Count")
    first.stop()
    second = start_gateway(ini)
    client = client_of(second)
    assert client.responses.retrieve(made.id).output_text == made.output_text
    assert client.responses.create(model="selfhosted", previous_response_id=made.id, input="more").output_text


def test_two_gateways_on_one_redis_hold_one_conversation(start_gateway, backend, claude, tmp_path):
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    try:
        ini = conversations_ini(backend, claude, f"store = redis\nredis_url = redis://127.0.0.1:{redis.port}/0")
        one, two = start_gateway(ini), start_gateway(ini)
        made = client_of(one).responses.create(model="claude", input="Count")
        other = client_of(two)
        assert other.responses.retrieve(made.id).output_text == made.output_text
        going_on = other.responses.create(model="selfhosted", previous_response_id=made.id, input="more")
        assert client_of(one).responses.retrieve(going_on.id).id == going_on.id
        with pytest.raises(openai.NotFoundError):
            client_of(two, "bob-key").responses.retrieve(made.id)
        # Redis away: a call going on from a response is 503, never sent without its conversation.
        redis.stop()
        with pytest.raises(openai.InternalServerError) as caught:
            other.responses.create(model="selfhosted", previous_response_id=made.id, input="more")
        assert caught.value.status_code == 503 and caught.value.body["type"] == "responses_unavailable"
    finally:
        redis.stop()


def test_a_bad_input_items_query_is_a_400_in_the_error_shape(gateway):
    made = client_of(gateway).responses.create(model="selfhosted", input="Count")
    answer = request(gateway.port, "GET", f"/v1/responses/{made.id}/input_items?limit=500", headers={"Authorization": "Bearer alice-key"})
    assert answer.status == 400 and json.loads(answer.body)["error"]["type"] == "bad_request"


def test_workers_share_the_sqlite_file_so_a_conversation_moves_between_them(start_gateway, backend, claude):
    ini = conversations_ini(backend, claude).replace("[gateway]\n", "[gateway]\nworkers = 2\n", 1)
    gateway = start_gateway(ini)
    made = client_of(gateway).responses.create(model="selfhosted", input="Count")
    served_by = set()
    for _ in range(20):  # all 20 on one worker: one chance in half a million
        fresh = client_of(gateway)  # a new connection each time: the kernel spreads them over the workers
        raw = fresh.responses.with_raw_response.retrieve(made.id)
        assert raw.parse().id == made.id
        going_on = fresh.responses.with_raw_response.create(model="selfhosted", previous_response_id=made.id, input="more")
        served_by.add(gateway.logged("request_completed", request_id=going_on.headers["x-request-id"])[0].get("worker"))
        fresh.close()
    assert len(served_by) == 2
