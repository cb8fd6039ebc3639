"""
No way around governance, on a Clock: every path of a model API is read
for a governed key (OpenAI's and Anthropic's under C{/api/} too), its body
strictly (what the backend is sent is what was checked), what cannot be
read or priced is refused, and the settle takes the best evidence of what
a call used: a backend's hostile numbers clamped, cumulative usage counted
once, a client that left still paying for what the backend made.
"""

from __future__ import annotations

import json

import pytest
import treq
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from tests.test_anthropic import CLAUDE_STREAM, sse
from tests.test_openai import JSON, SSE, chunk, completion, usage_chunk

INI = GATEWAY_HEAD + """
[service:ai]
url = http://ai.test/v1
retries = 0
[service:claude]
url = http://claude.test
api = anthropic
retries = 0
max_tokens = 4000
[service:priced]
url = http://priced.test/v1
api = openai
retries = 0
request_price_usd = 0.5
[service:rag]
url = http://rag.test
retries = 0
[model:gpt-4o]
targets = ai
[model:claude-sonnet-4-5]
targets = claude
[model:gpt-on-claude]
targets = claude:claude-sonnet-4-5
[key:alice]
secret = alice-secret
models = gpt-4o, claude-sonnet-4-5, gpt-on-claude
budget_usd = 100
[key:open]
secret = open-secret
[price:*]
prompt = 1
completion = 1
"""

ALICE = {"Content-Type": "application/json", "Authorization": "Bearer alice-secret"}
OPEN = {"Content-Type": "application/json", "Authorization": "Bearer open-secret"}


def post(h: Harness, path: str, body: bytes, headers: dict = ALICE, stream: bool = False):
    return h.request("POST", path, data=body, headers=headers, unbuffered=stream)


def error_of(response) -> dict:
    return json.loads(result_of(treq.content(response)))["error"]


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100, **fields}).encode()


def refused(h: Harness, d, status: int, kind: str) -> str:
    response = result_of(d)
    assert response.code == status
    error = error_of(response)
    assert error["type"] == kind
    assert not any(upstream.requests for upstream in h.agents.values())
    return error["message"]


def cost_of(h: Harness) -> float:
    [line] = [line for line in h.access.lines if line.get("event") == "request_completed" or line.get("event") == "request_aborted"]
    return line["cost_usd"]


# -- what the strict reader refuses, before anything is reserved ------------------


@pytest.mark.parametrize(
    "raw, named",
    [
        (b'{"model": "gpt-4o", "model": "cheap", "messages": []}', "'model' appears twice"),
        (b'{"model": "gpt-4o", "messages": [], "temperature": NaN}', "NaN"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (b'{"model": "gpt-4o", "messages": [], "temperature": 1e400}', "out of range"),
        (b'\xef\xbb\xbf{"model": "gpt-4o", "messages": []}', "byte order mark"),
        (b'{"model": "gpt-4o", "messages": [], "max_tokens": "5000"}', "'max_tokens' must be an integer"),
        (b'{"model": "gpt-4o", "messages": [], "max_completion_tokens": 9223372036854775807}', "'max_completion_tokens' must be from 0"),
        (b'{"model": "gpt-4o", "messages": [], "max_tokens": -1}', "'max_tokens' must be from 0"),
        (b'{"model": "gpt-4o", "messages": [], "stream": 1}', "'stream' must be true or false"),
        (b'{"model": "gpt-4o", "messages": [], "n": 0}', "'n' must be from 1"),
        (b'{"model": "gpt-4o", "messages": "hi"}', "'messages' must be an array"),
        (b'{"model": "gpt-4o", "messages": [], "x": ' + b"[" * 70 + b"]" * 70 + b"}", "nests deeper than 64"),
        (b'{"model": "gpt-4o", "messages": [], "x": ' + b"[" * 900 + b"]" * 900 + b"}", "nests deeper than 64"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/ai/chat/completions"])
def test_a_governed_keys_body_the_gateway_cannot_account_for_is_refused_naming_why(raw, named, path):
    h = Harness(INI)
    message = refused(h, post(h, path, raw), 400, "bad_request")
    assert named in message


def test_a_governed_request_with_too_many_messages_is_refused_naming_the_limit():
    h = Harness(INI.replace("[gateway]", "[gateway]\nmax_messages = 3"))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}] * 4}).encode()
    assert "more than the 3 a request may have" in refused(h, post(h, "/v1/chat/completions", body), 400, "bad_request")


