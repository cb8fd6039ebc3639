"""
The pure parts of the Messages API: its request read, its stream read in
the relays' terms, and the translations both ways, on shapes recorded from
the two APIs' documentation (tool calls split across chunks, usage only in
C{message_delta}, images, stop sequences).
"""

from __future__ import annotations

import json

import pytest

from txgateway import errors
from txgateway.anthropic.translate import (
    ChatToMessagesStream,
    MessagesToChatStream,
    Untranslatable,
    chat_answer_to_message,
    chat_error_to_anthropic,
    chat_request_to_messages,
    message_answer_to_chat,
    messages_error_to_chat,
    messages_request_to_chat,
)
from txgateway.anthropic.wire import MessagesCall, MessagesStreamReader, gateway_error_body, read_message, with_prefill
from txgateway.openai.wire import EventSplitter, after_refusal, read_chunk, NEXT_TARGET


def sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


#: A Messages stream as the API documents it: a text block, then a tool use
#: whose input arrives in pieces, the usage's output only in message_delta.
CLAUDE_STREAM = [
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2, "cache_read_input_tokens": 100},
        "content": [], "stop_reason": None}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    sse("ping", {"type": "ping"}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", let's check."}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"location":'}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ' "San Francisco, CA"}'}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 89}}),
    sse("message_stop", {"type": "message_stop"}),
]


def chunk(delta: dict, finish=None, usage=None, choices=True) -> bytes:
    body = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


#: An OpenAI stream with a text part, then a tool call whose arguments are split across chunks.
GPT_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Let me"}),
    chunk({"content": " look."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"loca'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'tion": "Paris"}'}}]}),
    chunk({}, finish="tool_calls"),
    chunk({}, usage={"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}, choices=False),
    b"data: [DONE]\n\n",
]


def events_of(data: bytes) -> list[tuple[str, dict]]:
    """The (event name, data) pairs of a Messages stream's bytes."""
    out = []
    for event in EventSplitter().feed(data):
        lines = event.decode().strip().split("\n")
        out.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return out


def chunks_of(data: bytes) -> list:
    return [json.loads(event[6:]) if event[6:].strip() != b"[DONE]" else "[DONE]" for event in EventSplitter().feed(data)]


# -- the request ----------------------------------------------------------------


def test_a_messages_call_reads_its_model_stream_and_max_tokens():
    call = MessagesCall.parse(b'{"model": "claude", "max_tokens": 50, "stream": true, "messages": []}')
    assert (call.model, call.max_tokens, call.stream, call.kind, call.operation(b"/messages")) == ("claude", 50, True, "messages", "chat")
    assert call.body_for(None) == call.raw
    assert json.loads(call.body_for("claude-x"))["model"] == "claude-x"


def test_a_prefill_loses_its_trailing_whitespace_and_joins_a_last_assistant_turn():
    assert with_prefill([{"role": "user", "content": "hi"}], "w1 w2 ") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "w1 w2"}]
    assert with_prefill([{"role": "assistant", "content": "Sure: "}], "w1 ") == [{"role": "assistant", "content": "Sure: w1"}]


# -- reading a Messages stream ---------------------------------------------------------


def test_a_messages_stream_commits_at_its_first_delta_and_reports_its_whole_usage_once_at_message_delta():
    read = MessagesStreamReader()
    facts = [read(event) for event in CLAUDE_STREAM]
    assert [f.token for f in facts[:4]] == [False, False, False, True]
    assert facts[0].message_id == "msg_014p7gG3wDgGV9EUtLvnow3U"
    assert "".join(f.text for f in facts) == "Okay, let's check."
    assert [f.tool_call for f in facts].index(True) == 6
    start, usage = [f.usage for f in facts if f.usage is not None]
    # message_start says the input at once (a client that leaves early still pays for it), not yet the whole usage.
    assert (start.prompt_tokens, start.cached_tokens, start.final) == (572, 100, False)
    assert (usage.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == ("claude-sonnet-4-5", 572, 89, 100)
    assert usage.final
    assert facts[-2].finish_reasons == ("tool_use",) and facts[-1].done


def test_an_error_event_ends_the_attempt_like_a_malformed_chunk():
    facts = MessagesStreamReader()(sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert facts.malformed == "an error event: overloaded_error: Overloaded"


def test_a_resumed_stream_after_a_cut_space_leaves_out_the_space_its_text_begins_with():
    read = MessagesStreamReader(after_space=True)
    delta = sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " w41 "}})
    facts = read(delta)
    assert facts.text == "w41 " and b'"text":"w41 "' in facts.rewritten
    assert read(delta).text == " w41 "  # only the first


