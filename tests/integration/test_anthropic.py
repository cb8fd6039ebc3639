"""
Anthropic's Messages API through the running daemon, both ways: the
official C{anthropic} client against a fake Anthropic backend (passed
through natively) and a fake OpenAI backend (translated), and the official
C{openai} client against the fake Anthropic backend (translated the other
way); tools, fallbacks across the two APIs, a stream cut and resumed, a
529 retried, an untranslatable field refused.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend

pytestmark = pytest.mark.integration

FULL = "".join(f"w{i} " for i in range(1, 61))
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    claude = Backend(tmp_path_factory.mktemp("claude"), script="anthropic_backend.py", base_path="/v1")
    gpt = Backend(tmp_path_factory.mktemp("gpt"), script="openai_backend.py", base_path="/v1")
    yield claude, gpt
    claude.process.stop()
    gpt.process.stop()


def ini(claude: str, gpt: str) -> str:
    common = "timeout = 5\nretry_delay = 0.05\nfirst_token_timeout = 2\nidle_timeout = 2\nbreaker_threshold = 50\n"
    return DAEMON_HEAD + f"""[auth]
keys = sdk:gateway-key
[service:claude]
url = {claude}
api = anthropic
api_key = sk-ant-secret
resume = prefill
retries = 1
max_tokens = 333
{common}
[service:claudeonce]
url = {claude}
api = anthropic
api_key = sk-ant-secret
retries = 0
{common}
[service:gpt]
url = {gpt}
api_key = sk-gpt-secret
resume = prefill
retries = 0
{common}
[model:claude]
targets = claude:claude-plain
[model:gpt]
targets = gpt:gpt-plain
[model:claude-then-gpt]
targets = claudeonce:overloaded, gpt:gpt-plain
[model:long-then-gpt]
targets = claudeonce:context, gpt:gpt-plain
[model:limited-then-gpt]
targets = claudeonce:limited, gpt:gpt-plain
[model:claude-cut]
targets = claude:cut40
[model:gpt-cut]
targets = gpt:cut40
[model:claude-cut-once]
targets = claudeonce:cut40
[model:claude-529-once]
targets = claude:overloaded1
[model:claude-529]
targets = claudeonce:overloaded
[model:claude-error-event]
targets = claudeonce:error-event
[service:claudecache]
url = {claude}
api = anthropic
api_key = sk-ant-secret
cache = memory
cache_methods = POST
[model:cached]
targets = claudecache:claude-cached
[price:*]
prompt = 1
completion = 1
[key:governed]
secret = governed-secret
tokens_per_minute = 1000
models = claude, gpt
"""


@pytest.fixture(scope="module")
def gateway(backends, tmp_path_factory):
    from tests.integration.conftest import Gateway

    claude, gpt = backends
    daemon = Gateway(tmp_path_factory.mktemp("gateway"), ini(claude.url, gpt.url))
    yield daemon
    daemon.stop()


@pytest.fixture
def claude_client(gateway):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key="gateway-key", max_retries=0, timeout=20)


@pytest.fixture
def openai_client(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="gateway-key", max_retries=0, timeout=20)


def access_line(gateway, request_id: str) -> dict:
    [line] = [e for e in gateway.story(request_id) if e["event"] in ("request_completed", "request_aborted")]
    return line


# -- the anthropic SDK, natively to Claude ------------------------------------


def test_a_message_passes_natively_with_the_backends_key_and_version(claude_client, gateway, backends):
    raw = claude_client.messages.with_raw_response.create(
        model="claude", max_tokens=100, messages=HELLO, extra_headers={"anthropic-beta": "some-beta-2025"}
    )
    message = raw.parse()
    assert message.content[0].text == FULL and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 60)
    seen = backends[0].calls()["claude-plain"]
    assert seen["x-api-key"] == "sk-ant-secret" and seen["authorization"] is None
    # The client's own version passes (the service's default is for translated calls).
    assert seen["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert seen["anthropic-beta"] == "some-beta-2025"
    line = access_line(gateway, raw.headers["x-request-id"])
    assert (line["requested_model"], line["prompt_tokens"], line["completion_tokens"]) == ("claude", 2, 60)
    assert "sk-ant-secret" not in gateway.log_file.read_text()
    metrics = gateway.request("GET", "/metrics").body.decode()
    assert 'txgateway_tokens_total{kind="completion",model="claude-plain",service="claude"}' in metrics


def test_a_message_streams_natively_with_its_usage(claude_client):
    with claude_client.messages.stream(model="claude", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == FULL
    assert (message.usage.input_tokens, message.usage.output_tokens, message.stop_reason) == (2, 60, "end_turn")


def test_a_tool_use_round_trip_passes_natively_streamed(claude_client):
    with claude_client.messages.stream(model="claude", max_tokens=100, messages=HELLO, tools=[WEATHER]) as stream:
        message = stream.get_final_message()
    tool = message.content[1]
    assert (tool.type, tool.name, tool.input, message.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"}, "tool_use")
    follow_up = [*HELLO, {"role": "assistant", "content": [block.model_dump() for block in message.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "sunny"}]}]
    answer = claude_client.messages.create(model="claude", max_tokens=100, messages=follow_up, tools=[WEATHER])
    assert answer.content[0].text == "The tool said: sunny"


# -- the anthropic SDK, translated to an OpenAI backend --------------------------


def test_a_message_to_an_openai_backend_is_translated_both_ways(claude_client, gateway, backends):
    raw = claude_client.messages.with_raw_response.create(
        model="gpt", max_tokens=100, system="Be brief.", messages=HELLO, metadata={"user_id": "u-7"},
        extra_body={"temperature": 0.5, "top_p": 0.9},
    )
    message = raw.parse()
    assert message.type == "message" and message.content[0].text == FULL
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("end_turn", 4, 60)
    line = access_line(gateway, raw.headers["x-request-id"])
    assert (line["model"], line["prompt_tokens"], line["completion_tokens"], line["status"]) == ("gpt-plain", 4, 60, 200)
    assert backends[1].calls()["gpt-plain"]["authorization"] == "Bearer sk-gpt-secret"


def test_the_event_sequence_on_the_wire_is_anthropics(gateway):
    body = json.dumps({"model": "gpt", "max_tokens": 100, "messages": HELLO, "stream": True}).encode()
    answer = gateway.request("POST", "/v1/messages", body=body, headers={"x-api-key": "gateway-key"})
    names = [line[len("event: "):] for line in answer.body.decode().splitlines() if line.startswith("event: ")]
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[3:-3] == ["content_block_delta"] * 60
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_a_message_stream_from_an_openai_backend_is_anthropics_event_sequence(claude_client):
    with claude_client.messages.stream(model="gpt", max_tokens=100, messages=HELLO) as stream:
        events = list(stream)
        message = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta" and "content_block_stop" in kinds
    assert message.content[0].text == FULL
    assert (message.stop_reason, message.usage.output_tokens, message.usage.input_tokens) == ("end_turn", 60, 2)


def test_a_stop_sequence_is_reported_as_such(claude_client):
    message = claude_client.messages.create(model="gpt", max_tokens=100, messages=HELLO, stop_sequences=["w5"])
    assert message.content[0].text == "w1 w2 w3 w4 "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "w5")


def test_a_tool_use_round_trip_is_translated_to_an_openai_backend_and_back(claude_client, backends):
    with claude_client.messages.stream(
        model="gpt", max_tokens=100, messages=HELLO, tools=[WEATHER], tool_choice={"type": "auto"}
    ) as stream:
        message = stream.get_final_message()
    [tool] = [block for block in message.content if block.type == "tool_use"]
    assert (tool.id, tool.name, tool.input, message.stop_reason) == ("call_fake1", "get_weather", {"city": "Paris"}, "tool_use")
    sent = backends[1].calls()["gpt-plain"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": WEATHER["description"]}}]
    follow_up = [*HELLO, {"role": "assistant", "content": [block.model_dump() for block in message.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "sunny"}]}]
    answer = claude_client.messages.create(model="gpt", max_tokens=100, messages=follow_up, tools=[WEATHER])
    assert answer.content[0].text == "The tool said: sunny" and answer.stop_reason == "end_turn"
    assert sent["count"] >= 1
    # The tool result went as OpenAI's tool message, right after the call it answers.
    call_turn, result_turn = backends[1].calls()["gpt-plain"]["last_messages"][-2:]
    assert [call["id"] for call in call_turn["tool_calls"]] == ["call_fake1"] and call_turn["role"] == "assistant"
    assert json.loads(call_turn["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert result_turn == {"role": "tool", "tool_call_id": "call_fake1", "content": "sunny"}


def test_an_image_block_is_sent_to_an_openai_backend_as_a_data_url(claude_client, backends):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    message = claude_client.messages.create(
        model="gpt", max_tokens=100, messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}]
    )
    assert message.content[0].text == FULL


def test_a_field_with_no_openai_equivalent_is_refused_with_a_clear_400(claude_client, backends):
    before = backends[1].calls().get("gpt-plain", {}).get("count", 0)
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude_client.messages.create(model="gpt", max_tokens=100, messages=HELLO, extra_body={"container": "c1"})
    body = raised.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "'container' has no OpenAI equivalent" in body["error"]["message"] and body["request_id"]
    assert backends[1].calls().get("gpt-plain", {}).get("count", 0) == before


# -- failures, on both wires ------------------------------------------------------


def test_an_overloaded_claude_falls_over_to_an_openai_target(claude_client, gateway):
    raw = claude_client.messages.with_raw_response.create(model="claude-then-gpt", max_tokens=100, messages=HELLO)
    assert raw.parse().content[0].text == FULL
    assert raw.headers["x-gateway-service"] == "gpt"
    line = access_line(gateway, raw.headers["x-request-id"])
    assert line["fallback_from"] == ["claudeonce:overloaded"]


def test_a_429_from_claude_falls_over_to_the_next_target(claude_client, gateway, backends):
    before = backends[0].calls().get("limited", {}).get("count", 0)
    raw = claude_client.messages.with_raw_response.create(model="limited-then-gpt", max_tokens=100, messages=HELLO)
    assert raw.parse().content[0].text == FULL and raw.headers["x-gateway-service"] == "gpt"
    assert backends[0].calls()["limited"]["count"] == before + 1  # retries = 0 on that service
    assert access_line(gateway, raw.headers["x-request-id"])["fallback_from"] == ["claudeonce:limited"]


def test_a_prompt_too_long_for_claude_goes_to_the_next_target(openai_client):
    answer = openai_client.chat.completions.create(model="long-then-gpt", messages=HELLO)
    assert answer.choices[0].message.content == FULL


def test_a_529_is_retried(claude_client, backends):
    message = claude_client.messages.create(model="claude-529-once", max_tokens=100, messages=HELLO)
    assert message.content[0].text == FULL
    assert backends[0].calls()["overloaded1"]["count"] == 2


def test_a_529_that_stays_reaches_the_sdk_as_its_overloaded_error(claude_client, openai_client):
    with pytest.raises(anthropic.APIStatusError) as raised:
        claude_client.messages.create(model="claude-529", max_tokens=100, messages=HELLO)
    assert raised.value.status_code == 529 and raised.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(openai.APIStatusError) as translated:
        openai_client.chat.completions.create(model="claude-529", messages=HELLO)
    assert translated.value.status_code == 529 and translated.value.body["message"] == "Overloaded"


def test_a_claude_stream_cut_midway_is_resumed_to_the_exact_text(claude_client, gateway, backends):
    with claude_client.messages.stream(model="claude-cut", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == FULL and message.stop_reason == "end_turn"
    prefill = backends[0].calls()["cut40"]["body"]["messages"][-1]
    assert prefill == {"role": "assistant", "content": "".join(f"w{i} " for i in range(1, 41)).rstrip()}
    [line] = gateway.logged("request_completed", requested_model="claude-cut")
    assert line["resumed"] == 1


def test_an_openai_stream_cut_midway_is_resumed_for_an_anthropic_client(claude_client):
    with claude_client.messages.stream(model="gpt-cut", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
    assert text == FULL


def test_a_broken_stream_that_cannot_resume_ends_with_anthropics_error_event(claude_client):
    with pytest.raises(anthropic.APIStatusError) as raised:
        with claude_client.messages.stream(model="claude-cut-once", max_tokens=100, messages=HELLO) as stream:
            "".join(stream.text_stream)
    assert raised.value.body["error"]["type"] == "api_error"
    assert raised.value.body["error"]["txgateway_type"] == "stream_broken"


def test_an_error_event_before_the_first_token_is_a_failed_attempt(claude_client):
    with pytest.raises(anthropic.APIStatusError) as raised:
        with claude_client.messages.stream(model="claude-error-event", max_tokens=100, messages=HELLO) as stream:
            "".join(stream.text_stream)
    assert raised.value.status_code == 502
    assert "error event: overloaded_error" in raised.value.body["error"]["message"]


def test_gateway_errors_on_messages_are_in_anthropics_shape(claude_client, gateway):
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.create(model="no-such-model", max_tokens=10, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error" and missing.value.body["request_id"]
    stranger = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="claude", max_tokens=10, messages=HELLO)
    answer = gateway.request("POST", "/v1/messages", body=b"not json", headers={"x-api-key": "gateway-key"})
    assert answer.status == 400 and answer.json()["type"] == "error"


# -- the openai SDK, translated to Claude ------------------------------------------


def test_a_chat_completion_to_claude_is_translated_with_the_default_max_tokens(openai_client, gateway, backends):
    raw = openai_client.chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "system", "content": "Be brief."}, *HELLO], user="u-9",
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == FULL and answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 60)
    sent = backends[0].calls()["claude-plain"]
    assert sent["body"]["max_tokens"] == 333 and sent["body"]["system"] == "Be brief."
    assert sent["body"]["metadata"] == {"user_id": "u-9"} and sent["x-api-key"] == "sk-ant-secret"
    line = access_line(gateway, raw.headers["x-request-id"])
    assert (line["prompt_tokens"], line["completion_tokens"]) == (2, 60)


def test_a_chat_stream_from_claude_arrives_as_openai_chunks_with_usage(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="claude", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FULL
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 60 and chunks[-1].usage.prompt_tokens == 2


def test_a_tool_call_round_trip_with_claude_through_the_openai_sdk(openai_client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}]
    chunks = list(openai_client.chat.completions.create(model="claude", messages=HELLO, tools=tools, stream=True))
    arguments = "".join(
        call.function.arguments or "" for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or ())
    )
    [first] = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or ()) if call.id]
    assert (first.id, first.function.name, json.loads(arguments)) == ("toolu_fake1", "get_weather", {"city": "Paris"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow_up = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": first.id, "content": "sunny"},
    ]
    answer = openai_client.chat.completions.create(model="claude", messages=follow_up, tools=tools)
    assert answer.choices[0].message.content == "The tool said: sunny"


def test_a_claude_stream_cut_midway_is_resumed_for_an_openai_client(openai_client):
    chunks = list(openai_client.chat.completions.create(model="claude-cut", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL


# -- the gateway's other guarantees on /v1/messages ------------------------------------


def test_a_governed_key_reserves_and_settles_a_message_by_its_usage(gateway):
    governed = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key="governed-secret", max_retries=0)
    raw = governed.messages.with_raw_response.create(model="claude", max_tokens=100, messages=HELLO)
    assert raw.parse().content[0].text == FULL
    line = access_line(gateway, raw.headers["x-request-id"])
    assert line["key"] == "governed" and line["reserved_tokens"] > 100
    assert line["cost_usd"] == pytest.approx(62 / 1_000_000)  # 2 prompt and 60 completion tokens at $1 a million
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        governed.messages.create(model="cached", max_tokens=10, messages=HELLO)
    assert refused.value.body["error"]["txgateway_type"] == "model_not_allowed"
    with pytest.raises(anthropic.RateLimitError) as limited:
        governed.messages.create(model="claude", max_tokens=5000, messages=HELLO)
    assert limited.value.body["error"]["txgateway_type"] == "tokens_exceeded"


def test_a_message_answer_is_kept_in_the_response_cache(claude_client, backends):
    first = claude_client.messages.with_raw_response.create(model="cached", max_tokens=50, messages=HELLO)
    second = claude_client.messages.with_raw_response.create(model="cached", max_tokens=50, messages=HELLO)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.parse().content[0].text == FULL
    assert backends[0].calls()["claude-cached"]["count"] == 1


def test_the_other_messages_endpoints_are_refused_in_anthropics_shape(gateway):
    answer = gateway.request("POST", "/v1/messages/batches", body=b"{}", headers={"x-api-key": "gateway-key"})
    assert answer.status == 404
    assert answer.json()["error"]["type"] == "not_found_error" and "batches" in answer.json()["error"]["message"]


def test_count_tokens_is_claudes_own_or_the_gateways_estimate_said_in_a_header(claude_client):
    counted = claude_client.messages.with_raw_response.count_tokens(model="claude", messages=HELLO)
    assert counted.parse().input_tokens == 5 and counted.headers.get("x-gateway-token-count") is None  # the fake's: words + 3
    estimated = claude_client.messages.with_raw_response.count_tokens(model="gpt", messages=HELLO)
    assert estimated.parse().input_tokens > 0 and estimated.headers["x-gateway-token-count"] == "estimated"


def test_the_anthropic_sdk_lists_the_models_in_its_own_shape(claude_client, openai_client):
    listed = list(claude_client.models.list())
    assert listed[0].id == "claude" and listed[0].type == "model" and listed[0].created_at.year >= 2026
    assert claude_client.models.retrieve("gpt").display_name == "gpt"
    with pytest.raises(anthropic.NotFoundError):
        claude_client.models.retrieve("no-such-model")
    assert [model.id for model in openai_client.models.list()][:2] == ["claude", "gpt"]