def test_a_key_without_limits_keeps_the_passthrough_of_a_body_the_gateway_does_not_read():
    h = Harness(INI)
    raw = b'{"model": "gpt-4o", "messages": [], "temperature": NaN}'
    d = post(h, "/api/ai/chat/completions", raw, headers=OPEN)
    assert h.agents["ai"].last.body == raw
    h.agents["ai"].last.respond(FakeResponse(200, JSON, completion("gpt-4o"))).finish()
    h.flush()
    assert result_of(d).code == 200


def test_what_the_backend_is_sent_is_what_was_checked():
    h = Harness(INI)
    raw = chat_body()
    post(h, "/api/ai/chat/completions", raw)
    assert h.agents["ai"].last.body == raw


# -- every path of a model API is that API -----------------------------------------


def test_a_messages_call_under_api_to_an_anthropic_service_checks_the_keys_models():
    h = Harness(INI)
    body = json.dumps({"model": "claude-opus-4", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode()
    message = refused(h, post(h, "/api/claude/v1/messages", body), 403, "model_not_allowed")
    assert "claude-opus-4" in message


def test_a_messages_call_under_api_is_reserved_and_settled_from_its_usage():
    h = Harness(INI)
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode()
    d = post(h, "/api/claude/v1/messages", body)
    sent = h.agents["claude"].last
    assert sent.uri == b"http://claude.test/v1/messages"  # the client's own path, not /v1/v1/messages
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
               "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 30, "output_tokens": 5}}
    sent.respond(FakeResponse(200, JSON, json.dumps(message).encode())).finish()
    h.flush()
    response = result_of(d)
    assert response.code == 200
    result_of(treq.content(response))
    assert cost_of(h) == pytest.approx(35 / 1e6)


@pytest.mark.parametrize(
    "method, path, body, content_type, status, kind",
    [
        ("POST", "/api/ai/audio/transcriptions", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", 403, "not_governable"),
        ("POST", "/api/ai/images/generations", b'{"model": "dall-e-3", "prompt": "a cat"}', "application/json", 403, "not_governable"),
        ("POST", "/api/ai/chat/completions", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
        ("POST", "/api/claude/v1/messages/batches", b'{"requests": []}', "application/json", 403, "not_governable"),
    ],
)
def test_a_governed_keys_request_the_gateway_cannot_price_is_refused(method, path, body, content_type, status, kind):
    h = Harness(INI)
    d = h.request(method, path, data=body, headers={**ALICE, "Content-Type": content_type})
    refused(h, d, status, kind)


def test_a_read_on_a_model_apis_service_is_free_for_a_governed_key():
    h = Harness(INI)
    d = h.request("GET", "/api/ai/models", headers=ALICE)
    h.agents["ai"].last.respond(FakeResponse(200, JSON, b'{"data": []}')).finish()
    h.flush()
    assert result_of(d).code == 200
    assert cost_of(h) == 0


def test_a_priced_service_charges_a_governed_key_its_request_price_for_what_it_cannot_read():
    h = Harness(INI)
    d = h.request("POST", "/api/priced/audio/transcriptions", data=b"--x\r\n\r\n--x--",
                  headers={**ALICE, "Content-Type": "multipart/form-data; boundary=x"})
    h.agents["priced"].last.respond(FakeResponse(200, JSON, b'{"text": "hello"}')).finish()
    h.flush()
    assert result_of(d).code == 200
    assert cost_of(h) == pytest.approx(0.5)


# -- the reservation covers what the backend is sent ----------------------------------


def test_an_openai_call_translated_to_claude_reserves_the_max_tokens_claude_is_sent():
    h = Harness(INI)
    body = json.dumps({"model": "gpt-on-claude", "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    d = post(h, "/v1/chat/completions", body)
    assert json.loads(h.agents["claude"].last.body)["max_tokens"] == 4000
    h.agents["claude"].last.respond(FakeResponse(500, JSON, b'{"type": "error"}')).finish()
    h.flush()
    result_of(d)
    [line] = h.access.lines
    # "Say hello" + "user": 5 tokens, one message 4: 9 prompt, and the 4,000 Claude was sent.
    assert line["reserved_tokens"] == 9 + 4000


# -- the settle: the best evidence, never a refund -----------------------------------------


def test_a_backends_negative_usage_is_clamped_never_a_refund_and_the_answer_ends():
    h = Harness(INI)
    d = post(h, "/v1/chat/completions", chat_body())
    answer = {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
              "finish_reason": "stop"}], "usage": {"prompt_tokens": -1000000, "completion_tokens": -5}}
    h.agents["ai"].last.respond(FakeResponse(200, JSON, json.dumps(answer).encode())).finish()
    h.flush()
    assert result_of(treq.content(result_of(d)))
    assert cost_of(h) == 0
    assert b'txgateway_usage_clamped_total{key="alice"} 1.0' in h.gateway.metrics.exposition()


def test_a_backends_huge_usage_is_clamped_to_its_bound():
    h = Harness(INI)
    d = post(h, "/v1/chat/completions", chat_body())
    answer = {"id": "c", "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 2**63 - 1, "completion_tokens": 1e300}}
    h.agents["ai"].last.respond(FakeResponse(200, JSON, json.dumps(answer).encode())).finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    assert cost_of(h) == pytest.approx(2 * 100_000_000 / 1e6)


def test_a_stream_reporting_cumulative_usage_on_every_chunk_is_counted_once():
    h = Harness(INI)
    d = post(h, "/v1/chat/completions", chat_body(stream=True), stream=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, SSE))
    running = [
        b"data: " + json.dumps({"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": word},
                                "finish_reason": None}], "usage": {"prompt_tokens": 9, "completion_tokens": n}}).encode() + b"\n\n"
        for n, word in enumerate(["a", "b", "c"], 1)
    ]
    upstream.send(b"".join(running) + chunk(finish="stop") + usage_chunk(9, 3) + b"data: [DONE]\n\n")
    upstream.finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    assert cost_of(h) == pytest.approx(12 / 1e6)


def spent_usd(h: Harness) -> float:
    """What alice's key has spent, from the ledger (an access line is written when the client leaves, before a late settle)."""
    ledger = h.gateway.broker.governor.store.ledger
    return sum(nano for (scope, _), nano in ledger.committed.items() if scope == "key:alice") / 1e9


def left_before_the_answer(h: Harness, **fields):
    d = post(h, "/v1/chat/completions", chat_body(**fields))
    sent = h.agents["ai"].last
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()
    d.addErrback(lambda failure: None)
    return sent


def test_a_json_call_whose_client_left_is_read_on_and_pays_what_the_backend_made():
    h = Harness(INI)
    sent = left_before_the_answer(h, max_tokens=8000)
    assert h.agents["ai"].cancelled == []  # not cut off: the backend goes on making it, its provider bills it
    sent.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=7_900))).finish()
    h.flush()
    assert spent_usd(h) == pytest.approx((9 + 7_900) / 1e6)
    assert h.gateway.broker.governor.store.ledger.holding == 0


