"""
Reasoning that must come back does: Claude's signed thinking through the
chat layer (C{reasoning_effort} as a thinking budget, the blocks as
C{thinking_blocks} and C{reasoning_content}, JSON and streamed), as a
Responses reasoning item with an opaque C{encrypted_content} (JSON and
streamed), sent back to Claude as it came, and never to another provider.
"""

from __future__ import annotations

import json

import pytest

from txgateway.anthropic.translate import MessagesToChatStream, chat_request_to_messages, message_answer_to_chat
from txgateway.anthropic.wire import MessagesStreamReader
from txgateway.openai.wire import read_chunk
from txgateway.responses.speakers import ResponsesToResponses
from txgateway.responses.translate import (
    CLAUDE_THINKING, ChatToResponsesStream, chat_answer_to_response, claude_thinking, responses_request_to_chat, thinking_content,
)
from txgateway.responses.wire import ResponsesCall
from txgateway.speaking import Untranslatable

BLOCK = {"type": "thinking", "thinking": "Let me think.", "signature": "sig_abc"}
REDACTED = {"type": "redacted_thinking", "data": "opaque"}


def chat(**fields) -> dict:
    return {"model": "c", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(("effort", "max_tokens", "budget"), [
    ("low", 4000, 1024), ("medium", 8000, 4096), ("high", 8000, 7999), ("minimal", 8000, None), ("low", 1024, None),
])
def test_reasoning_effort_is_a_thinking_budget_below_max_tokens(effort, max_tokens, budget):
    request = chat_request_to_messages(chat(reasoning_effort=effort, max_tokens=max_tokens), None, 4096)
    assert request.get("thinking") == ({"type": "enabled", "budget_tokens": budget} if budget else None)


@pytest.mark.parametrize("fields", [{"temperature": 0.2}, {"top_p": 0.5}, {"tool_choice": "required", "tools": [
    {"type": "function", "function": {"name": "f"}}]}])
def test_no_thinking_where_the_api_refuses_it(fields):
    assert "thinking" not in chat_request_to_messages(chat(reasoning_effort="high", max_tokens=9000, **fields), None, 4096)


def test_thinking_blocks_go_back_first_in_their_assistant_turn_and_others_are_refused():
    body = chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "thinking_blocks": [BLOCK, REDACTED],
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
    ])
    turn = chat_request_to_messages(body, None, 4096)["messages"][1]
    assert [block["type"] for block in turn["content"]] == ["thinking", "redacted_thinking", "tool_use"]
    assert turn["content"][0] == BLOCK
    body["messages"][1]["thinking_blocks"] = [{"type": "thinking", "thinking": "unsigned"}]
    with pytest.raises(Untranslatable, match="thinking_blocks"):
        chat_request_to_messages(body, None, 4096)


def test_claudes_thinking_in_a_json_answer_is_reasoning_content_and_its_blocks():
    answer = {"id": "msg_1", "type": "message", "model": "c", "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 2},
              "content": [BLOCK, {"type": "text", "text": "Hello"}]}
    message = json.loads(message_answer_to_chat(json.dumps(answer).encode(), 1))["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"], message["thinking_blocks"]) == ("Hello", "Let me think.", [BLOCK])


def sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


CLAUDE_STREAM = [
    sse("message_start", {"message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
    sse("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    sse("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
    sse("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}}),
    sse("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": "sig_abc"}}),
    sse("content_block_stop", {"index": 0}),
    sse("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "Hello"}}),
    sse("content_block_stop", {"index": 1}),
    sse("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
    sse("message_stop", {}),
]


def chat_chunks_of_claude() -> list[bytes]:
    reader, writer = MessagesStreamReader(), MessagesToChatStream(1, True)
    chunks = []
    for event in CLAUDE_STREAM:
        out = writer(event, reader(event))
        chunks += [part + b"\n\n" for part in out.split(b"\n\n") if part]
    return chunks


def test_claudes_streamed_thinking_is_reasoning_content_deltas_then_its_signed_block():
    deltas = [json.loads(c[6:])["choices"][0]["delta"] for c in chat_chunks_of_claude() if c != b"data: [DONE]\n\n"
              and json.loads(c[6:])["choices"]]
    assert [d.get("reasoning_content") for d in deltas if "reasoning_content" in d] == ["Let me ", "think."]
    assert [d["thinking_blocks"] for d in deltas if "thinking_blocks" in d] == [[BLOCK]]


def test_a_reasoning_item_holds_claudes_blocks_opaquely_and_gives_them_back():
    content = thinking_content([BLOCK])
    assert content.startswith(CLAUDE_THINKING)
    assert claude_thinking({"type": "reasoning", "encrypted_content": content}) == [BLOCK]
    assert claude_thinking({"type": "reasoning", "encrypted_content": "gAAAAB-openai"}) is None
    assert claude_thinking({"type": "reasoning", "encrypted_content": CLAUDE_THINKING + "!!"}) is None


def test_a_chat_answer_with_thinking_is_a_response_whose_first_item_is_reasoning():
    answer = {"id": "c1", "model": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello", "reasoning_content": "Let me think.", "thinking_blocks": [BLOCK]}}]}
    response = json.loads(chat_answer_to_response(json.dumps(answer).encode(), 1, None, "resp_abc"))
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert claude_thinking(reasoning) == [BLOCK] and message["content"][0]["text"] == "Hello"


def test_a_chat_stream_with_thinking_is_a_reasoning_items_events_before_the_message():
    writer = ChatToResponsesStream(1, None, "resp_abc")
    out = b"".join(writer(chunk, read_chunk(chunk)) for chunk in chat_chunks_of_claude())
    events = [json.loads(part.split(b"data: ", 1)[1]) for part in out.split(b"\n\n") if part]
    kinds = [event["type"] for event in events]
    assert kinds[:6] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
    ]
    [done] = [event for event in events if event["type"] == "response.output_item.done" and event["item"]["type"] == "reasoning"]
    assert claude_thinking(done["item"]) == [BLOCK] and done["item"]["summary"][0]["text"] == "Let me think."
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


def items_with_thinking() -> list:
    return [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": thinking_content([BLOCK])},
        {"type": "reasoning", "id": "rs_openai", "summary": [], "encrypted_content": "gAAAA-openai"},
        {"type": "function_call", "call_id": "t1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "t1", "output": "ok"},
    ]


def test_claudes_reasoning_items_go_back_to_claude_and_no_reasoning_to_a_chat_target():
    to_claude, _ = responses_request_to_chat({"model": "c", "input": items_with_thinking()}, None, thinking=True)
    assert to_claude["messages"][1]["thinking_blocks"] == [BLOCK]
    to_chat, _ = responses_request_to_chat({"model": "c", "input": items_with_thinking()}, None)
    assert "thinking_blocks" not in json.dumps(to_chat)


def test_a_native_target_never_gets_claudes_reasoning_items():
    call = ResponsesCall.parse(json.dumps({"model": "m", "input": items_with_thinking()}).encode())
    speaker = ResponsesToResponses(call, b"/v1/responses", 0.0)
    sent = json.loads(speaker.body(None, "target-model", None))
    assert [item.get("id") for item in sent["input"] if item.get("type") == "reasoning"] == ["rs_openai"]
    assert sent["model"] == "target-model"