def test_a_json_message_reports_usage_id_and_stop_reason():
    body = json.dumps({"id": "msg_1", "type": "message", "model": "claude", "content": [], "stop_reason": "max_tokens",
                       "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 3}}).encode()
    facts = read_message(body)
    assert (facts.response_id, facts.finish_reasons, facts.usage.prompt_tokens, facts.usage.completion_tokens) == (
        "msg_1", ("max_tokens",), 13, 5)


# -- requests, Messages to chat ------------------------------------------------------------


def test_a_messages_request_becomes_a_chat_request():
    body = {
        "model": "claude", "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"], "stream": True,
        "metadata": {"user_id": "u1"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "png"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a cat"}]},
                {"type": "text", "text": "And?"}]},
        ],
        "tools": [{"name": "lookup", "description": "Look up", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    chat = messages_request_to_chat(body, "gpt-4o")
    assert chat["model"] == "gpt-4o" and chat["max_tokens"] == 64 and chat["stop"] == ["END"] and chat["user"] == "u1"
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "png"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
        {"role": "user", "content": "And?"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}, "description": "Look up"}}]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False


def test_the_images_a_tool_result_holds_follow_the_tool_messages_in_a_user_message():
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    body = {"model": "claude", "max_tokens": 64, "messages": [
        {"role": "user", "content": "Look at these"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.png"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"file_path": "notes.txt"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [png]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "notes"}]},
            {"type": "text", "text": "Compare them."}]},
    ]}
    messages = messages_request_to_chat(body, None)["messages"]
    assert messages[2]["role"] == "tool" and messages[2]["tool_call_id"] == "toolu_1" and "follows" in messages[2]["content"]
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_2", "content": "notes"}
    assert messages[4] == {"role": "user", "content": [
        {"type": "text", "text": "What the tool call toolu_1 returned:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Compare them."},
    ]}


def test_a_tool_result_block_with_no_chat_equivalent_is_refused_by_name():
    body = {"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result", "source": "x"}]}]}]}
    with pytest.raises(Untranslatable, match="'search_result' block has no OpenAI equivalent in a tool result"):
        messages_request_to_chat(body, None)


def test_a_pdf_document_becomes_a_file_part():
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]}
    [message] = messages_request_to_chat(body, None)["messages"]
    assert message["content"] == [{"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBER"}}]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"thinking": {"type": "interleaved"}}, "thinking: the type 'interleaved'"),
        ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "the edit 'clear_tool_uses_20250919'"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort: 'extreme'"),
        ({"container": "c1"}, "'container' has no OpenAI equivalent"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "the server tool 'web_search_20250305'"),
        ({"metadata": {"user_id": "u", "other": 1}}, "metadata: only user_id"),
        ({"messages": [{"role": "user", "content": [{"type": "search_result", "source": "x"}]}]}, "'search_result' block"),
    ],
)
def test_a_field_with_no_openai_equivalent_is_named_never_dropped(change, named):
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(Untranslatable) as raised:
        messages_request_to_chat(body, None)
    assert named in str(raised.value)


@pytest.mark.parametrize(("thinking", "output", "effort"), [
    ({"type": "enabled", "budget_tokens": 1024}, None, "low"),
    ({"type": "enabled", "budget_tokens": 8000}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 31999}, None, "high"),
    ({"type": "adaptive"}, {"effort": "max"}, "high"),
    ({"type": "adaptive"}, None, None),
    ({"type": "disabled"}, {"effort": "low"}, None),
])
def test_thinking_is_a_reasoning_effort_by_its_budget_or_its_effort(thinking, output, effort):
    body = {"model": "m", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}], "thinking": thinking}
    if output is not None:
        body["output_config"] = output
    assert messages_request_to_chat(body, None).get("reasoning_effort") == effort
    assert "reasoning_effort" not in messages_request_to_chat(body, None, effort=False)