def test_a_json_call_whose_client_left_is_not_retried_and_a_refusal_costs_nothing():
    h = Harness(INI.replace("[service:ai]\nurl = http://ai.test/v1\nretries = 0", "[service:ai]\nurl = http://ai.test/v1\nretries = 3"))
    sent = left_before_the_answer(h)
    sent.respond(FakeResponse(503, JSON, b'{"error": "busy"}')).finish()
    h.advance(60)
    assert len(h.agents["ai"].requests) == 1
    assert spent_usd(h) == 0 and h.gateway.broker.governor.store.ledger.holding == 0


def test_a_json_call_whose_client_left_and_whose_backend_fell_silent_pays_its_reservation():
    h = Harness(INI)
    left_before_the_answer(h, max_tokens=500)
    h.advance(60)  # past the service's timeout: nothing was read, the backend may have made it all
    assert spent_usd(h) == pytest.approx((9 + 500) / 1e6)


def left_mid_stream(h: Harness, path: str, body: bytes, upstream_name: str, events: bytes) -> None:
    """A stream whose backend sent C{events}, then whose client left."""
    d = post(h, path, body, stream=True)
    upstream = h.agents[upstream_name].last.respond(FakeResponse(200, SSE))
    upstream.send(events)
    h.flush()
    treq.collect(result_of(d), lambda data: None)
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()


def test_a_native_messages_stream_left_early_pays_its_input_tokens_and_the_text_relayed():
    h = Harness(INI)
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    # message_start (572 input tokens) and "Okay, let's check.", then the client leaves.
    left_mid_stream(h, "/v1/messages", body, "claude", b"".join(CLAUDE_STREAM[:5]))
    # 572 input tokens as message_start said, and 18 bytes of text relayed: 6 tokens.
    assert cost_of(h) == pytest.approx((572 + 6) / 1e6)


