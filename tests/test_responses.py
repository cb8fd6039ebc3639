"""
OpenAI's Responses API on a Clock: to native targets (routed by model, its
stream read event by event: the commit point, the end event, errors; its
usage settled from response.completed), translated to chat completions
(requests, JSON answers, the event sequence of a stream), and no
translation yet to Claude.
"""

from __future__ import annotations

import gc
import json
import types

import pytest
import treq

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from tests.test_openai import SSE, JSON, chunk, completion, error_of, harness, stream_of, usage_chunk
from tests import test_governance
from txgateway.responses.wire import ResponsesCall, ResponsesStreamReader, read_response


def native() -> Harness:
    """The OpenAI test gateway with both services taking the Responses API as it is."""
    return harness(primary="responses = native", local="responses = native")


def responses(h: Harness, model: str = "gpt-4o", stream: bool = False, key: str = "client-key", **fields):
    body = {"model": model, "input": "Say hello", **fields}
    if stream:
        body["stream"] = True
    return h.request(
        "POST", "/v1/responses", data=json.dumps(body).encode(), unbuffered=stream,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )


def event(kind: str, sequence: int, **data) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, "sequence_number": sequence, **data}).encode() + b"\n\n"


RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4o", "status": "in_progress"}
USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 13,
         "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 34}


def created() -> bytes:
    return event("response.created", 0, response=RESPONSE)


def text_delta(text: str, sequence: int) -> bytes:
    return event("response.output_text.delta", sequence, item_id="msg_1", output_index=0, content_index=0, delta=text)


def completed(sequence: int) -> bytes:
    return event("response.completed", sequence, response={**RESPONSE, "status": "completed", "usage": USAGE})


def test_a_responses_call_is_routed_by_its_model_and_sent_as_it_is_with_the_targets_model():
    h = native()
    d = responses(h, model="gpt-4o", max_output_tokens=50)
    sent = h.agents["primary"].last
    assert sent.uri == b"http://primary.test/v1/responses"
    assert json.loads(sent.body) == {"model": "gpt-4o", "input": "Say hello", "max_output_tokens": 50}
    answer = {**RESPONSE, "status": "completed", "output": [], "usage": USAGE}
    sent.respond(FakeResponse(200, JSON, json.dumps(answer).encode()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"], line["model"]) == (21, 13, "gpt-4o")


def test_a_stream_commits_at_its_first_output_delta_and_is_whole_at_response_completed():
    h = native()
    d = responses(h, stream=True)
    backend = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    backend.send(created() + event("response.in_progress", 1, response=RESPONSE))
    h.flush()
    backend.send(text_delta("Hello", 2) + text_delta(" there", 3) + completed(4))
    backend.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    h.flush()
    body = b"".join(received)
    assert body.count(b"event: response.output_text.delta") == 2 and b"event: response.completed" in body
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"], line["status"]) == (21, 13, 200)


def test_a_stream_that_ends_before_response_completed_and_its_first_output_is_a_failed_attempt():
    h = native()
    d = responses(h, stream=True)
    backend = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    backend.send(created())
    backend.finish()
    h.flush()
    # The next target serves it.
    local = h.agents["local"].last
    assert json.loads(local.body)["model"] == "llama3"
    answer = local.respond(FakeResponse(200, SSE))
    answer.send(created() + text_delta("Hi", 1) + completed(2))
    answer.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    h.flush()
    assert response.headers.getRawHeaders("x-gateway-fallback-from") == ["primary:gpt-4o"]


def test_a_response_failed_event_before_the_first_output_is_a_failed_attempt():
    h = native()
    d = responses(h, stream=True)
    backend = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    backend.send(created() + event("response.failed", 1, response={**RESPONSE, "status": "failed",
                                                                    "error": {"code": "server_error", "message": "boom"}}))
    backend.finish()
    h.flush()
    assert h.agents["local"].requests  # moved on
    d.cancel()


def test_a_stream_broken_after_its_first_output_ends_with_the_apis_error_event_and_no_end():
    h = native()
    d = responses(h, stream=True)
    backend = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    backend.send(created() + text_delta("Hello", 1))
    h.flush()
    response, received, done = stream_of(h, d)
    backend.finish()  # ended without response.completed
    h.flush()
    body = b"".join(received)
    assert b"event: error" in body
    error = json.loads(body.split(b"event: error\ndata: ", 1)[1].split(b"\n\n", 1)[0])
    assert error["type"] == "error" and error["code"] == "stream_broken" and error["request_id"]
    assert b"response.completed" not in body
    assert h.agents["local"].requests == []  # a Responses stream is not resumed


CLAUDE = GATEWAY_HEAD + "[service:claude]\nurl = http://claude.test\napi = anthropic\nmax_tokens = 300\n[model:claude-x]\ntargets = claude:claude-real\n"


def claude_event(kind: str, **data) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **data}).encode() + b"\n\n"


