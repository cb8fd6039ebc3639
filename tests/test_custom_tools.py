"""
Custom tools (free-form text in, as Codex's C{apply_patch}) to a target
that has only functions: said as a function of one string, C{input}; its
calls come back as C{custom_tool_call} items (JSON and streamed), and go
back as calls with their outputs.
"""

from __future__ import annotations

import json

import pytest

from txgateway.openai.wire import read_chunk
from txgateway.responses.translate import ChatToResponsesStream, chat_answer_to_response, responses_request_to_chat, tool_names
from txgateway.speaking import Untranslatable

PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
              "format": {"type": "grammar", "syntax": "lark", "definition": "start: \"*** Begin Patch\""}}


def test_a_custom_tool_is_a_function_of_one_string_with_its_grammar_in_its_description():
    chat, _ = responses_request_to_chat({"model": "m", "input": "fix it", "tools": [PATCH_TOOL],
                                         "tool_choice": {"type": "custom", "name": "apply_patch"}}, None)
    [tool] = chat["tools"]
    assert tool["function"]["name"] == "apply_patch"
    assert tool["function"]["parameters"] == {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
    assert tool["function"]["description"].startswith("Apply a patch.") and "lark grammar" in tool["function"]["description"]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}
    with pytest.raises(Untranslatable, match="format"):
        responses_request_to_chat({"model": "m", "input": "x", "tools": [{**PATCH_TOOL, "format": {"type": "other"}}]}, None)


def test_custom_tool_calls_and_outputs_go_back_as_tool_calls_and_tool_messages():
    chat, _ = responses_request_to_chat({"model": "m", "tools": [PATCH_TOOL], "input": [
        {"role": "user", "content": "fix it"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done"},
    ]}, None)
    call = chat["messages"][1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"input": "*** Begin Patch"}
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "Done"}


def answer_calling(arguments: str) -> bytes:
    return json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "apply_patch", "arguments": arguments}}]}}]}).encode()


def test_a_call_of_a_custom_tool_comes_back_as_a_custom_tool_call_with_its_text():
    names = tool_names([PATCH_TOOL])
    [item] = json.loads(chat_answer_to_response(answer_calling('{"input": "*** Begin Patch"}'), 1, names, "resp_x"))["output"]
    assert (item["type"], item["name"], item["input"], item["call_id"]) == ("custom_tool_call", "apply_patch", "*** Begin Patch", "call_1")
    # A target that wrote the text itself, not as {"input": ...}: the text as it came.
    [item] = json.loads(chat_answer_to_response(answer_calling("*** raw"), 1, names, "resp_x"))["output"]
    assert item["input"] == "*** raw"


def chunk(delta: dict, finish=None) -> bytes:
    return b"data: " + json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


def test_a_streamed_custom_tool_call_says_its_input_whole_when_the_call_ends():
    writer = ChatToResponsesStream(1, tool_names([PATCH_TOOL]), "resp_x")
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "apply_patch", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"input": "*** Be'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'gin Patch"}'}}]}),
        chunk({}, "tool_calls"), b"data: [DONE]\n\n",
    ]
    out = b"".join(writer(c, read_chunk(c)) for c in chunks)
    events = [json.loads(part.split(b"data: ", 1)[1]) for part in out.split(b"\n\n") if part]
    kinds = [event["type"] for event in events]
    assert "response.function_call_arguments.delta" not in kinds
    assert kinds[2:] == [
        "response.output_item.added", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
        "response.output_item.done", "response.completed",
    ]
    assert events[2]["item"]["type"] == "custom_tool_call"
    assert events[3]["delta"] == events[4]["input"] == "*** Begin Patch"
    assert events[-1]["response"]["output"][0]["input"] == "*** Begin Patch"