def test_a_stream_cut_before_its_usage_counts_the_text_relayed_by_its_length():
    h = Harness(INI)
    left_mid_stream(h, "/v1/chat/completions", chat_body(stream=True), "ai", chunk(role="assistant", content="") + chunk("x" * 300))
    assert cost_of(h) == pytest.approx((9 + 100) / 1e6)


def test_one_sse_event_type_the_messages_reader_ignores_is_no_usage():
    # An unknown event with a usage-like field charges nothing by itself.
    from txgateway.anthropic.wire import MessagesStreamReader

    assert MessagesStreamReader()(sse("surprise", {"type": "surprise", "usage": {"input_tokens": 5}})).usage is None


# -- one credential per request ---------------------------------------------------------


def test_two_different_gateway_keys_in_two_headers_are_ambiguous():
    h = Harness(INI)
    headers = {"Content-Type": "application/json", "X-API-Key": "alice-secret", "Authorization": "Bearer open-secret"}
    refused(h, post(h, "/api/ai/chat/completions", chat_body(), headers=headers), 401, "ambiguous_credentials")


def test_no_gateway_key_reaches_a_backend_whichever_headers_carry_it():
    h = Harness(INI)
    headers = {"Content-Type": "application/json", "X-API-Key": "alice-secret", "Authorization": "Bearer alice-secret"}
    post(h, "/api/ai/chat/completions", chat_body(), headers=headers)
    sent = h.agents["ai"].last.headers
    assert sent.getRawHeaders("authorization") is None and sent.getRawHeaders("x-api-key") is None


def test_a_clients_own_provider_key_beside_its_gateway_key_still_goes_to_a_backend_without_one():
    h = Harness(INI)
    headers = {"Content-Type": "application/json", "X-API-Key": "alice-secret", "Authorization": "Bearer sk-its-own"}
    post(h, "/api/ai/chat/completions", chat_body(), headers=headers)
    assert h.agents["ai"].last.headers.getRawHeaders("authorization") == ["Bearer sk-its-own"]


# -- a reservation lives as long as its call --------------------------------------------

LONG = INI.replace("[service:ai]\nurl = http://ai.test/v1\nretries = 0", "[service:ai]\nurl = http://ai.test/v1\nretries = 0\ndeadline = 2\nidle_timeout = 30").replace(
    "budget_usd = 100", "budget_usd = 0.00015",
) + "[budgets]\nreservation_margin = 1\n"


def test_a_stream_longer_than_its_deadline_keeps_its_reservation_while_it_runs():
    h = Harness(LONG)
    first = post(h, "/v1/chat/completions", chat_body(stream=True), stream=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk(role="assistant", content="") + chunk("a"))
    h.flush()
    treq.collect(result_of(first), lambda data: None)
    for _ in range(20):  # 10 s of a slow stream: five times its deadline and margin
        h.advance(0.5)
        upstream.send(chunk("a"))
    h.flush()
    # The budget holds one call's worst case (109 tokens at $1 a million): the first still holds it.
    second = post(h, "/v1/chat/completions", chat_body(stream=True), stream=True)
    assert error_of(result_of(second))["type"] == "budget_exceeded"
    upstream.send(chunk(finish="stop") + usage_chunk(9, 21) + b"data: [DONE]\n\n")
    upstream.finish()
    h.flush()
    assert h.gateway.broker.governor.store.ledger.holding == 0
    # Nothing runs: the renewal stops within its next half window (not rearmed).
    h.advance(1.0)
    assert not h.clock.getDelayedCalls() or all(call.func.__name__ != "_renew" for call in h.clock.getDelayedCalls())


def test_calls_one_after_another_share_one_renewal_timer():
    h = Harness(LONG)
    renewals = []
    for _ in range(3):
        first = post(h, "/v1/chat/completions", chat_body())
        h.agents["ai"].last.respond(FakeResponse(200, JSON, completion("gpt-4o"))).finish()
        h.flush()
        assert result_of(first).code == 200
        renewals += [call for call in h.clock.getDelayedCalls() if call.func.__name__ == "_renew"]
    # Settled each time with nothing else live, yet not cancelled and made again: one timer.
    assert len({id(call) for call in renewals}) == 1 and renewals[0].active()
    h.advance(1.0)
    assert all(call.func.__name__ != "_renew" for call in h.clock.getDelayedCalls())