def test_a_responses_call_to_claude_is_sent_as_messages_and_answered_as_a_response():
    h = Harness(CLAUDE)
    d = responses(h, model="claude-x", instructions="Be brief.")
    sent = h.agents["claude"].last
    assert sent.uri == b"http://claude.test/v1/messages"
    body = json.loads(sent.body)
    assert (body["model"], body["max_tokens"], body["system"]) == ("claude-real", 300, "Be brief.")
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-real",
               "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 12, "output_tokens": 3}}
    sent.respond(FakeResponse(200, JSON, json.dumps(message).encode()))
    h.flush()
    answer = json.loads(result_of(treq.content(result_of(d))))
    assert answer["object"] == "response" and answer["output"][0]["content"][0]["text"] == "Hello!"
    assert (answer["usage"]["input_tokens"], answer["usage"]["output_tokens"]) == (12, 3)
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"]) == (12, 3)


def test_a_claude_stream_comes_back_as_the_responses_event_sequence():
    h = Harness(CLAUDE)
    d = responses(h, model="claude-x", stream=True)
    backend = h.agents["claude"].last.respond(FakeResponse(200, SSE))
    backend.send(
        claude_event("message_start", message={"id": "msg_1", "model": "claude-real", "usage": {"input_tokens": 12, "output_tokens": 1}})
        + claude_event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        + claude_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hel"})
        + claude_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "lo"})
        + claude_event("content_block_stop", index=0)
        + claude_event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2})
        + claude_event("message_stop")
    )
    backend.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    h.flush()
    events = events_of(b"".join(received))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello"
    assert events[-1]["response"]["usage"]["output_tokens"] == 2
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_governed_responses_call_reserves_max_output_tokens_and_settles_what_response_completed_says():
    h = Harness(test_governance.INI.format(alice="").replace(
        "[service:primary]\nurl = http://primary.test/v1\n", "[service:primary]\nurl = http://primary.test/v1\nresponses = native\n"))
    d = responses(h, key="alice-secret", max_output_tokens=100)
    sent = h.agents["primary"].last
    answer = {**RESPONSE, "status": "completed", "output": [], "usage": USAGE}
    sent.respond(FakeResponse(200, JSON, json.dumps(answer).encode()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert line["reserved_tokens"] >= 100
    # 21 input tokens (5 of them cached, which this price does not set apart) at $2.5/M, 13 output at $10/M.
    assert abs(line["cost_usd"] - (21 * 2.5 + 13 * 10) / 1e6) < 1e-9


def test_the_reader_reads_usage_and_the_function_call_as_a_commit():
    reader = ResponsesStreamReader()
    added = reader(event("response.output_item.added", 1, output_index=0, item={"type": "function_call", "id": "fc_1"}))
    assert added.token and added.tool_call
    end = reader(completed(5))
    assert end.done and end.finished and (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.cached_tokens) == (21, 13, 5)
    assert reader(b"data: [DONE]\n\n").malformed  # not this API's


def test_a_json_answer_says_its_usage_id_and_status():
    facts = read_response(json.dumps({**RESPONSE, "status": "completed", "usage": USAGE}).encode())
    assert (facts.response_id, facts.finish_reasons, facts.usage.completion_tokens) == ("resp_1", ("completed",), 13)
    assert ResponsesCall.parse(b'{"model": "m", "max_output_tokens": 7}').max_tokens == 7


def test_a_responses_call_under_api_is_read_the_same_way():
    h = native()
    d = h.request("POST", "/api/primary/responses", data=json.dumps({"model": "gpt-4o", "input": "hi"}).encode(),
                  headers={"Content-Type": "application/json"})
    sent = h.agents["primary"].last
    assert sent.uri == b"http://primary.test/v1/responses"
    sent.respond(FakeResponse(200, JSON, json.dumps({**RESPONSE, "status": "completed", "usage": USAGE}).encode()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"]) == (21, 13)


# -- translated to chat completions (responses = chat, the default)


def events_of(body: bytes) -> list[dict]:
    return [json.loads(part.split(b"data: ", 1)[1]) for part in body.split(b"\n\n") if b"data: " in part]


def test_a_responses_call_to_a_chat_target_is_sent_as_a_chat_request():
    h = harness()
    responses(h, instructions="Be brief.", input=[
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2+2?"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{\"a\": 2}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "4"},
    ], tools=[{"type": "function", "name": "add", "parameters": {"type": "object"}}, {"type": "web_search"}],
        tool_choice="auto", max_output_tokens=64, reasoning={"effort": "low"}, text={"format": {"type": "json_object"}},
        prompt_cache_key="k", store=True, safety_identifier="user-7")
    sent = h.agents["primary"].last
    assert sent.uri == b"http://primary.test/v1/chat/completions"
    body = json.loads(sent.body)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    assert body["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert (body["max_tokens"], body["reasoning_effort"], body["response_format"], body["user"]) == (64, "low", {"type": "json_object"}, "user-7")
    assert "prompt_cache_key" not in body and "store" not in body


def test_a_field_with_no_chat_equivalent_is_refused_by_name():
    h = harness()
    response = result_of(responses(h, previous_response_id="resp_0"))
    assert response.code == 400 and "previous_response_id" in error_of(response)["message"]


def test_a_chat_answer_comes_back_as_a_response_with_its_usage_counted():
    h = harness()
    d = responses(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", text="Hello!", prompt=9, done=3)))
    h.flush()
    answer = json.loads(result_of(treq.content(result_of(d))))
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0] == {"type": "output_text", "text": "Hello!", "annotations": []}
    assert answer["usage"]["input_tokens"] == 9 and answer["usage"]["output_tokens"] == 3
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"]) == (9, 3)


def test_a_chat_stream_comes_back_as_the_responses_event_sequence():
    h = harness()
    d = responses(h, stream=True)
    backend = h.agents["primary"].last
    assert json.loads(backend.body)["stream_options"] == {"include_usage": True}
    answer = backend.respond(FakeResponse(200, SSE))
    answer.send(chunk(role="assistant") + chunk("Hel") + chunk("lo") + chunk(finish="stop") + usage_chunk(9, 2) + b"data: [DONE]\n\n")
    answer.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    h.flush()
    events = events_of(b"".join(received))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["usage"]["output_tokens"] == 2


def front_frames(gateway) -> list[str]:
    """The coroutines of C{gateway}'s front waiting now (each a frame a stream keeps for as long as it lasts)."""
    return sorted(
        o.__qualname__ for o in gc.get_objects()
        if isinstance(o, types.CoroutineType) and o.__qualname__.startswith("ProxiedRequests.") and o.cr_frame is not None
        and getattr(o.cr_frame.f_locals.get("self"), "gateway", None) is gateway
    )


def test_a_kept_turns_stream_waits_in_no_frame_of_the_turns_own_and_the_next_turn_goes_on_from_its_response():
    import structlog

    from txgateway.responses.conversations import Conversations
    from txgateway.responses.store import MemoryResponseStore

    h = harness()
    h.gateway.conversations = Conversations(MemoryResponseStore(h.clock, 10), h.clock, 3600.0, 100_000, structlog.get_logger("test"))
    first = responses(h, stream=True)
    answer = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    answer.send(chunk(role="assistant") + chunk("Hel"))
    h.flush()
    _, received, done = stream_of(h, first)
    assert front_frames(h.gateway) == ["ProxiedRequests._served"]
    answer.send(chunk("lo") + chunk(finish="stop") + usage_chunk(9, 2) + b"data: [DONE]\n\n")
    answer.finish()
    h.flush()
    result_of(done)
    response_id = events_of(b"".join(received))[-1]["response"]["id"]
    # The next turn goes on from it: found, sent on with it, and its own stream waits as the first did.
    second = responses(h, stream=True, previous_response_id=response_id)
    sent = json.loads(h.agents["primary"].last.body)
    assert [message["content"] for message in sent["messages"]] == ["Say hello", "Hello", "Say hello"]
    answer = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    answer.send(chunk(role="assistant") + chunk("Again"))
    h.flush()
    _, received, done = stream_of(h, second)
    assert front_frames(h.gateway) == ["ProxiedRequests._served"]
    answer.send(chunk(finish="stop") + b"data: [DONE]\n\n")
    answer.finish()
    h.flush()
    result_of(done)
    second_id = events_of(b''.join(received))[-1]['response']['id']
    third = result_of(h.request("GET", f"/v1/responses/{second_id}", headers={"Authorization": "Bearer client-key"}))
    assert third.code == 200
    # A turn that goes on and asks store: false is answered, its earlier turns sent, and nothing of it kept.
    fourth = responses(h, previous_response_id=second_id, store=False)
    assert len(json.loads(h.agents["primary"].last.body)["messages"]) == 5
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", "Done")))
    h.flush()
    answer = json.loads(result_of(treq.content(result_of(fourth))))
    assert answer["output"][0]["content"][0]["text"] == "Done"
    unkept = result_of(h.request("GET", f"/v1/responses/{answer['id']}", headers={"Authorization": "Bearer client-key"}))
    assert unkept.code == 404


def test_a_tool_call_stream_becomes_a_function_call_item():
    from txgateway.openai.wire import read_chunk
    from txgateway.responses.translate import ChatToResponsesStream

    writer = ChatToResponsesStream(1)
    out = b""
    for data in (
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_9", "type": "function", "function": {"name": "add", "arguments": ""}}]}}]},
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}}]},
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}}]},
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ):
        event = b"data: " + json.dumps(data).encode() + b"\n\n"
        out += writer(event, read_chunk(event))
    out += writer(b"data: [DONE]\n\n", read_chunk(b"data: [DONE]\n\n"))
    events = events_of(out)
    kinds = [e["type"] for e in events]
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.delta", "response.function_call_arguments.done",
                         "response.output_item.done", "response.completed"]
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["call_id"], item["name"], item["arguments"]) == ("function_call", "call_9", "add", "{\"a\": 1}")


