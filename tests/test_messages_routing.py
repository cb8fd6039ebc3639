"""
Anthropic's Messages API through the whole gateway in memory, driven by a
Clock: what each kind of target is sent (natively or translated), the
answers and errors translated back, the commit point and failover of a
translated stream, an open circuit as Anthropic's 529, and the provider
named on the spans.
"""

from __future__ import annotations

import json

import treq

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from tests.test_traced_requests import TRACEPARENT, Spans

SSE = {b"content-type": b"text/event-stream"}
JSON = {b"content-type": b"application/json"}

INI = GATEWAY_HEAD + """[service:claude]
url = http://claude.test/v1
api = anthropic
api_key = sk-ant-secret
retries = 0
first_token_timeout = 3
breaker_threshold = 1
max_tokens = 77
[service:claudebare]
url = http://claude-bare.test
api = anthropic
retries = 0
[model:bare]
targets = claudebare:claude-y
[service:gpt]
url = http://gpt.test/v1
api_key = sk-gpt-secret
retries = 0
first_token_timeout = 3
[model:claude]
targets = claude:claude-x
[model:gpt]
targets = gpt:gpt-x
[model:both]
targets = gpt:gpt-x, claude:claude-x
"""

HELLO = [{"role": "user", "content": "Say hello"}]


def messages(h: Harness, model: str, stream: bool = False, headers: dict | None = None, **fields):
    body = {"model": model, "max_tokens": 50, "messages": HELLO, **fields}
    if stream:
        body["stream"] = True
    return h.request(
        "POST", "/v1/messages", data=json.dumps(body).encode(), unbuffered=stream,
        headers={"Content-Type": "application/json", "x-api-key": "client-key", **(headers or {})},
    )


def chat(h: Harness, model: str, **fields):
    body = {"model": model, "messages": HELLO, **fields}
    return h.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def body_of(d) -> tuple[int, dict]:
    response = result_of(d)
    return response.code, json.loads(result_of(treq.content(response)))


def chat_answer(text: str = "Hello!") -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }).encode()


def claude_answer(text: str = "Hello!") -> bytes:
    return json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 3},
    }).encode()


def test_a_message_to_an_anthropic_target_is_sent_natively_with_the_backends_key():
    h = Harness(INI)
    d = messages(h, "claude", headers={"anthropic-beta": "tools-2024"})
    sent = h.agents["claude"].last
    assert sent.uri == b"http://claude.test/v1/messages"
    assert sent.headers.getRawHeaders(b"x-api-key") == [b"sk-ant-secret"]
    assert sent.headers.getRawHeaders(b"anthropic-version") == [b"2023-06-01"]
    assert sent.headers.getRawHeaders(b"anthropic-beta") == [b"tools-2024"]
    assert not sent.headers.hasHeader(b"authorization")
    assert json.loads(sent.body) == {"model": "claude-x", "max_tokens": 50, "messages": HELLO}
    sent.respond(FakeResponse(200, JSON, claude_answer()))
    h.flush()
    code, body = body_of(d)
    assert code == 200 and body["content"] == [{"type": "text", "text": "Hello!"}]
    [line] = h.access.lines
    assert (line["model"], line["prompt_tokens"], line["completion_tokens"]) == ("claude-x", 9, 3)


def test_an_anthropic_url_without_v1_gets_it_as_the_sdks_base_url_does():
    h = Harness(INI)
    messages(h, "bare")
    assert h.agents["claudebare"].last.uri == b"http://claude-bare.test/v1/messages"
    chat(h, "bare")
    assert h.agents["claudebare"].last.uri == b"http://claude-bare.test/v1/messages"


def test_a_message_to_an_openai_target_is_translated_there_and_back():
    h = Harness(INI)
    d = messages(h, "gpt", system="Be brief.", headers={"anthropic-version": "2023-06-01"})
    sent = h.agents["gpt"].last
    assert sent.uri == b"http://gpt.test/v1/chat/completions"
    assert json.loads(sent.body) == {
        "model": "gpt-x", "max_tokens": 50,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
    }
    assert not sent.headers.hasHeader(b"anthropic-version") and not sent.headers.hasHeader(b"x-api-key")
    assert sent.headers.getRawHeaders(b"authorization") == [b"Bearer sk-gpt-secret"]
    sent.respond(FakeResponse(200, JSON, chat_answer()))
    h.flush()
    response = result_of(d)
    raw = result_of(treq.content(response))
    assert response.length == len(raw)  # the translation's own Content-Length
    message = json.loads(raw)
    assert (message["type"], message["content"], message["stop_reason"]) == ("message", [{"type": "text", "text": "Hello!"}], "end_turn")
    assert message["usage"]["input_tokens"] == 9 and message["usage"]["output_tokens"] == 3