def test_a_reservation_nobody_renews_lapses_within_two_windows():
    from txgateway.governance.ledger import Ask, Ledger, ScopeLimits

    ledger = Ledger()
    limits = ScopeLimits("key:gone", budget_nano=100, budget_period="total")
    assert ledger.reserve(Ask("dead", (limits,), 0, 100, 10.0), 0.0).allowed
    assert ledger.renew(["dead"], 12.0) == 1
    assert not ledger.reserve(Ask("next", (limits,), 0, 100, 20.0), 11.0).allowed
    assert ledger.reserve(Ask("after", (limits,), 0, 100, 20.0), 12.0).allowed  # the holder stopped renewing
    assert ledger.renew(["dead", "unknown"], 30.0) == 0


# -- the gateway enforces what it reserved ---------------------------------------------

from tests.test_anthropic import chunks_of, events_of as messages_events_of  # noqa: E402
from txgateway.openai.relays import CUT_SLACK  # noqa: E402

WORDS = b"".join(chunk(f"w{n} ") for n in range(60))


def streamed(h: Harness, path: str, body: dict, upstream_name: str, events: bytes):
    d = post(h, path, json.dumps(body).encode(), stream=True)
    upstream = h.agents[upstream_name].last.respond(FakeResponse(200, SSE))
    upstream.send(events)
    h.flush()
    received = []
    done = treq.collect(result_of(d), received.append)
    h.flush()
    result_of(done)
    return upstream, b"".join(received)


def test_an_openai_stream_past_its_max_tokens_is_cut_at_the_bound_and_ends_for_length():
    h = Harness(INI)
    upstream, body = streamed(h, "/v1/chat/completions", json.loads(chat_body(stream=True, max_tokens=10)), "ai", WORDS)
    chunks = chunks_of(body)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[:-2]]
    assert len(texts) == 10 + CUT_SLACK and texts[-1] == f"w{10 + CUT_SLACK - 1} "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1] == "[DONE]"
    assert upstream.transport.stopped  # the backend is not read (nor its generation paid) any further
    assert cost_of(h) == pytest.approx((9 + 10) / 1e6)  # settled at the bound
    assert b'txgateway_completion_over_bound_total{how="stream_cut",key="alice"} 1.0' in h.gateway.metrics.exposition()


def test_a_stream_of_two_choices_each_in_chunks_of_its_own_is_cut_at_the_bound_of_both():
    # OpenAI sends each choice of an n = 2 stream in chunks of its own: the second's count as much as the first's.
    second = lambda n: (b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [
        {"index": 1, "delta": {"content": f"v{n} "}, "finish_reason": None}]}).encode() + b"\n\n")
    events = b"".join(chunk(f"w{n} ") + second(n) for n in range(60))
    h = Harness(INI)
    upstream, body = streamed(h, "/v1/chat/completions", json.loads(chat_body(stream=True, max_tokens=10, n=2)), "ai", events)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks_of(body) if isinstance(c, dict) and c["choices"]]
    assert len([text for text in contents if text]) == 2 * 10 + CUT_SLACK
    assert upstream.transport.stopped


def test_a_stream_that_keeps_to_its_max_tokens_is_never_cut():
    h = Harness(INI)
    events = b"".join(chunk(f"w{n} ") for n in range(10)) + chunk(finish="length") + usage_chunk(9, 10) + b"data: [DONE]\n\n"
    upstream, body = streamed(h, "/v1/chat/completions", json.loads(chat_body(stream=True, max_tokens=10)), "ai", events)
    upstream.finish()
    assert len(chunks_of(body)) == 12 and not upstream.transport.stopped
    assert cost_of(h) == pytest.approx(19 / 1e6)
    assert b"txgateway_completion_over_bound_total{" not in h.gateway.metrics.exposition()


def _claude_words(count: int) -> bytes:
    start = sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 20, "output_tokens": 1}}})
    block = sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    deltas = b"".join(
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"w{n} "}})
        for n in range(count)
    )
    return start + block + deltas