def test_what_claude_code_sends_beside_its_messages_is_translated_or_dropped_as_a_hint():
    body = {
        "model": "m", "max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": '{"session_id": "s1"}'}, "service_tier": "standard_only", "top_k": 40,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Hello"}]},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "more"},
        ],
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }
    chat = messages_request_to_chat(body, None)
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "system", "user"]
    assert chat["messages"][2] == {"role": "assistant", "content": "Hello"}  # earlier thinking never sent on
    assert (chat["reasoning_effort"], chat["user"]) == ("high", '{"session_id": "s1"}')
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}
    assert "top_k" not in chat and "service_tier" not in chat
    assert messages_request_to_chat(body, None, top_k=True)["top_k"] == 40


# -- requests, chat to Messages ---------------------------------------------------------------


def test_a_chat_request_becomes_a_messages_request_with_the_default_max_tokens():
    body = {
        "model": "gpt", "stream": True, "stream_options": {"include_usage": True}, "stop": "END", "user": "u2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look"},
                                         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "found"},
            {"role": "user", "content": "So?"},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "parallel_tool_calls": False,
    }
    request = chat_request_to_messages(body, "claude-x", 4096)
    assert (request["model"], request["max_tokens"], request["system"], request["stop_sequences"]) == ("claude-x", 4096, "Be brief.", ["END"])
    assert request["stream"] is True and request["metadata"] == {"user_id": "u2"}
    assert request["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "found"}, {"type": "text", "text": "So?"}]},
    ]
    assert request["tools"] == [{"name": "lookup", "input_schema": {"type": "object"}}]
    assert request["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert chat_request_to_messages({**body, "max_completion_tokens": 9}, None, 4096)["max_tokens"] == 9


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"logprobs": True}, "'logprobs' has no Anthropic equivalent"),
        ({"n": 2}, "'n' above 1"),
        ({"temperature": 1.5}, "'temperature' above 1"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "grammar"}}, "response_format"),
    ],
)
def test_a_chat_field_with_no_anthropic_equivalent_is_named(change, named):
    with pytest.raises(Untranslatable) as raised:
        chat_request_to_messages({"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}, None, 10)
    assert named in str(raised.value)


def test_a_chat_prefill_to_claude_is_a_last_assistant_turn_without_trailing_space():
    request = chat_request_to_messages({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, None, 10, prefill="w1 w2 ")
    assert request["messages"][-1] == {"role": "assistant", "content": "w1 w2"}


# -- JSON answers ------------------------------------------------------------------------------


def test_a_chat_answer_becomes_a_message_with_its_stop_sequence_and_usage():
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "w1 w2"}, "finish_reason": "stop", "stop_reason": "END"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 4}}}
    message = json.loads(chat_answer_to_message(json.dumps(answer).encode(), ["END"]))
    assert message["content"] == [{"type": "text", "text": "w1 w2"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 2, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0}


def test_a_chat_answer_with_a_tool_call_becomes_a_tool_use_block():
    answer = {"id": "c", "model": "gpt", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}}]}
    message = json.loads(chat_answer_to_message(json.dumps(answer).encode()))
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]
    assert message["stop_reason"] == "tool_use"