def test_a_chat_completion_to_claude_gets_the_services_max_tokens_and_an_openai_answer():
    h = Harness(INI)
    d = chat(h, "claude")
    sent = h.agents["claude"].last
    assert sent.uri == b"http://claude.test/v1/messages" and json.loads(sent.body)["max_tokens"] == 77
    sent.respond(FakeResponse(200, JSON, claude_answer()))
    h.flush()
    code, body = body_of(d)
    assert code == 200 and body["choices"][0]["message"]["content"] == "Hello!"
    assert body["usage"]["prompt_tokens"] == 9 and body["object"] == "chat.completion"


def test_a_backends_error_reaches_the_client_in_its_own_apis_shape():
    h = Harness(INI)
    d = messages(h, "gpt")
    h.agents["gpt"].last.respond(FakeResponse(400, JSON, b'{"error": {"message": "bad temperature", "type": "invalid_request_error"}}'))
    h.flush()
    code, body = body_of(d)
    assert (code, body) == (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad temperature"}})
    d = chat(h, "claude")
    h.agents["claude"].last.respond(FakeResponse(503, {b"content-type": b"text/html"}, b"<html>down</html>"))
    h.flush()
    response = result_of(d)
    assert response.code == 503 and response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(result_of(treq.content(response)))["error"]["message"] == "<html>down</html>"


def test_an_open_circuit_is_anthropics_overloaded_529():
    h = Harness(INI)
    d = messages(h, "claude")
    h.agents["claude"].last.respond(FakeResponse(500, JSON, b'{"type": "error", "error": {"type": "api_error", "message": "x"}}'))
    h.flush()
    assert result_of(d).code == 500  # the backend's own answer, its breaker now open
    code, body = body_of(messages(h, "claude"))
    assert code == 529 and body["error"]["type"] == "overloaded_error" and body["error"]["txgateway_type"] == "circuit_open"


def test_a_translated_stream_silent_past_its_first_token_timeout_falls_over():
    h = Harness(INI)
    d = messages(h, "both", stream=True)
    silent = h.agents["gpt"].last
    silent.respond(FakeResponse(200, SSE))
    h.flush()
    h.advance(3)  # no first token within first_token_timeout
    native = h.agents["claude"].last
    assert native.uri == b"http://claude.test/v1/messages"
    answer = FakeResponse(200, SSE)
    native.respond(answer)
    h.flush()
    answer.send(
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_2","model":"claude-x","usage":{"input_tokens":4}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    answer.finish()
    h.flush()
    body = result_of(treq.content(result_of(d)))
    assert body.count(b"event: message_start") == 1 and b'"text":"Hi"' in body
    [line] = h.access.lines
    assert line["fallback_from"] == ["gpt:gpt-x"] and (line["prompt_tokens"], line["completion_tokens"]) == (4, 1)


def test_spans_name_the_provider_that_answered():
    spans = Spans()
    h = Harness(INI.replace("[service:claude]", "[tracing]\notlp_endpoint = http://collector.test/v1/traces\n[service:claude]"),
                spans=spans)
    d = messages(h, "claude", headers={"traceparent": TRACEPARENT})
    h.agents["claude"].last.respond(FakeResponse(200, JSON, claude_answer()))
    h.flush()
    result_of(treq.content(result_of(d)))
    server, attempt = spans.records
    assert server.attributes["gen_ai.provider.name"] == "anthropic"
    assert attempt.attributes["gen_ai.provider.name"] == "anthropic"
    assert server.attributes["gen_ai.usage.input_tokens"] == 9


def test_the_beta_query_goes_to_an_anthropic_target_and_never_to_an_openai_one():
    h = Harness(INI)
    body = json.dumps({"model": "claude", "max_tokens": 5, "messages": HELLO}).encode()
    h.request("POST", "/v1/messages?beta=true", data=body, headers={"Content-Type": "application/json"})
    assert h.agents["claude"].last.uri == b"http://claude.test/v1/messages?beta=true"
    h.request("POST", "/v1/messages?beta=true", data=body.replace(b'"claude"', b'"gpt"'), headers={"Content-Type": "application/json"})
    assert h.agents["gpt"].last.uri == b"http://gpt.test/v1/chat/completions"


def test_without_a_backend_key_a_translated_call_carries_the_clients_key_in_the_backends_header():
    ini = INI.replace("api_key = sk-ant-secret\n", "").replace("api_key = sk-gpt-secret\n", "")
    h = Harness(ini)
    h.request("POST", "/v1/chat/completions", data=json.dumps({"model": "claude", "messages": HELLO}).encode(),
              headers={"Authorization": "Bearer sk-ant-clients-own"})
    sent = h.agents["claude"].last
    assert sent.headers.getRawHeaders(b"x-api-key") == [b"sk-ant-clients-own"] and not sent.headers.hasHeader(b"authorization")
    messages(h, "gpt", headers={"x-api-key": "sk-clients-openai"})
    sent = h.agents["gpt"].last
    assert sent.headers.getRawHeaders(b"authorization") == [b"Bearer sk-clients-openai"] and not sent.headers.hasHeader(b"x-api-key")


def test_a_gateway_key_never_travels_on_in_the_other_apis_header():
    ini = INI.replace("api_key = sk-ant-secret\n", "") + "[auth]\nkeys = app:gateway-key\n"
    h = Harness(ini)
    h.request("POST", "/v1/chat/completions", data=json.dumps({"model": "claude", "messages": HELLO}).encode(),
              headers={"Authorization": "Bearer gateway-key"})
    sent = h.agents["claude"].last
    assert not sent.headers.hasHeader(b"x-api-key") and not sent.headers.hasHeader(b"authorization")


def test_a_last_retryable_error_whose_body_never_comes_is_the_gateways_own_error():
    h = Harness(INI)
    d = chat(h, "claude")
    stalled = FakeResponse(529, JSON)
    h.agents["claude"].last.respond(stalled)
    h.flush()
    stalled.send(b'{"type": "error", ')
    h.advance(30)  # first_byte_timeout: the rest of the error never came
    code, body = body_of(d)
    assert code == 502 and body["error"]["type"] == "upstream_unavailable" and "answered 529" in body["error"]["message"]


def count_tokens(h: Harness, model: str, key: str = "client-key"):
    body = {"model": model, "messages": HELLO, "system": "Be brief.", "tools": [{"name": "f", "input_schema": {"type": "object"}}]}
    return h.request(
        "POST", "/v1/messages/count_tokens", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "x-api-key": key},
    )


def test_count_tokens_goes_to_an_anthropic_target_as_it_is():
    h = Harness(INI)
    d = count_tokens(h, "claude")
    sent = h.agents["claude"].last
    assert sent.uri == b"http://claude.test/v1/messages/count_tokens"
    assert json.loads(sent.body)["model"] == "claude-x"
    sent.respond(FakeResponse(200, JSON, b'{"input_tokens": 42}'))
    h.flush()
    assert body_of(d) == (200, {"input_tokens": 42})


def test_count_tokens_for_an_openai_target_is_the_gateways_estimate_said_in_a_header():
    h = Harness(INI)
    response = result_of(count_tokens(h, "gpt"))
    assert response.code == 200 and response.headers.getRawHeaders("x-gateway-token-count") == ["estimated"]
    assert json.loads(result_of(treq.content(response)))["input_tokens"] > 0
    assert not h.agents["gpt"].requests


GOVERNED = INI + """[key:alice]
secret = alice-key
models = claude
budget_usd = 0.000001
budget_period = day
[price:*]
prompt = 1000
completion = 1000
"""


def test_a_governed_keys_count_is_checked_against_its_models_and_never_charged():
    h = Harness(GOVERNED)
    for _ in range(3):  # a budget a single real call would spend: a count costs nothing
        d = count_tokens(h, "claude", key="alice-key")
        h.agents["claude"].last.respond(FakeResponse(200, JSON, b'{"input_tokens": 42}'))
        h.flush()
        assert body_of(d) == (200, {"input_tokens": 42})
    code, body = body_of(count_tokens(h, "gpt", key="alice-key"))
    assert code == 403 and body["error"]["type"] == "permission_error"
    assert "gpt" in body["error"]["message"]


def test_a_governed_keys_counts_are_held_to_its_requests_a_minute():
    """A count costs nothing, but it is a request to a backend: the key's requests_per_minute holds it (before: unlimited)."""
    h = Harness(GOVERNED.replace("budget_period = day\n", "budget_period = day\nrequests_per_minute = 2\n"))
    for _ in range(2):
        d = count_tokens(h, "claude", key="alice-key")
        h.agents["claude"].last.respond(FakeResponse(200, JSON, b'{"input_tokens": 42}'))
        h.flush()
        assert body_of(d) == (200, {"input_tokens": 42})
    asked = len(h.agents["claude"].requests)
    code, body = body_of(count_tokens(h, "claude", key="alice-key"))
    assert code == 429 and body["error"]["type"] == "rate_limit_error"
    assert len(h.agents["claude"].requests) == asked


def test_the_messages_apis_other_endpoints_are_still_not_served():
    h = Harness(INI)
    response = result_of(h.request("POST", "/v1/messages/batches", data=b"{}", headers={"Content-Type": "application/json"}))
    assert response.code == 404


def test_a_count_is_never_sent_to_a_fallback_of_another_api_where_it_would_generate():
    h = Harness(GOVERNED.replace("models = claude\n", "models = claude, claude-then-gpt\n")
                + "[model:claude-then-gpt]\ntargets = claude:claude-x, gpt:gpt-x\n")
    d = count_tokens(h, "claude-then-gpt", key="alice-key")
    h.agents["claude"].last.respond(FakeResponse(503, JSON, b'{"type": "error", "error": {"type": "api_error", "message": "down"}}'))
    h.flush()
    code, _ = body_of(d)
    assert code == 503
    assert not h.agents["gpt"].requests  # a translated chat completion: generated, and uncharged