def test_a_messages_stream_past_its_max_tokens_is_cut_and_ends_as_the_api_ends_one():
    h = Harness(INI)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    upstream, received = streamed(h, "/v1/messages", body, "claude", _claude_words(60))
    events = messages_events_of(received)
    assert [name for name, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert sum(1 for name, _ in events if name == "content_block_delta") == 10 + CUT_SLACK
    assert events[-2][1]["usage"]["output_tokens"] == 10  # what it reserved, as the API says at max_tokens
    assert upstream.transport.stopped
    assert cost_of(h) == pytest.approx((20 + 10) / 1e6)


def test_an_openai_client_of_claude_cut_at_its_bound_gets_a_length_finish():
    h = Harness(INI)
    body = {"model": "gpt-on-claude", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    upstream, received = streamed(h, "/v1/chat/completions", body, "claude", _claude_words(60))
    chunks = chunks_of(received)
    assert [c["choices"][0]["finish_reason"] for c in chunks if isinstance(c, dict) and c.get("choices")][-1] == "length"
    assert chunks[-1] == "[DONE]" and upstream.transport.stopped


def test_a_messages_client_of_an_openai_backend_cut_at_its_bound_gets_max_tokens():
    h = Harness(INI.replace("[model:gpt-4o]\ntargets = ai", "[model:gpt-4o]\ntargets = ai\n[model:via-gpt]\ntargets = ai:gpt-4o")
                .replace("models = gpt-4o,", "models = via-gpt, gpt-4o,"))
    body = {"model": "via-gpt", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    upstream, received = streamed(h, "/v1/messages", body, "ai", WORDS)
    events = messages_events_of(received)
    assert [name for name, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert upstream.transport.stopped


def test_a_json_answer_over_its_bound_is_settled_at_what_it_reported_and_counted():
    h = Harness(INI)
    d = post(h, "/v1/chat/completions", chat_body(max_tokens=10))
    h.agents["ai"].last.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=9, done=500))).finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    assert cost_of(h) == pytest.approx(509 / 1e6)
    assert b'txgateway_completion_over_bound_total{how="json_over",key="alice"} 1.0' in h.gateway.metrics.exposition()


# -- bounded work, for every body the gateway reads ------------------------------------

HUGE = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}] * 120_000}).encode()


@pytest.mark.parametrize("headers", [ALICE, OPEN])
def test_a_body_of_more_objects_than_any_model_takes_is_refused_before_it_is_parsed(headers):
    h = Harness(INI)
    message = refused(h, post(h, "/v1/chat/completions", HUGE, headers=headers), 400, "bad_request")
    assert "more than 100000 objects and arrays" in message


def test_a_key_without_limits_is_held_to_the_messages_limit_on_v1_too():
    h = Harness(INI.replace("[gateway]", "[gateway]\nmax_messages = 3"))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}] * 4}).encode()
    assert "more than the 3" in refused(h, post(h, "/v1/chat/completions", body, headers=OPEN), 400, "bad_request")


def test_a_key_without_limits_gets_a_huge_body_under_api_relayed_unread():
    h = Harness(INI)
    post(h, "/api/ai/chat/completions", HUGE, headers=OPEN)
    assert h.agents["ai"].last.body == HUGE


def test_the_containers_bound_counts_only_bodies_that_could_exceed_it():
    from txgateway.bodies import MAX_CONTAINERS, BadBody, check_containers

    check_containers(b"{" * 1000)  # too small to hold the bound: not counted
    check_containers(b"x" * (3 * MAX_CONTAINERS) + b"{" * MAX_CONTAINERS)
    with pytest.raises(BadBody):
        check_containers(b"x" * (3 * MAX_CONTAINERS) + b"[" * (MAX_CONTAINERS + 1))


def _nested(depth: int) -> object:
    """C{depth} containers, one in the other (lists and objects in turn)."""
    value: object = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("padding", [0, 8000])  # a small body (its brackets counted first) and a large one (walked at once)
def test_a_governed_body_nests_at_most_64_levels_however_large(padding):
    from txgateway.bodies import BadBody, read_strict

    filler = "]}" * (padding // 2)  # brackets in a string are no nesting
    at_bound = json.dumps({"model": "m", "pad": filler, "x": _nested(63)}).encode()  # the body itself is the 64th
    assert read_strict(at_bound)["pad"] == filler
    with pytest.raises(BadBody, match="nests deeper than 64"):
        read_strict(json.dumps({"model": "m", "pad": filler, "x": _nested(64)}).encode())


def _reference_depth(value: object) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None:
        return 0
    return 1 + max([_reference_depth(child) for child in children], default=0)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_json_values, max_size=3) | st.dictionaries(st.text(max_size=2), _json_values, max_size=3))
def test_the_depth_walk_measures_what_a_recursive_walk_does(value):
    from txgateway.bodies import _depth

    assert _depth(value) == _reference_depth(value)


_bodies = st.dictionaries(
    st.text(max_size=4),
    st.recursive(
        st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=20,
    ),
    max_size=5,
)