def test_a_message_answer_becomes_a_chat_completion():
    message = {"id": "msg_1", "type": "message", "model": "claude", "stop_reason": "max_tokens", "content": [
        {"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 2}}
    chat = json.loads(message_answer_to_chat(json.dumps(message).encode(), 1700000000))
    [choice] = chat["choices"]
    assert choice["message"]["content"] == "Hi" and choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"] == [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 2}}
    assert (chat["object"], chat["created"]) == ("chat.completion", 1700000000)


def test_what_is_not_an_answer_passes_as_it_is():
    assert chat_answer_to_message(b"<html>") == b"<html>"
    assert message_answer_to_chat(b'{"no": "content"}', 0) == b'{"no": "content"}'


# -- streams ------------------------------------------------------------------------------------


def test_a_chat_stream_is_written_as_the_messages_event_sequence():
    write = ChatToMessagesStream()
    out = b"".join(write(event, read_chunk(event)) for event in GPT_STREAM)
    events = events_of(out)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {}}
    assert "".join(data["delta"].get("partial_json", "") for _, data in events[7:9]) == '{"location": "Paris"}'
    assert [data["index"] for name, data in events if name == "content_block_delta"] == [0, 0, 1, 1]
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 20, "cache_read_input_tokens": 0, "output_tokens": 12}}


def test_a_chat_stream_that_ends_without_done_is_finished_by_the_writer():
    write = ChatToMessagesStream()
    out = b"".join(write(event, read_chunk(event)) for event in GPT_STREAM[:-1])
    assert [name for name, _ in events_of(out + write.finish())][-2:] == ["message_delta", "message_stop"]
    assert write.finish() == b""


def test_a_messages_stream_is_written_as_chat_chunks_with_the_tool_call_split_as_it_came():
    read, write = MessagesStreamReader(), MessagesToChatStream(1700000000, client_wants_usage=True)
    chunks = chunks_of(b"".join(write(event, read(event)) for event in CLAUDE_STREAM))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks[:-1]} == {"msg_014p7gG3wDgGV9EUtLvnow3U"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:-1] if c["choices"])
    calls = [call for c in chunks[:-1] if c["choices"] for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert text == "Okay, let's check."
    assert calls[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(call["function"]["arguments"] for call in calls) == '{"location": "San Francisco, CA"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]] == ["tool_calls"]
    assert chunks[-2]["usage"] == {"prompt_tokens": 572, "completion_tokens": 89, "total_tokens": 661,
                                   "prompt_tokens_details": {"cached_tokens": 100}}
    assert chunks[-1] == "[DONE]"


def test_a_client_that_did_not_ask_for_usage_gets_no_usage_chunk():
    read, write = MessagesStreamReader(), MessagesToChatStream(0, client_wants_usage=False)
    chunks = chunks_of(b"".join(write(event, read(event)) for event in CLAUDE_STREAM))
    assert not any("usage" in c for c in chunks if c != "[DONE]")


# -- errors ---------------------------------------------------------------------------------------


def test_an_openai_error_becomes_anthropics_shape_by_its_status():
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit", "code": None}}).encode()
    assert json.loads(chat_error_to_anthropic(429, body)) == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert json.loads(chat_error_to_anthropic(503, b"<html>busy</html>"))["error"] == {"type": "api_error", "message": "<html>busy</html>"}


def test_a_prompt_too_long_from_claude_is_openais_context_length_exceeded():
    body = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                  "message": "prompt is too long: 250000 tokens > 200000 maximum"}}).encode()
    translated = json.loads(messages_error_to_chat(400, body))["error"]
    assert (translated["type"], translated["code"]) == ("invalid_request_error", "context_length_exceeded")
    assert after_refusal(400, body) == NEXT_TARGET  # untranslated too, between targets


def test_the_gateways_own_errors_on_messages_are_anthropics_with_529_for_open_circuits():
    status, body = gateway_error_body(errors.CIRCUIT_OPEN, "service 'x' is failing", "req-1")
    assert status == 529 and json.loads(body) == {"type": "error", "request_id": "req-1", "error": {
        "type": "overloaded_error", "message": "service 'x' is failing", "txgateway_type": "circuit_open"}}
    assert gateway_error_body(errors.MODEL_NOT_FOUND, "no", "r")[0] == 404
    assert json.loads(gateway_error_body(errors.UPSTREAM_TIMEOUT, "late", "r")[1])["error"]["type"] == "timeout_error"


