"""
Requests recorded from the real Claude Code CLI (2.1.197, through the
daemon to the fake Claude backend; their 24 tools cut to 3): a tool
round trip's second turn for a model it knows (thinking enabled with a
31,999-token budget) and for one it does not (adaptive thinking with an
effort, a system turn among the messages), each translated for an OpenAI
backend and its answer back, field by field; and a turn with an image
(its C{Read} tool's result: a PNG, for a model it does not know), whose
first turn is its first message as it was sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from txgateway.anthropic.translate import chat_answer_to_message, chat_request_to_messages, messages_request_to_chat
from txgateway.anthropic.wire import MessagesCall

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> dict:
    return json.loads((RECORDED / name).read_text())


@pytest.mark.parametrize(("name", "effort"), [
    ("claude_code_known_model_tool_turn.json", "high"), ("claude_code_unknown_model_tool_turn.json", "high"),
])
def test_a_recorded_claude_code_turn_is_translated_for_an_openai_backend(name, effort):
    body = recorded(name)
    chat = messages_request_to_chat(body, "qwen")
    assert chat["model"] == "qwen" and chat["max_tokens"] == 32000 and chat["reasoning_effort"] == effort
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    roles = [message["role"] for message in chat["messages"]]
    assert roles[0] == "system" and roles[-1] == "tool"  # its system blocks first, the tool's result last
    assert chat["messages"][0]["content"] == "\n".join(block["text"] for block in body["system"])
    [call] = next(message for message in chat["messages"] if message.get("tool_calls"))["tool_calls"]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert [tool["function"]["name"] for tool in chat["tools"]] == [tool["name"] for tool in body["tools"]]
    assert "cache_control" not in json.dumps(chat)  # a hint of Anthropic's pricing, dropped
    assert json.loads(body["metadata"]["user_id"])["session_id"] in chat["user"]


def test_the_unknown_models_system_turn_stays_in_place():
    chat = messages_request_to_chat(recorded("claude_code_unknown_model_tool_turn.json"), None)
    roles = [message["role"] for message in chat["messages"]]
    assert roles.count("system") == 2 and roles.index("system", 1) > roles.index("user")


@pytest.mark.parametrize("name", ["claude_code_known_model_tool_turn.json", "claude_code_unknown_model_tool_turn.json"])
def test_who_a_recorded_turn_is_for_is_read_from_its_json_user_id(name):
    body = recorded(name)
    user, session = MessagesCall.parse(json.dumps(body).encode()).end_user()
    said = json.loads(body["metadata"]["user_id"])
    assert (user, session) == (said["device_id"], said["session_id"])


def test_the_backends_answer_to_it_goes_back_as_claude_code_reads_it():
    answer = {"id": "chatcmpl-1", "model": "qwen", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Done.", "reasoning_content": "The tool failed; say so."}}],
        "usage": {"prompt_tokens": 900, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 800}}}
    message = json.loads(chat_answer_to_message(json.dumps(answer).encode()))
    assert [block["type"] for block in message["content"]] == ["thinking", "text"]
    assert message["usage"] == {"input_tokens": 100, "output_tokens": 12, "cache_read_input_tokens": 800, "cache_creation_input_tokens": 0}


def test_a_recorded_image_from_a_tool_follows_its_tool_message_for_an_openai_backend():
    body = recorded("claude_code_image_turn.json")
    [result] = body["messages"][-1]["content"]
    [image] = result["content"]
    assert image["type"] == "image" and image["source"]["media_type"] == "image/png"  # what Claude Code sent
    chat = messages_request_to_chat(body, "qwen")
    assert chat["reasoning_effort"] == "high"  # its adaptive thinking at output_config.effort high
    tool, after = chat["messages"][-2:]
    assert tool == {"role": "tool", "tool_call_id": result["tool_use_id"], "content": tool["content"]} and tool["content"]
    assert after["role"] == "user"
    assert after["content"][0] == {"type": "text", "text": f"What the tool call {result['tool_use_id']} returned:"}
    assert after["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image["source"]["data"]}}


def test_a_recorded_image_turn_goes_to_claude_and_back_with_its_image():
    body = recorded("claude_code_image_turn.json")
    again = chat_request_to_messages(messages_request_to_chat(body, "qwen"), "claude-x", 4096)
    last = again["messages"][-1]
    kinds = [block["type"] for block in last["content"]]
    assert kinds[0] == "tool_result" and "image" in kinds
    image = next(block for block in last["content"] if block["type"] == "image")
    assert image["source"]["data"] == body["messages"][-1]["content"][0]["content"][0]["source"]["data"]


def test_a_recorded_first_turn_is_translated_for_an_openai_backend():
    body = recorded("claude_code_image_turn.json")
    first = {**body, "messages": body["messages"][:1]}
    chat = messages_request_to_chat(first, "qwen")
    assert [message["role"] for message in chat["messages"]] == ["system", "user"]
    assert "READ_FILE:" in chat["messages"][-1]["content"]
    assert chat["stream"] is True and chat["max_tokens"] == body["max_tokens"]