def test_a_long_translated_stream_holds_about_its_texts_bytes_and_answers_it_whole():
    import tracemalloc

    from txgateway.openai.wire import read_chunk
    from txgateway.responses.translate import ChatToResponsesStream

    # A chat stream of minutes: thousands of deltas of a few characters, said whole at its end.
    events = [b"data: " + json.dumps({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": f"w{n % 10}rd"}}]}).encode()
              + b"\n\n" for n in range(20_000)]
    tracemalloc.start()
    try:
        writer = ChatToResponsesStream(1)
        for event in events:
            writer(event, read_chunk(event))  # each delta's text a string of its own, as a relay reads it
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2 * 80_000  # each delta kept as a string of its own: about 1.1 MB
    end = events_of(writer(b"data: [DONE]\n\n", read_chunk(b"data: [DONE]\n\n")))
    assert end[0]["type"] == "response.output_text.done" and end[0]["text"] == "".join(f"w{n % 10}rd" for n in range(20_000))
    assert end[-1]["response"]["output"][0]["content"][0]["text"] == end[0]["text"]
    assert end[-1]["response"]["id"] == "resp_c1" and end[-1]["response"]["model"] == "m"


def _random_chat_stream(rng) -> list[bytes]:
    """A chat stream's events, each of a kind a backend may send, well-formed or not."""
    def event(**choice) -> bytes:
        return b"data: " + json.dumps({"id": "c1", "model": "m", "choices": [{"index": 0, **choice}]}).encode() + b"\n\n"

    def text() -> str:
        return rng.choice(["a", " ", "Hé", "日本", "\n", "word ", "a\ud800", ""])

    kinds = [
        lambda: event(delta={"content": text()}),
        lambda: event(delta={"content": text()}),
        lambda: event(delta={"content": text()}),
        lambda: event(delta={"reasoning_content": text()}),
        lambda: event(delta={"reasoning_content": text(), "content": text()}),
        lambda: event(delta={"tool_calls": [{"index": 0, "id": f"call_{rng.randrange(3)}", "function": {"name": "f", "arguments": "{}"}}]}),
        lambda: event(delta={"content": text()}, finish_reason="stop"),
        lambda: event(text=text()),  # a text completion's chunk: the transcript keeps its text, no message takes it
        lambda: b"data: " + json.dumps({"id": "c1", "model": "m", "choices": [
            {"index": 0, "delta": {"content": text()}}, {"index": 0, "delta": {"content": text()}}]}).encode() + b"\n\n",
    ]
    return [rng.choice(kinds)() for _ in range(rng.randrange(1, 14))] + [b"data: [DONE]\n\n"]


def test_a_translated_stream_whose_text_its_transcript_keeps_writes_every_event_as_one_that_keeps_its_own():
    import random

    from txgateway.openai.wire import read_chunk
    from txgateway.responses.translate import ChatToResponsesStream
    from txgateway.speaking import Transcript

    rng = random.Random(35)
    for run in range(400):
        stream = _random_chat_stream(rng)
        transcript = Transcript(resumable=run % 4 != 0)  # most keep their text, as where targets resume
        shared, alone = ChatToResponsesStream(1, response_id="resp_1"), ChatToResponsesStream(1, response_id="resp_1")
        shared.text_kept_by(transcript)
        written = [b"", b""]
        for event in stream:
            facts = read_chunk(event)
            transcript.sent(facts, first_stream=True)  # as the relay: the transcript first, then the writer
            written[0] += shared(event, facts)
            written[1] += alone(event, read_chunk(event))
        assert written[0] == written[1], stream

# -- Codex's transports


def test_a_websocket_upgrade_is_refused_with_426_so_the_client_uses_http():
    h = harness()
    response = result_of(h.request("GET", "/v1/responses", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                                     "Authorization": "Bearer client-key"}))
    assert response.code == 426 and error_of(response)["type"] == "upgrade_required"


def gzipped_responses(h: Harness, raw: bytes, encoding: str = "gzip"):
    return h.request("POST", "/v1/responses", data=raw, headers={
        "Content-Type": "application/json", "Content-Encoding": encoding, "Authorization": "Bearer client-key"})


def test_a_gzip_body_is_decoded_and_sent_on_decoded():
    import gzip

    h = native()
    body = json.dumps({"model": "gpt-4o", "input": "Say hello"}).encode()
    d = gzipped_responses(h, gzip.compress(body))
    sent = h.agents["primary"].last
    assert json.loads(sent.body) == {"model": "gpt-4o", "input": "Say hello"}
    assert not sent.headers.hasHeader(b"content-encoding")
    sent.respond(FakeResponse(200, JSON, json.dumps({**RESPONSE, "status": "completed", "usage": USAGE}).encode()))
    h.flush()
    assert result_of(d).code == 200
    assert h.server_factory.bodies_held == 0  # the compressed bytes held were given back, not the decoded ones


def test_a_body_in_an_encoding_the_gateway_does_not_decode_is_415_never_read_as_json():
    h = harness()
    response = result_of(gzipped_responses(h, b"\x28\xb5\x2f\xfd...", "zstd"))
    assert response.code == 415 and "zstd" in error_of(response)["message"]
    assert h.agents["primary"].requests == []


def test_a_gzip_body_over_the_limit_once_decoded_is_413_and_a_broken_one_400():
    import gzip

    h = Harness(GATEWAY_HEAD.replace("[gateway]\n", "[gateway]\nmax_body_size = 1000\n", 1)
                + "[service:primary]\nurl = http://primary.test/v1\napi = openai\n[model:gpt-4o]\ntargets = primary\n")
    bomb = gzip.compress(json.dumps({"model": "gpt-4o", "input": "x" * 100_000}).encode())
    response = result_of(gzipped_responses(h, bomb))
    assert response.code == 413 and error_of(response)["type"] == "body_too_large"
    response = result_of(gzipped_responses(h, gzip.compress(b'{"model": "gpt-4o"}')[:-10]))
    assert response.code == 400


def test_built_in_tools_left_out_for_a_chat_target_are_named_in_the_answer():
    h = harness()
    d = responses(h, tools=[{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {}}])
    sent = h.agents["primary"].last
    assert [tool["function"]["name"] for tool in json.loads(sent.body)["tools"]] == ["f"]
    sent.respond(FakeResponse(200, JSON, completion("gpt-4o")))
    h.flush()
    assert result_of(d).headers.getRawHeaders("x-gateway-dropped-tools") == ["web_search"]


def test_a_service_that_refuses_built_in_tools_is_left_out_and_the_call_refused_by_name():
    h = harness(primary="builtin_tools = refuse", local="builtin_tools = refuse")
    response = result_of(responses(h, tools=[{"type": "web_search"}]))
    assert response.code == 400 and "web_search" in error_of(response)["message"]
    assert h.agents["primary"].requests == []


def test_namespace_tools_are_flattened_for_a_chat_target_and_named_back_in_the_answer():
    h = harness()
    namespace = {"type": "namespace", "name": "multi_agent_v1", "tools": [{"type": "function", "name": "spawn", "parameters": {}}]}
    d = responses(h, tools=[namespace], input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c0", "name": "spawn", "namespace": "multi_agent_v1", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c0", "output": "spawned"},
    ])
    sent = h.agents["primary"].last
    body = json.loads(sent.body)
    assert [tool["function"]["name"] for tool in body["tools"]] == ["multi_agent_v1__spawn"]
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == "multi_agent_v1__spawn"
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "tool_calls",
              "message": {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_2", "type": "function", "function": {"name": "multi_agent_v1__spawn", "arguments": "{}"}}]}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    sent.respond(FakeResponse(200, JSON, json.dumps(answer).encode()))
    h.flush()
    [item] = json.loads(result_of(treq.content(result_of(d))))["output"]
    assert (item["type"], item["namespace"], item["name"], item["call_id"]) == ("function_call", "multi_agent_v1", "spawn", "call_2")


def test_input_tokens_for_a_chat_target_are_the_gateways_estimate_said_in_a_header():
    h = harness()
    response = result_of(h.request("POST", "/v1/responses/input_tokens", data=json.dumps(
        {"model": "gpt-4o", "input": "Say hello to the whole wide world"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"}))
    assert response.code == 200 and response.headers.getRawHeaders("x-gateway-token-count") == ["estimated"]
    counted = json.loads(result_of(treq.content(response)))
    assert counted["object"] == "response.input_tokens" and counted["input_tokens"] > 5
    assert h.agents["primary"].requests == []


def test_input_tokens_for_a_native_target_are_its_own():
    h = native()
    d = h.request("POST", "/v1/responses/input_tokens", data=json.dumps({"model": "gpt-4o", "input": "hi"}).encode(),
                  headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"})
    sent = h.agents["primary"].last
    assert sent.uri == b"http://primary.test/v1/responses/input_tokens"
    sent.respond(FakeResponse(200, JSON, b'{"object": "response.input_tokens", "input_tokens": 7}'))
    h.flush()
    assert json.loads(result_of(treq.content(result_of(d))))["input_tokens"] == 7


def test_hostile_fields_of_a_translated_call_are_refused_by_name_never_a_crash():
    from txgateway.responses.translate import responses_request_to_chat
    from txgateway.speaking import Untranslatable

    for body in (
        {"model": "m", "input": "x", "max_output_tokens": True},
        {"model": "m", "input": 7},
        {"model": "m", "input": [None]},
        {"model": "m", "input": [{"type": "message", "role": "boss", "content": "x"}]},
        {"model": "m", "input": [{"role": "assistant", "content": [{"type": "input_image", "file_id": "f"}]}]},
        {"model": "m", "input": "x", "tools": "all"},
        {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search"}},
        {"model": "m", "input": "x", "text": {"format": {"type": "grammar"}}},
        {"model": "m", "input": "x", "surprise": 1},
    ):
        with pytest.raises(Untranslatable):
            responses_request_to_chat(body, "m")


def test_a_hostile_chat_answer_is_translated_or_passed_as_it_is_never_a_crash():
    from txgateway.openai.wire import read_chunk
    from txgateway.responses.translate import ChatToResponsesStream, chat_answer_to_response

    for answer in (b"not json", b"[]", b'{"choices": 5}', b'{"choices": [{"message": {"tool_calls": 7, "content": 3}}]}',
                   b'{"choices": [{"message": {"tool_calls": ["x", {"function": 1}]}}], "usage": "lots"}'):
        chat_answer_to_response(answer, 1)
    writer = ChatToResponsesStream(1)
    for data in (b'{"choices": 5}', b'{"id": 3, "choices": [{"delta": {"tool_calls": 9, "content": 4}}]}',
                 b'{"choices": [{"delta": {"tool_calls": [{"function": "f"}]}, "finish_reason": "stop"}], "usage": 1}'):
        event = b"data: " + data + b"\n\n"
        writer(event, read_chunk(event))
    writer(b"data: [DONE]\n\n", read_chunk(b"data: [DONE]\n\n"))


@pytest.mark.parametrize("field", [{"background": True}, {"previous_response_id": "resp_0"}, {"conversation": "conv_1"},
                                   {"prompt": {"id": "pmpt_1"}}])
def test_a_governed_keys_responses_call_the_gateway_cannot_bound_is_refused_on_api_paths(field):
    h = Harness(test_governance.INI.format(alice="").replace("services = files", "services = files, primary").replace(
        "[service:primary]\nurl = http://primary.test/v1\n", "[service:primary]\nurl = http://primary.test/v1\nresponses = native\n"))
    body = {"model": "gpt-4o", "input": "hi", **field}
    response = result_of(h.request("POST", "/api/primary/responses", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json", "Authorization": "Bearer alice-secret"}))
    assert response.code == 403 and error_of(response)["type"] == "not_governable"
    assert next(iter(field)) in error_of(response)["message"]
    assert not h.agents["primary"].requests  # never sent: it would run (or read input) where nothing is reserved for it


def test_an_ungoverned_callers_background_call_on_an_api_path_goes_as_it_is():
    h = native()
    body = {"model": "gpt-4o", "input": "hi", "background": True}
    d = h.request("POST", "/api/primary/responses", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    sent = h.agents["primary"].last
    assert json.loads(sent.body)["background"] is True
    sent.respond(FakeResponse(200, JSON, json.dumps({**RESPONSE, "status": "queued"}).encode()))
    h.flush()
    assert result_of(d).code == 200