def test_fields_at_their_no_effect_default_are_as_good_as_absent():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0, "presence_penalty": 0,
            "logprobs": False, "response_format": {"type": "text"}, "seed": None}
    assert chat_request_to_messages(chat, None, 10)["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(Untranslatable):
        chat_request_to_messages({**chat, "frequency_penalty": 0.5}, None, 10)
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "disabled"}}
    assert "thinking" not in messages_request_to_chat(body, None)


# -- hostile bodies ---------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LEAVES = (
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4)
    | st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "base64", "url", "auto", "any", "tool",
                       "none", "function", "data:image/png;base64,AA", "data:x", "{}", '{"a": 1}'])
)
ANY = st.recursive(LEAVES, lambda children: st.lists(children, max_size=2) | st.dictionaries(st.text(max_size=3), children, max_size=2),
                   max_leaves=6)
#: Objects shaped like the APIs' parts (the right keys, any values), to reach every branch.
SHAPED = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "image_url", "file", "function",
                              "thinking", "base64", "url"])},
    optional={key: LEAVES | ANY for key in (
        "text", "source", "content", "input", "id", "name", "tool_use_id", "is_error", "image_url", "file", "url",
        "data", "media_type", "file_data", "function", "arguments", "parameters", "input_schema", "description",
    )},
)
NESTED = st.recursive(SHAPED | LEAVES, lambda children: st.lists(children, max_size=3) | st.builds(
    lambda shaped, key, child: {**shaped, key: child}, SHAPED,
    st.sampled_from(["source", "content", "image_url", "file", "function", "input"]), children), max_leaves=8)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "bot"])},
    optional={"content": NESTED, "tool_calls": NESTED, "tool_call_id": LEAVES},
)


def bodies(fields: list[str]):
    return st.fixed_dictionaries(
        {"messages": st.lists(MESSAGE, max_size=4) | LEAVES},
        optional={field: NESTED for field in fields},
    )


@settings(max_examples=150, deadline=None)
@given(bodies(["system", "max_tokens", "temperature", "stop_sequences", "stream", "metadata", "tools", "tool_choice"]))
def test_any_messages_body_is_translated_or_refused_by_name_never_a_crash(body):
    try:
        messages_request_to_chat(body, "m", prefill="so far ")
    except Untranslatable:
        pass


@settings(max_examples=150, deadline=None)
@given(bodies(["max_tokens", "temperature", "stop", "stream", "user", "tools", "tool_choice", "parallel_tool_calls", "n"]))
def test_any_chat_body_is_translated_or_refused_by_name_never_a_crash(body):
    try:
        chat_request_to_messages(body, "m", 10, prefill="so far ")
    except Untranslatable:
        pass


@settings(max_examples=100, deadline=None)
@given(NESTED | st.fixed_dictionaries({"content": NESTED, "choices": st.lists(st.fixed_dictionaries(
    {"message": st.fixed_dictionaries({}, optional={"content": NESTED, "tool_calls": NESTED})},
    optional={"finish_reason": LEAVES, "stop_reason": LEAVES}), max_size=2), "usage": NESTED, "error": NESTED}))
def test_any_answer_or_error_body_translates_without_a_crash(value):
    raw = json.dumps(value).encode()
    chat_answer_to_message(raw)
    message_answer_to_chat(raw, 0)
    chat_error_to_anthropic(500, raw)
    messages_error_to_chat(500, raw)
    read_message(raw)


@pytest.mark.parametrize(
    ("body", "translate"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": [{"type": "text", "text": None}]}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [5]}]}, "chat"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}, "chat"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": 5}]}]}, "chat"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:nobase64"}}]}]}, "chat"),
        ({"messages": [], "stop": False}, "chat"),
    ],
)
def test_a_body_of_the_wrong_shapes_is_refused_by_name(body, translate):
    with pytest.raises(Untranslatable):
        if translate == "messages":
            messages_request_to_chat(body, "m")
        else:
            chat_request_to_messages(body, "m", 10)