def _outcome(read, raw: bytes) -> object:
    from txgateway.bodies import BadBody

    try:
        return ("read", read(raw))
    except BadBody as error:
        return ("refused", str(error))


@settings(max_examples=400, deadline=None)
@given(_bodies, st.sampled_from(["orjson", "compact", "compact ascii", "spaced", "twice"]))
def test_a_compact_body_read_at_c_speed_reads_as_the_strict_decoder_reads_it(body, written):
    import orjson

    from txgateway.bodies import _decode_strictly, read_strict

    if written == "orjson":
        try:
            raw = orjson.dumps(body)
        except TypeError:  # an integer past 64 bits
            raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    elif written == "twice":  # the first key written twice, compactly
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if body:
            first = json.dumps(next(iter(body)), ensure_ascii=False).encode()
            raw = b"{" + first + b":0," + raw[1:]
    else:
        raw = json.dumps(body, separators=(", ", ": ") if written == "spaced" else (",", ":"), ensure_ascii=written != "compact").encode()
    assert _outcome(read_strict, raw) == _outcome(_decode_strictly, raw)


@pytest.mark.parametrize("raw, named", [
    (b'{"model":"gpt-4o","model":"cheap","messages":[]}', "'model' appears twice"),
    (b'{"model":"gpt-4o","messages":[],"x":{"a":1,"a":1}}', "'a' appears twice"),
    (b'{"model":"gpt-4o","messages":[],"temperature":NaN}', "NaN"),
    (b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\udc00"}]}', "surrogate"),
    (b'{"model":"gpt-4o","x":' + b"[" * 300 + b"]" * 300 + b"}", "nests deeper than 64"),  # past what orjson writes
])
def test_a_compact_body_is_refused_as_any_other_naming_why(raw, named):
    from txgateway.bodies import BadBody, read_strict

    with pytest.raises(BadBody, match=named):
        read_strict(raw)


def test_a_compact_bodys_integer_past_64_bits_is_read_exactly():
    from txgateway.bodies import read_strict

    assert read_strict(b'{"model":"m","seed":123456789012345678901234567890}\n')["seed"] == 123456789012345678901234567890


def test_tools_are_counted_as_their_compact_json_in_utf8_bytes():
    from txgateway.governance.estimate import estimate_prompt_tokens

    tools = [{"type": "function", "function": {"name": "lire", "description": "é" * 30}}]
    text = json.dumps(tools, separators=(",", ":"), ensure_ascii=False).encode()
    assert estimate_prompt_tokens({"tools": tools}) == -(-len(text) // 3)  # 30 two-byte letters, not 30 \\u escapes
    huge = [{"type": "function", "function": {"name": "n", "seed": 2**70}}]  # past orjson's integers: the same text all the same
    assert estimate_prompt_tokens({"tools": huge}) == -(-len(json.dumps(huge, separators=(",", ":")).encode()) // 3)


def test_client_chosen_model_names_label_at_most_a_thousand_series():
    from twisted.internet.task import Clock

    from txgateway.observability.metrics import MAX_MODEL_LABELS, GatewayMetrics

    metrics = GatewayMetrics(Clock())
    for n in range(MAX_MODEL_LABELS + 500):
        metrics.count_tokens("ai", f"made-up-{n}", "prompt", 1)
        metrics.count_spend("alice", "", f"made-up-{n}", 0.001, 1, 1)
    exposition = metrics.exposition().decode()
    token_series = [line for line in exposition.splitlines() if line.startswith("txgateway_tokens_total{")]
    assert len(token_series) == MAX_MODEL_LABELS + 1
    assert 'txgateway_tokens_total{kind="prompt",model="other",service="ai"} 500.0' in exposition
    assert metrics.model_label("made-up-3") == "made-up-3" and metrics.model_label("new-one") == "other"


# -- cached prompt tokens and resumed calls, through the governor ------------------------

PRICED = GATEWAY_HEAD + """
[service:primary]
url = http://primary.test/v1
retries = 0
resume = prefill
idle_timeout = 4
[model:gpt-4o]
targets = primary
[key:alice]
secret = alice-secret
budget_usd = 100
[price:gpt-4o]
prompt = 2
completion = 10
cached_prompt = 0.5
"""


def test_cached_prompt_tokens_are_settled_at_the_cached_price():
    h = Harness(PRICED)
    d = post(h, "/v1/chat/completions", chat_body())
    answer = json.loads(completion("gpt-4o", prompt=1000, done=10))
    answer["usage"]["prompt_tokens_details"] = {"cached_tokens": 800}
    h.agents["primary"].last.respond(FakeResponse(200, JSON, json.dumps(answer).encode())).finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    # 200 fresh at $2, 800 cached at $0.50, 10 completion at $10 a million.
    assert cost_of(h) == pytest.approx((200 * 2 + 800 * 0.5 + 10 * 10) / 1e6)


def test_a_resumed_call_settles_every_attempts_use():
    h = Harness(PRICED)
    d = post(h, "/v1/chat/completions", chat_body(stream=True), stream=True)
    first = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    first.send(chunk(role="assistant", content="") + chunk("x" * 60))  # 60 bytes, then it breaks
    h.flush()
    received = []
    done = treq.collect(result_of(d), received.append)
    first.fail("connection reset")
    h.flush()
    second = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    second.send(chunk("y" * 30) + chunk(finish="stop") + usage_chunk(40, 12) + b"data: [DONE]\n\n")
    second.finish()
    h.flush()
    result_of(done)
    assert len(h.agents["primary"].requests) == 2
    # The second attempt's usage (40 prompt, 12 completion), and what the first made before it broke:
    # the 90 bytes relayed count 30 tokens, 18 beyond the 12 reported.
    assert cost_of(h) == pytest.approx((40 * 2 + 12 * 10 + 18 * 10) / 1e6)


def test_a_governed_keys_form_upload_on_v1_is_415():
    h = Harness(INI)
    d = h.request("POST", "/v1/audio/transcriptions", data=b"--x\r\n\r\n--x--",
                  headers={**ALICE, "Content-Type": "multipart/form-data; boundary=x"})
    refused(h, d, 415, "unsupported_media_type")


def test_a_models_image_tokens_are_what_each_of_its_images_reserves():
    h = Harness(INI.replace("[model:gpt-4o]\ntargets = ai", "[model:gpt-4o]\ntargets = ai\nimage_tokens = 48169"))
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    body = json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [image, image]}]}).encode()
    d = post(h, "/v1/chat/completions", body)
    h.agents["ai"].last.respond(FakeResponse(500, JSON, b"{}")).finish()
    h.flush()
    result_of(d)
    [line] = h.access.lines
    assert line["reserved_tokens"] == 2 * 48_169 + 2 + 4 + 10  # two images, "user", one message, max_tokens


