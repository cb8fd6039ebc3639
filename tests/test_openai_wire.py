"""OpenAI's wire format as pure values: bodies, refusals, events, chunks, usage."""

from __future__ import annotations

import json

import pytest

from txgateway.openai.wire import (
    NEXT_TARGET,
    PASS_THROUGH,
    BadCall,
    EventSplitter,
    OpenAICall,
    after_refusal,
    read_answer,
    read_chunk,
)


def test_events_come_out_whole_whatever_the_reads():
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n") == []
    assert splitter.feed(b"\ndata: b\n\ndata: c") == [b"data: a\n\n", b"data: b\n\n"]
    assert splitter.feed(b"\r\n\r\n: comment\r\n\r\n") == [b"data: c\r\n\r\n", b": comment\r\n\r\n"]
    assert splitter.rest() == b""


def test_a_chunk_says_what_it_carries():
    role = read_chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
    assert not role.token and role.text == ""
    word = read_chunk(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n')
    assert word.token and word.text == "Hi" and not word.finished
    tool = read_chunk(b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}\n\n')
    assert tool.token and tool.tool_call
    finish = read_chunk(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    assert finish.token and finish.finished
    usage = read_chunk(b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
    assert usage.token and usage.usage_only and (usage.usage.model, usage.usage.prompt_tokens) == ("m", 3)
    text = read_chunk(b'data: {"choices":[{"index":0,"text":"Hello"}]}\n\n')
    assert text.token and text.text == "Hello"
    other = read_chunk(b'data: {"choices":[{"index":1,"delta":{"content":"no"}}]}\n\n')
    assert other.text == "" and not other.token
    assert read_chunk(b"data: [DONE]\n\n").done
    assert read_chunk(b": ping\n\n").data is None
    assert read_chunk(b"event: x\ndata: {\"choices\": []}\ndata: \n\n").data == {"choices": []}
    assert read_chunk(b"data: {oops\n\n").malformed.startswith("a chunk that is not JSON")
    assert read_chunk(b"data: [1]\n\n").malformed.startswith("a chunk that is not a JSON object")


def test_the_body_for_a_target_rewrites_the_model_and_asks_for_usage():
    call = OpenAICall.parse(b'{"model":"a","messages":[{"role":"user","content":"q"}],"stream":true}', b"/chat/completions")
    assert call.stream and not call.client_wants_usage and call.resumable_kind
    sent = json.loads(call.body_for("b"))
    assert sent["model"] == "b" and sent["stream_options"] == {"include_usage": True}
    resumed = json.loads(call.body_for("b", prefill="so far"))
    assert resumed["messages"][-1] == {"role": "assistant", "content": "so far"}
    plain = OpenAICall.parse(b'{"model":"a","input":"x"}', b"/embeddings")
    assert plain.body_for("a") == b'{"model":"a","input":"x"}'  # nothing to change: the bytes as sent
    text = OpenAICall.parse(b'{"model":"a","prompt":"Once","stream":true}', b"/completions")
    assert json.loads(text.body_for(None, prefill=" upon"))["prompt"] == "Once upon"
    assert not OpenAICall.parse(b'{"model":"a","n":2,"stream":true}', b"/chat/completions").resumable_kind


@pytest.mark.parametrize("raw", [b"nope", b"[]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_refused(raw):
    with pytest.raises(BadCall):
        OpenAICall.parse(raw, b"/chat/completions")


@pytest.mark.parametrize(
    "code, body, meaning",
    [
        (400, b'{"error":{"code":"context_length_exceeded"}}', NEXT_TARGET),
        (400, b'{"error":{"code":"content_policy_violation"}}', PASS_THROUGH),
        (400, b'{"error":{"type":"content_filter"}}', PASS_THROUGH),
        (400, b'{"error":{"code":null,"message":"bad temperature"}}', PASS_THROUGH),
        (400, b"not json", PASS_THROUGH),
        (401, None, NEXT_TARGET),
        (403, None, NEXT_TARGET),
        (404, None, NEXT_TARGET),
        (409, None, PASS_THROUGH),
        (422, None, PASS_THROUGH),
    ],
)
def test_what_a_refusal_means_between_targets(code, body, meaning):
    assert after_refusal(code, body) == meaning


def test_what_a_json_answer_says_of_itself():
    facts = read_answer(
        b'{"id":"chatcmpl-1","model":"m","choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":7}}'
    )
    assert (facts.usage.model, facts.usage.prompt_tokens, facts.usage.completion_tokens) == ("m", 5, 7)
    assert facts.response_id == "chatcmpl-1" and facts.finish_reasons == ("stop", "length")
    embeddings = read_answer(b'{"data":[],"id":7}')
    assert embeddings.usage is None and embeddings.response_id is None and embeddings.finish_reasons == ()
    assert read_answer(b"<html>") == read_answer(b"[1]") == read_answer(b"") and read_answer(b"<html>").usage is None


def test_a_chunk_carries_the_finish_reason_of_every_choice():
    chunk = read_chunk(
        b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"length"},{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    assert chunk.finished and chunk.finish_reasons == ("length", "stop")
    other = read_chunk(b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}\n\n')
    assert not other.finished and other.finish_reasons == ("stop",)
    assert read_chunk(b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n').finish_reasons == ()
