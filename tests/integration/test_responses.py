"""
OpenAI's Responses API through the running daemon with the official
C{openai} client, to a backend process (tests/openai_backend.py) that
speaks it natively (JSON, a stream, its usage on the access line, a
stream broken after its first output) to one that speaks only chat
completions (translated both ways: JSON, a stream, a function tool), and
to Claude (tests/anthropic_backend.py, translated by way of chat).
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend, Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    server = Backend(tmp_path_factory.mktemp("responses"), script="openai_backend.py", base_path="/v1")
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def claude(tmp_path_factory):
    server = Backend(tmp_path_factory.mktemp("claude"), script="anthropic_backend.py", base_path="/v1")
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, backend, claude):
    daemon = Gateway(tmp_path_factory.mktemp("gateway"), DAEMON_HEAD + f"""[auth]
keys = sdk:gateway-key
[service:native]
url = {backend.url}
api = openai
responses = native
retries = 0
first_token_timeout = 2
idle_timeout = 2
[model:agent]
targets = native:resp-model
[model:cut]
targets = native:cut
[model:native-error]
targets = native:resp-error
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
[service:chatresume]
url = {backend.url}
api = openai
retries = 0
resume = prefill
[model:cutchat]
targets = chatresume:cut40
[service:clauderesume]
url = {claude.url}
api = anthropic
retries = 0
resume = prefill
[model:cutclaude]
targets = clauderesume:cut40
""")
    yield daemon
    daemon.stop()


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="gateway-key", max_retries=0)


def test_responses_create_is_answered_by_the_native_target_and_its_usage_read(client, gateway):
    raw = client.responses.with_raw_response.create(model="agent", input="Say hello", max_output_tokens=64)
    response = raw.parse()
    assert response.output_text == "Hello from the test backend."
    [line] = gateway.logged("request_completed", request_id=raw.headers["x-request-id"])
    assert (line["model"], line["prompt_tokens"], line["completion_tokens"]) == ("resp-model", 11, 5)


def test_a_responses_stream_comes_whole_through_the_sdks_stream_helper(client, gateway):
    with client.responses.stream(model="agent", input="Say hello") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "Hello from the test backend."
    assert final.usage.output_tokens == 5 and final.status == "completed"


def test_a_stream_broken_after_its_first_output_ends_with_an_error_event_and_no_completion(client):
    events = []
    # The SDK reads the error event, then the connection's end without the body's: it raises.
    with pytest.raises(openai.APIConnectionError):
        for event in client.responses.create(model="cut", input="Say hello", stream=True):
            events.append(event)
    kinds = [event.type for event in events]
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    assert kinds[-1] == "error" and events[-1].code == "stream_broken"


FULL = "".join(f"w{i} " for i in range(1, 61))


def test_responses_create_on_a_chat_only_backend_is_translated_both_ways(client, gateway, backend):
    raw = client.responses.with_raw_response.create(model="selfhosted", instructions="Be brief.", input="Count", max_output_tokens=100)
    response = raw.parse()
    assert response.output_text == FULL and response.status == "completed"
    assert response.usage.output_tokens == 60
    sent = backend.calls()["plain-model"]["last_messages"]
    assert sent == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}]
    [line] = gateway.logged("request_completed", request_id=raw.headers["x-request-id"])
    assert (line["prompt_tokens"], line["completion_tokens"]) == (response.usage.input_tokens, 60)


def test_a_responses_stream_from_a_chat_only_backend_is_the_apis_event_sequence(client):
    with client.responses.stream(model="selfhosted", input="Count") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == FULL and final.output_text == FULL
    assert final.usage.output_tokens == 60


def test_a_function_tool_goes_to_a_chat_only_backend_and_comes_back_as_a_function_call(client, backend):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    response = client.responses.create(model="selfhosted", input="Weather in Paris?", tools=[tool, {"type": "web_search"}])
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert backend.calls()["plain-model"]["tools"] == [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}]


def test_responses_on_a_claude_backend_are_translated_both_ways(client):
    response = client.responses.create(model="claude", input="Count", max_output_tokens=200)
    assert response.output_text == FULL and response.status == "completed"
    with client.responses.stream(model="claude", input="Count") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == FULL and final.usage.output_tokens > 0


def test_a_function_tool_goes_to_claude_and_comes_back_as_a_function_call(client):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    response = client.responses.create(model="claude", input="Weather in Paris?", tools=[tool])
    [call] = [item for item in response.output if item.type == "function_call"]
    assert (call.name, call.call_id) == ("get_weather", "toolu_fake1")
    follow_up = client.responses.create(model="claude", tools=[tool], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ])
    assert follow_up.output_text == "The tool said: Sunny, 21 C"


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _claude_reasoning(item) -> bool:
    return item.type == "reasoning" and (item.encrypted_content or "").startswith("txgateway.claude-thinking.v1:")


def test_claudes_signed_thinking_comes_back_as_a_reasoning_item_and_goes_back_to_claude(client, claude):
    first = client.responses.create(model="claude", input="Weather in Paris?", tools=[WEATHER], reasoning={"effort": "low"},
                                    max_output_tokens=4000, store=False)
    reasoning, call = first.output[0], first.output[-1]
    assert _claude_reasoning(reasoning) and reasoning.summary[0].text == "The user wants the weather; I will call the tool."
    assert call.type == "function_call"
    assert claude.calls()["claude-test"]["body"]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    # The SDK's own pattern: the output sent back as it came, then the tool's output.  The backend
    # refuses (as Claude does) an assistant turn with a tool use that does not begin with its thinking.
    follow_up = client.responses.create(
        model="claude", tools=[WEATHER], reasoning={"effort": "low"}, max_output_tokens=4000, store=False,
        input=[{"role": "user", "content": "Weather in Paris?"}, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
    )
    assert follow_up.output_text == "The tool said: Sunny, 21 C"
    sent = claude.calls()["claude-test"]["body"]["messages"][1]["content"]
    assert sent[0] == {"type": "thinking", "thinking": "The user wants the weather; I will call the tool.",
                       "signature": "sig_fake_EqQBCkYIBRgCIkDm"}


def test_a_streamed_thinking_is_a_reasoning_items_events_and_a_held_conversation_keeps_it(client):
    with client.responses.stream(model="claude", input="Weather in Paris?", tools=[WEATHER], reasoning={"effort": "medium"},
                                 max_output_tokens=8000) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds
    assert kinds.index("response.reasoning_summary_text.delta") < kinds.index("response.function_call_arguments.delta")
    assert _claude_reasoning(final.output[0])
    [call] = [item for item in final.output if item.type == "function_call"]
    # Going on from the response the gateway holds: its thinking goes back to Claude with it.
    going_on = client.responses.create(
        model="claude", previous_response_id=final.id, tools=[WEATHER], reasoning={"effort": "medium"}, max_output_tokens=8000,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain"}],
    )
    assert going_on.output_text == "The tool said: Rain"


def test_claudes_thinking_never_reaches_another_provider(client, backend):
    first = client.responses.create(model="claude", input="Weather in Paris?", tools=[WEATHER], reasoning={"effort": "low"},
                                    max_output_tokens=4000)
    [call] = [item for item in first.output if item.type == "function_call"]
    tool_output = [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}]
    client.responses.create(model="agent", previous_response_id=first.id, input=tool_output)
    sent = backend.calls()["responses:resp-model"]["last_body"]["input"]
    assert [item.get("type", "message") for item in sent] == ["message", "message", "function_call", "function_call_output"]
    client.responses.create(model="selfhosted", previous_response_id=first.id, input=tool_output, tools=[WEATHER])
    assert "thinking_blocks" not in json.dumps(backend.calls()["plain-model"]["last_messages"])


PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to the files.",
         "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /(.|\\n)*/ "*** End Patch"'}}


@pytest.mark.parametrize("model", ["selfhosted", "claude"])
def test_a_custom_tool_is_called_and_its_output_goes_back_on_a_translated_target(client, model):
    first = client.responses.create(model=model, input="Fix the bug", tools=[PATCH], store=False)
    [call] = [item for item in first.output if item.type == "custom_tool_call"]
    assert (call.name, call.input) == ("apply_patch", "*** Begin Patch\n*** End Patch")
    with client.responses.stream(model=model, input="Fix the bug", tools=[PATCH], store=False) as stream:
        streamed = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.custom_tool_call_input.done" in streamed
    assert [item.input for item in final.output if item.type == "custom_tool_call"] == [call.input]
    follow_up = client.responses.create(model=model, tools=[PATCH], store=False, input=[
        {"role": "user", "content": "Fix the bug"},
        {"type": "custom_tool_call", "call_id": call.call_id, "name": call.name, "input": call.input},
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Applied"},
    ])
    assert follow_up.output_text == "The tool said: Applied"


@pytest.mark.parametrize("model", ["cutchat", "cutclaude"])
def test_a_translated_stream_broken_midway_is_resumed_from_its_text_as_one_response(client, gateway, model):
    with client.responses.stream(model=model, input="Count") as stream:
        events = list(stream)
        final = stream.get_final_response()
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == FULL and final.output_text == FULL and final.status == "completed"
    assert [event.type for event in events].count("response.created") == 1
    assert [event.sequence_number for event in events] == list(range(len(events)))
    line = gateway.logged("request_completed", requested_model=model)[-1]
    assert line["resumed"] == 1


@pytest.mark.parametrize("model", ["agent", "selfhosted", "claude"])
def test_structured_output_comes_back_parsed_by_the_sdk(client, backend, model):
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        celsius: int
        sunny: bool

    parsed = client.responses.parse(model=model, input="Weather in Paris as JSON", text_format=Weather).output_parsed
    assert parsed == Weather(city="Paris", celsius=21, sunny=True)
    with client.responses.stream(model=model, input="Weather in Paris as JSON", text_format=Weather) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == parsed
    if model == "selfhosted":
        assert backend.calls()["plain-model"]["response_format"]["json_schema"]["name"] == "Weather"


def test_a_native_targets_function_call_and_reasoning_come_through_as_they_are(client, backend):
    include = ["reasoning.encrypted_content"]
    first = client.responses.create(model="agent", input="Weather in Paris?", tools=[WEATHER], reasoning={"effort": "low"},
                                    include=include, store=False)
    reasoning, call = first.output
    assert (reasoning.type, reasoning.encrypted_content) == ("reasoning", "gAAAAB-openai-opaque")
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", '{"city": "Paris"}')
    with client.responses.stream(model="agent", input="Weather in Paris?", tools=[WEATHER], reasoning={"effort": "low"},
                                 include=include, store=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and [item.type for item in final.output] == ["reasoning", "function_call"]
    # Sent back (the reasoning item too: it is the same provider's), the tool's output is quoted.
    follow_up = client.responses.create(
        model="agent", tools=[WEATHER], reasoning={"effort": "low"}, include=include, store=False,
        input=[{"role": "user", "content": "Weather in Paris?"}, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
    )
    assert follow_up.output_text == "The tool said: Sunny"
    sent = backend.calls()["responses:resp-model"]["last_body"]["input"]
    assert [item.get("type") for item in sent][1] == "reasoning"


def test_a_native_error_event_before_any_output_is_a_failed_attempt_in_the_apis_shape(client, gateway):
    with pytest.raises(openai.InternalServerError) as caught:
        with client.responses.stream(model="native-error", input="hi") as stream:
            list(stream)
    assert caught.value.status_code == 502 and caught.value.body["type"] == "upstream_unavailable"
    line = gateway.logged("request_completed", requested_model="native-error")[-1]
    assert line["status"] == 502