def test_a_governed_keys_call_to_an_endpoint_that_is_no_model_call_is_refused_on_v1_too():
    h = Harness(INI)
    body = json.dumps({"model": "gpt-4o", "prompt": "a cat", "n": 4}).encode()
    message = refused(h, post(h, "/v1/images/generations", body), 403, "not_governable")
    assert "request_price_usd" in message


def test_a_governed_keys_call_to_a_priced_service_on_v1_pays_the_request_price():
    h = Harness(INI.replace("[model:gpt-4o]\ntargets = ai", "[model:gpt-4o]\ntargets = priced"))
    d = post(h, "/v1/images/generations", json.dumps({"model": "gpt-4o", "prompt": "a cat"}).encode())
    h.agents["priced"].last.respond(FakeResponse(200, JSON, b'{"data": []}')).finish()
    h.flush()
    result_of(treq.content(result_of(d)))
    assert cost_of(h) == pytest.approx(0.5)


def test_an_ungoverned_keys_call_to_any_v1_endpoint_is_routed_as_before():
    h = Harness(INI)
    post(h, "/v1/images/generations", json.dumps({"model": "gpt-4o", "prompt": "a cat"}).encode(), headers=OPEN)
    assert h.agents["ai"].last.uri == b"http://ai.test/v1/images/generations"


def test_every_choice_of_a_stream_counts_toward_its_bound():
    h = Harness(INI)
    choice = lambda index, word: b"data: " + json.dumps({"id": "c1", "model": "gpt-4o", "choices": [
        {"index": index, "delta": {"content": word}, "finish_reason": None}]}).encode() + b"\n\n"
    events = b"".join(choice(n % 2, f"w{n} ") for n in range(200))
    upstream, body = streamed(h, "/v1/chat/completions", json.loads(chat_body(stream=True, max_tokens=10, n=2)), "ai", events)
    relayed = [c for c in chunks_of(body) if isinstance(c, dict) and c["choices"][0]["delta"].get("content")]
    # n = 2 choices of at most 10 each: 20 reserved, and the slack; choice 1's words count as choice 0's do.
    assert len(relayed) == 2 * 10 + CUT_SLACK
    assert upstream.transport.stopped