def test_a_backend_answer_of_the_wrong_shapes_passes_as_it_is():
    odd = json.dumps({"choices": [{"message": {"tool_calls": ["x"]}}], "usage": 3}).encode()
    assert chat_answer_to_message(odd) == odd
    odd = json.dumps({"content": [{"type": "text", "text": None}]}).encode()
    assert message_answer_to_chat(odd, 0) == odd


EVENTS = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                              "message_delta", "message_stop", "ping", "error"])},
    optional={key: NESTED for key in ("message", "content_block", "delta", "index", "usage", "error")},
), max_size=5)
CHUNKS = st.lists(st.fixed_dictionaries({}, optional={"id": LEAVES, "usage": NESTED, "choices": NESTED | st.lists(
    st.fixed_dictionaries({}, optional={"index": LEAVES, "finish_reason": LEAVES, "delta": NESTED | st.fixed_dictionaries(
        {}, optional={"content": LEAVES, "tool_calls": NESTED})}), max_size=2)}), max_size=5)


@settings(max_examples=100, deadline=None)
@given(EVENTS)
def test_any_messages_stream_is_read_and_written_as_chunks_without_a_crash(events):
    read, write = MessagesStreamReader(after_space=True), MessagesToChatStream(0, True)
    for event in events:
        raw = sse(str(event["type"]), event)
        write(raw, read(raw))
    write.finish()


@settings(max_examples=100, deadline=None)
@given(CHUNKS)
def test_any_chat_stream_is_written_as_messages_events_without_a_crash(chunks):
    write = ChatToMessagesStream(("w5",))
    for chunk_body in chunks:
        raw = b"data: " + json.dumps(chunk_body).encode() + b"\n\n"
        write(raw, read_chunk(raw))
    write.finish()


def test_the_text_templates_write_what_the_dicts_would():
    read, write = MessagesStreamReader(), MessagesToChatStream(1700000000, client_wants_usage=False)
    [start, delta] = [CLAUDE_STREAM[0], CLAUDE_STREAM[3]]
    write(start, read(start))
    assert json.loads(write(delta, read(delta))[6:]) == {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "claude-sonnet-4-5", "choices": [{"index": 0, "delta": {"content": "Okay"}, "finish_reason": None}]}
    write = ChatToMessagesStream()
    out = b"".join(write(event, read_chunk(event)) for event in GPT_STREAM[:2])
    assert events_of(out)[-1] == ("content_block_delta", {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}})
    orphan = MessagesToChatStream(0, False)
    assert json.loads(orphan(delta, read(delta))[6:])["choices"][0]["delta"] == {"content": "Okay"}


def test_a_backends_reasoning_comes_back_as_a_thinking_block_json_and_streamed():
    from txgateway.anthropic.translate import ChatToMessagesStream, chat_answer_to_message
    from txgateway.openai.wire import read_chunk

    answer = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hi", "reasoning_content": "Think first."}}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    content = json.loads(chat_answer_to_message(json.dumps(answer).encode()))["content"]
    assert content == [{"type": "thinking", "thinking": "Think first.", "signature": ""}, {"type": "text", "text": "Hi"}]
    writer = ChatToMessagesStream()
    chunks = [{"role": "assistant", "content": ""}, {"reasoning_content": "Think "}, {"reasoning": "first."}, {"content": "Hi"}]
    out = b"".join(
        writer(event, read_chunk(event)) for event in (
            b"data: " + json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode()
            + b"\n\n" for delta in chunks
        )
    ) + writer(b"data: [DONE]\n\n", read_chunk(b"data: [DONE]\n\n"))
    events = [json.loads(part.split(b"data: ", 1)[1]) for part in out.split(b"\n\n") if part]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    thoughts = [e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "thinking_delta"]
    assert starts == ["thinking", "text"] and thoughts == ["Think ", "first."]


@pytest.mark.parametrize(("response_format", "shape"), [
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
     {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}),
    ({"type": "json_object"}, {"type": "json_schema", "schema": {"type": "object"}}),
    ({"type": "text"}, None),
])
def test_structured_output_goes_to_claude_as_its_output_format(response_format, shape):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    request = chat_request_to_messages(body, None, 4096)
    assert request.get("output_config") == ({"format": shape} if shape else None)
