"""
Requests recorded from the real Claude Code CLI (2.1.197, through the
daemon to the fake Claude backend; their 24 tools cut to 3): a tool
round trip's second turn for a model it knows (thinking enabled with a
31,999-token budget) and for one it does not (adaptive thinking with an
effort, a system turn among the messages), each translated for an OpenAI
backend and its answer back, field by field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from txgateway.anthropic.translate import chat_answer_to_message, messages_request_to_chat
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
