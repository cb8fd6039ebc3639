"""
The OpenAI side of the gateway on a Clock: models and their targets,
deployment breakers, the 4xx rules between targets, the token commit point,
resuming a broken stream, token usage, and the backends' keys.
"""

from __future__ import annotations

import json

import pytest
import treq
from twisted.internet.defer import Deferred

from tests.fakes import GATEWAY_HEAD, FakeResponse, Harness, result_of
from txgateway.config.gateway import ConfigError, parse_config

SSE = {b"content-type": b"text/event-stream"}
JSON = {b"content-type": b"application/json"}

INI = GATEWAY_HEAD + """[service:primary]
url = http://primary.test/v1
api_key = sk-primary-secret
retries = {retries}
first_byte_timeout = 5
first_token_timeout = 3
idle_timeout = 4
resume = {primary_resume}
{primary}
[service:local]
url = http://local.test/v1
retries = 0
resume = {local_resume}
{local}
[model:gpt-4o]
targets = primary, local:llama3
{models}
"""


def harness(
    primary: str = "", local: str = "", models: str = "", environ: dict | None = None, retries: int = 0,
    primary_resume: str = "prefill", local_resume: str = "prefill",
) -> Harness:
    text = INI.format(
        primary=primary, local=local, models=models, retries=retries, primary_resume=primary_resume, local_resume=local_resume
    )
    return Harness(text, environ)


def chat(h: Harness, model: str = "gpt-4o", stream: bool = False, **fields) -> Deferred:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], **fields}
    if stream:
        body["stream"] = True
    return h.request(
        "POST", "/v1/chat/completions", data=json.dumps(body).encode(), unbuffered=stream,
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"},
    )


def sent_body(sent) -> dict:
    return json.loads(sent.body)


def completion(model: str, text: str = "Hello!", prompt: int = 9, done: int = 3) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done},
    }).encode()


def chunk(content: str | None = None, role: str | None = None, finish: str | None = None, chunk_id: str = "c1", model: str = "gpt-4o") -> bytes:
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": chunk_id, "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage_chunk(prompt: int, done: int, model: str = "gpt-4o", chunk_id: str = "c1") -> bytes:
    body = {"id": chunk_id, "object": "chat.completion.chunk", "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def events_of(body: bytes) -> list[dict | str]:
    """The data of each event the client got: decoded chunks, or the raw text."""
    out = []
    for event in body.split(b"\n\n"):
        if not event.strip():
            continue
        if event.startswith(b"event: error"):
            out.append(("error", json.loads(event.split(b"data: ", 1)[1])))
            continue
        data = event[len(b"data: "):]
        out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


def text_of(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events if isinstance(e, dict) and e.get("choices")
    )


def error_of(response) -> dict:
    return json.loads(result_of(treq.content(response)))["error"]


def stream_of(h: Harness, d):
    """Start collecting a streamed answer: (response, received chunks, done)."""
    response = result_of(d)
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    return response, received, done


# -- configuration


def test_a_model_names_its_targets_with_their_model_names():
    config = parse_config(INI.format(primary="", local="", models="[model:*]\ntargets = local", retries=0, primary_resume="prefill", local_resume="prefill"), "t.ini", {})
    [primary, fallback] = config.models["gpt-4o"].targets
    assert (primary.service, primary.model) == ("primary", "gpt-4o")
    assert (fallback.service, fallback.model) == ("local", "llama3")
    assert config.models["*"].targets[0].model is None
    assert config.services["local"].api == "openai"  # implied by the model


@pytest.mark.parametrize(
    "models, expected",
    [
        ("[model:x]\ntargets = nowhere", "t.ini: [model:x] targets: no service is named 'nowhere'"),
        ("[model:bad name]\ntargets = local", "t.ini: [model:bad name]: a model name is"),
        ("[model:x]\ntargets = local:", None),
        ("[model:x]\ntargets = local, local", "t.ini: [model:x] targets: a target is given twice"),
        ("[model:x]\n", "t.ini: [model:x] targets: missing"),
    ],
)
def test_a_broken_model_section_names_its_section_and_key(models, expected):
    text = INI.format(primary="", local="", models=models, retries=0, primary_resume="prefill", local_resume="prefill")
    if expected is None:
        parse_config(text, "t.ini", {})  # "local:" is the model's own name
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.ini", {})
    assert str(caught.value).startswith(expected)


def test_api_key_env_reads_the_key_and_names_a_missing_variable():
    config = parse_config(INI.format(primary="", local="api_key_env = LOCAL_KEY", models="", retries=0, primary_resume="prefill", local_resume="prefill"), "t.ini", {"LOCAL_KEY": "sk-l"})
    assert config.services["local"].api_key == "sk-l"
    with pytest.raises(ConfigError) as caught:
        parse_config(INI.format(primary="", local="api_key_env = LOCAL_KEY", models="", retries=0, primary_resume="prefill", local_resume="prefill"), "t.ini", {})
    assert str(caught.value) == "t.ini: [service:local] api_key_env: the environment variable LOCAL_KEY is not set"


def test_the_backend_key_never_shows_in_the_config_repr_or_an_error():
    config = parse_config(INI.format(primary="", local="", models="", retries=0, primary_resume="prefill", local_resume="prefill"), "t.ini", {})
    assert "sk-primary-secret" not in repr(config)
    with pytest.raises(ConfigError) as caught:
        parse_config(INI.format(primary="", local="api_key = bad key", models="", retries=0, primary_resume="prefill", local_resume="prefill"), "t.ini", {})
    assert "bad key" not in str(caught.value) and "[service:local] api_key" in str(caught.value)


# -- routing by model


def test_a_request_goes_to_the_primary_with_its_model_and_the_backend_key():
    h = harness()
    d = chat(h, temperature=0.2)
    sent = h.agents["primary"].last
    assert sent.uri == b"http://primary.test/v1/chat/completions"
    assert sent.headers.getRawHeaders(b"authorization") == [b"Bearer sk-primary-secret"]
    assert sent.headers.getRawHeaders(b"accept-encoding") == [b"identity"]
    assert sent_body(sent)["model"] == "gpt-4o" and sent_body(sent)["temperature"] == 0.2
    sent.respond(FakeResponse(200, JSON, completion("gpt-4o-2024-08-06")))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    assert json.loads(result_of(treq.content(response)))["choices"][0]["message"]["content"] == "Hello!"
    assert response.headers.getRawHeaders("x-gateway-service") == ["primary"]
    assert response.headers.getRawHeaders("x-gateway-model") == ["gpt-4o"]


def test_usage_of_a_json_answer_goes_on_the_access_line_and_into_the_token_counts():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o-2024-08-06", prompt=12, done=5)))
    h.flush()
    result_of(treq.content(result_of(d)))
    [line] = h.access.lines
    assert line["requested_model"] == "gpt-4o" and line["model"] == "gpt-4o-2024-08-06"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (12, 5)
    exposition = h.gateway.metrics.exposition().decode()
    assert 'txgateway_tokens_total{kind="prompt",model="gpt-4o-2024-08-06",service="primary"} 12.0' in exposition
    assert 'txgateway_tokens_total{kind="completion",model="gpt-4o-2024-08-06",service="primary"} 5.0' in exposition


def test_a_failing_primary_falls_back_to_the_next_target_with_its_model():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(503, JSON, b'{"error":"busy"}'))
    h.flush()
    sent = h.agents["local"].last
    assert sent.uri == b"http://local.test/v1/chat/completions"
    assert sent_body(sent)["model"] == "llama3"
    # The client's own key is not the gateway's to hide (no [auth]), and local has no key of its own.
    assert sent.headers.getRawHeaders(b"authorization") == [b"Bearer client-key"]
    sent.respond(FakeResponse(200, JSON, completion("llama3", prompt=7, done=2)))
    h.flush()
    response = result_of(d)
    assert response.code == 200
    assert response.headers.getRawHeaders("x-gateway-service") == ["local"]
    assert response.headers.getRawHeaders("x-gateway-model") == ["llama3"]
    assert response.headers.getRawHeaders("x-gateway-fallback-from") == ["primary:gpt-4o"]
    result_of(treq.content(response))
    [line] = h.access.lines
    assert line["model"] == "llama3" and line["fallback_from"] == ["primary:gpt-4o"]


@pytest.mark.parametrize(
    "code, body",
    [
        (400, b'{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}'),
        (400, b'{"object":"error","message":"This model\'s maximum context length is 8192 tokens","code":400}'),
        (401, b'{"error":{"message":"bad key"}}'),
        (403, b'{"error":{"message":"no access"}}'),
        (404, b'{"error":{"message":"no such model","code":"model_not_found"}}'),
    ],
)
def test_these_refusals_move_to_the_next_target_without_a_retry(code, body):
    h = harness(retries=3)
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(code, JSON, body))
    h.flush()
    assert len(h.agents["primary"].requests) == 1
    h.agents["local"].last.respond(FakeResponse(200, JSON, completion("llama3")))
    h.flush()
    assert result_of(d).code == 200


@pytest.mark.parametrize(
    "code, body",
    [
        (400, b'{"error":{"message":"flagged","type":"invalid_request_error","code":"content_policy_violation"}}'),
        (400, b'{"error":{"message":"filtered","code":"content_filter"}}'),
        (400, b'{"error":{"message":"temperature is out of range","code":"invalid_value"}}'),
        (422, b'{"detail":"bad field"}'),
    ],
)
def test_these_refusals_are_passed_through_and_never_tried_elsewhere(code, body):
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(code, JSON, body))
    h.flush()
    response = result_of(d)
    assert response.code == code and result_of(treq.content(response)) == body
    assert h.agents["local"].requests == []


def test_an_unknown_model_is_model_not_found_and_a_bad_body_is_a_bad_request():
    h = harness()
    response = result_of(chat(h, model="gpt-5"))
    assert response.code == 404 and error_of(response)["type"] == "model_not_found"
    for body in (b"not json", b"[1, 2]", b'{"messages": []}', b'{"model": 4}'):
        response = result_of(h.request("POST", "/v1/chat/completions", data=body))
        assert response.code == 400 and error_of(response)["type"] == "bad_request", body
    assert h.agents["primary"].requests == []


def test_the_catch_all_model_sends_the_clients_own_model_name():
    h = harness(models="[model:*]\ntargets = local")
    d = chat(h, model="qwen2.5:7b")
    assert sent_body(h.agents["local"].last)["model"] == "qwen2.5:7b"
    h.agents["local"].last.respond(FakeResponse(200, JSON, completion("qwen2.5:7b")))
    h.flush()
    assert result_of(d).code == 200


def test_models_are_listed_in_openais_shape():
    h = harness(models="[model:*]\ntargets = local")
    response = result_of(h.request("GET", "/v1/models"))
    body = json.loads(result_of(treq.content(response)))
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("gpt-4o", "model")]
    one = result_of(h.request("GET", "/v1/models/gpt-4o"))
    assert json.loads(result_of(treq.content(one)))["id"] == "gpt-4o"
    missing = result_of(h.request("GET", "/v1/models/nope"))
    assert missing.code == 404 and error_of(missing)["type"] == "model_not_found"


def test_one_failing_model_never_opens_the_circuit_of_another_on_the_same_backend():
    h = harness(primary="breaker_threshold = 2", models="[model:gpt-4o-mini]\ntargets = primary")
    for _ in range(2):
        d = chat(h, model="gpt-4o-mini")
        h.agents["primary"].last.respond(FakeResponse(500, JSON, b"{}"))
        h.flush()
        assert result_of(d).code == 500
    refused = result_of(chat(h, model="gpt-4o-mini"))
    assert refused.code == 503 and error_of(refused)["type"] == "circuit_open"
    d = chat(h, model="gpt-4o")
    h.agents["primary"].last.respond(FakeResponse(200, JSON, completion("gpt-4o")))
    h.flush()
    assert result_of(d).code == 200
    health = h.gateway.health()
    assert health["models"]["gpt-4o-mini"]["targets"] == [{"service": "primary", "model": "gpt-4o-mini", "circuit": "open"}]
    assert health["models"]["gpt-4o"]["targets"][0] == {"service": "primary", "model": "gpt-4o", "circuit": "closed"}
    assert health["services"]["primary"]["circuit"] == "closed"
    assert "sk-primary-secret" not in json.dumps(health)


def test_api_requests_to_an_openai_service_carry_its_key_and_count_tokens():
    h = harness()
    d = h.request("POST", "/api/primary/chat/completions", data=json.dumps({"model": "gpt-4o", "messages": []}).encode())
    sent = h.agents["primary"].last
    assert sent.headers.getRawHeaders(b"authorization") == [b"Bearer sk-primary-secret"]
    assert sent_body(sent)["model"] == "gpt-4o"
    sent.respond(FakeResponse(200, JSON, completion("gpt-4o", prompt=3, done=1)))
    h.flush()
    result_of(treq.content(result_of(d)))
    assert h.access.lines[0]["prompt_tokens"] == 3


# -- streams: the commit point at the first token


def test_a_stream_asks_for_usage_and_hides_the_usage_chunk_the_client_did_not_ask_for():
    h = harness()
    d = chat(h, stream=True)
    sent = h.agents["primary"].last
    assert sent_body(sent)["stream_options"] == {"include_usage": True}
    upstream = sent.respond(FakeResponse(200, SSE))
    upstream.send(chunk(role="assistant", content="") + chunk("Hel"))
    h.flush()
    response, received, done = stream_of(h, d)
    upstream.send(chunk("lo", finish="stop") + usage_chunk(8, 2) + b"data: [DONE]\n\n")
    upstream.finish()
    h.flush()
    events = events_of(b"".join(received))
    assert text_of(events) == "Hello" and events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)
    [line] = h.access.lines
    assert (line["prompt_tokens"], line["completion_tokens"]) == (8, 2)


def test_the_usage_chunk_is_forwarded_when_the_client_asked_for_it():
    h = harness()
    d = chat(h, stream=True, stream_options={"include_usage": True})
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("Hi", finish="stop") + usage_chunk(4, 1) + b"data: [DONE]\n\n")
    upstream.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    assert any(isinstance(e, dict) and e.get("usage") for e in events_of(b"".join(received)))


def test_a_stream_with_a_content_length_is_relayed_chunked_as_events_may_be_left_out():
    h = harness()
    d = chat(h, stream=True)
    whole = chunk("Hi", finish="stop") + usage_chunk(4, 1) + b"data: [DONE]\n\n"
    h.agents["primary"].last.respond(FakeResponse(200, SSE, whole))
    h.flush()
    response = result_of(d)
    body = result_of(treq.content(response))
    assert text_of(events_of(body)) == "Hi" and b"usage" not in body
    assert response.headers.getRawHeaders("content-length") is None


def test_usage_is_read_from_events_split_over_reads_and_several_in_one_read():
    h = harness()
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    whole = chunk("a") + chunk("b") + chunk(None, finish="stop") + usage_chunk(21, 13) + b"data: [DONE]\n\n"
    for start in range(0, len(whole), 7):  # every event cut somewhere
        upstream.send(whole[start : start + 7])
    upstream.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    assert text_of(events_of(b"".join(received))) == "ab"
    assert (h.access.lines[0]["prompt_tokens"], h.access.lines[0]["completion_tokens"]) == (21, 13)


def test_role_chunks_and_comments_do_not_commit_a_stream_and_a_silent_first_token_falls_over():
    h = harness()
    d = chat(h, stream=True)
    slow = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    slow.send(b": keep-alive\n\n" + chunk(role="assistant", content=""))
    h.advance(3)  # first_token_timeout
    assert slow.transport.stopped
    fast = h.agents["local"].last.respond(FakeResponse(200, SSE))
    fast.send(chunk(role="assistant", content="", model="llama3") + chunk("Hi", finish="stop", model="llama3") + b"data: [DONE]\n\n")
    fast.finish()
    h.flush()
    response, received, done = stream_of(h, d)
    assert response.headers.getRawHeaders("x-gateway-service") == ["local"]
    events = events_of(b"".join(received))
    # One clean stream from the fallback: nothing of the silent one.
    assert [e["model"] for e in events if isinstance(e, dict)] == ["llama3", "llama3"]
    assert text_of(events) == "Hi"


@pytest.mark.parametrize("end", ["clean end without [DONE]", "break after the finish reason"])
def test_a_stream_past_its_finish_reason_is_complete_at_its_end_whatever_the_end(end):
    h = harness()
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("Hi") + chunk(None, finish="stop"))
    h.flush()
    response, received, done = stream_of(h, d)
    if end == "clean end without [DONE]":
        upstream.finish()
    else:
        upstream.fail("reset")
    h.flush()
    assert result_of(done) is None  # finalised at once: no wait for a sentinel
    assert text_of(events_of(b"".join(received))) == "Hi"
    assert h.access.lines[0]["outcome"] is None and h.access.lines[0]["status"] == 200
    assert len(h.agents["primary"].requests) == 1  # nothing resumed


# -- resume


def broken_stream(h: Harness, words: list[str]):
    """A primary stream that sends C{words} and breaks; returns the collected client side."""
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk(role="assistant", content="", chunk_id="first") + b"".join(chunk(word, chunk_id="first") for word in words))
    h.flush()
    response, received, done = stream_of(h, d)
    upstream.fail("connection reset")
    h.flush()
    return response, received, done


def test_a_stream_broken_midway_is_resumed_with_its_text_as_a_prefill():
    h = harness()
    response, received, done = broken_stream(h, ["One ", "two "])
    resume = h.agents["primary"].last
    assert len(h.agents["primary"].requests) == 2
    messages = sent_body(resume)["messages"]
    assert messages[-1] == {"role": "assistant", "content": "One two "}
    assert messages[:-1] == [{"role": "user", "content": "Say hello"}]
    assert resume.headers.getRawHeaders(b"authorization") == [b"Bearer sk-primary-secret"]
    more = resume.respond(FakeResponse(200, SSE))
    more.send(chunk(role="assistant", content="", chunk_id="second") + chunk("three", chunk_id="second"))
    more.send(chunk(None, finish="stop", chunk_id="second") + usage_chunk(20, 1, chunk_id="second") + b"data: [DONE]\n\n")
    more.finish()
    h.flush()
    assert result_of(done) is None
    events = events_of(b"".join(received))
    assert text_of(events) == "One two three"
    roles = [e for e in events if isinstance(e, dict) and e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1, "the resumed stream's role chunk is dropped"
    assert {e["id"] for e in events if isinstance(e, dict)} == {"first"}
    [line] = h.access.lines
    assert line["resumed"] == 1 and line["resumed_on"] == ["primary:gpt-4o"]
    assert line["outcome"] is None and line["prompt_tokens"] == 20


def test_a_refused_resume_moves_on_and_none_left_names_the_original_break():
    h = harness()
    response, received, done = broken_stream(h, ["One "])
    h.agents["primary"].last.respond(FakeResponse(400, JSON, b'{"error":{"message":"prefill is not supported"}}'))
    h.flush()
    to_local = h.agents["local"].last
    assert sent_body(to_local)["model"] == "llama3"
    assert sent_body(to_local)["messages"][-1] == {"role": "assistant", "content": "One "}
    to_local.respond(FakeResponse(400, JSON, b'{"error":{"message":"assistant prefill is not supported"}}'))
    h.flush()
    failures = []
    done.addErrback(failures.append)
    assert failures, "the stream ends broken"
    kind, error = events_of(b"".join(received))[-1]
    assert kind == "error" and error["error"]["type"] == "stream_broken"
    assert "connection reset" in error["error"]["message"] and "prefill" not in error["error"]["message"]


def test_a_stall_after_the_first_token_is_resumed_on_the_fallback_when_the_primary_cannot():
    h = harness(primary_resume="off")
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("Slow "))
    h.flush()
    response, received, done = stream_of(h, d)
    h.advance(4)  # idle_timeout
    assert upstream.transport.stopped
    upstream.fail("stopped")  # what the client's connection reports once dropped
    h.flush()
    assert len(h.agents["primary"].requests) == 1  # resume = off there
    more = h.agents["local"].last.respond(FakeResponse(200, SSE))
    more.send(chunk("start.", finish="stop", model="llama3") + b"data: [DONE]\n\n")
    more.finish()
    h.flush()
    assert result_of(done) is None
    assert text_of(events_of(b"".join(received))) == "Slow start."
    assert h.access.lines[0]["resumed_on"] == ["local:llama3"]


def test_a_malformed_chunk_breaks_the_attempt_and_is_never_relayed():
    h = harness()
    d = chat(h, stream=True)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("Fine "))
    h.flush()
    response, received, done = stream_of(h, d)
    upstream.send(b"data: {not json\n\n")
    h.flush()
    assert upstream.transport.stopped
    upstream.fail("stopped")  # what the client's connection reports once dropped
    h.flush()
    more = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    more.send(chunk("words", finish="stop") + b"data: [DONE]\n\n")
    more.finish()
    h.flush()
    body = b"".join(received)
    assert b"not json" not in body and text_of(events_of(body)) == "Fine words"


def cut_short(done) -> bool:
    """The client's read of a stream ended with the connection, before the stream's end."""
    from twisted.web.client import ResponseFailed

    failures: list = []
    done.addErrback(failures.append)
    return len(failures) == 1 and failures[0].check(ResponseFailed) is not None


def test_no_resume_for_several_choices_or_without_resume_configured():
    h = harness(primary_resume="off", local_resume="off")
    response, received, done = broken_stream(h, ["One "])
    assert len(h.agents["primary"].requests) == 1 and h.agents["local"].requests == []
    assert events_of(b"".join(received))[-1][0] == "error"
    assert cut_short(done)
    h = harness()
    d = chat(h, stream=True, n=2)
    upstream = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    upstream.send(chunk("One "))
    h.flush()
    response, received, done = stream_of(h, d)
    upstream.fail("reset")
    h.flush()
    assert len(h.agents["primary"].requests) == 1
    assert cut_short(done)


# -- reload


def test_a_reload_keeps_the_breakers_of_unchanged_deployments_and_retires_the_others(tmp_path):
    from tests.test_operations import RELOADABLE, make_service

    models = "[model:m1]\ntargets = ai, data:small\n[model:m2]\ntargets = ai\n"
    service, reactor, path = make_service(tmp_path, RELOADABLE + models)
    old = service.gateway.broker.models
    [m1_ai, m1_data] = [t.route.endpoints[0].breaker for t in old.targets_for("m1")]
    [m2_ai] = [t.route.endpoints[0].breaker for t in old.targets_for("m2")]
    m1_ai.failed(m1_ai.admit("r"), "boom")
    m2_ai.failed(m2_ai.admit("r"), "boom")
    assert m1_ai is not m2_ai  # one deployment each
    service.sink.flush()  # the transitions' log lines wait for their batch otherwise
    cooldowns = [call for call in reactor.getDelayedCalls() if call.active()]
    assert len(cooldowns) == 2  # the two open circuits' timers
    path.write_text(RELOADABLE + "[model:m1]\ntargets = ai, data:bigger\n")
    assert service.reload()
    new = service.gateway.broker.models
    [kept, changed] = [t.route.endpoints[0].breaker for t in new.targets_for("m1")]
    assert kept is m1_ai and kept.status().state == "open"
    assert changed is not m1_data
    assert new.targets_for("m2") is None
    # m2's deployment is gone: its timer with it; m1's open circuit keeps its own.
    assert sorted(call.active() for call in cooldowns) == [False, True]
    health = service.gateway.health()["models"]
    assert health["m1"]["targets"] == [
        {"service": "ai", "model": "m1", "circuit": "open"}, {"service": "data", "model": "bigger", "circuit": "closed"},
    ]


def test_a_reload_naming_an_unknown_service_is_rejected_naming_section_and_key(tmp_path):
    from structlog.testing import capture_logs

    from tests.test_operations import RELOADABLE, make_service

    service, reactor, path = make_service(tmp_path, RELOADABLE + "[model:m1]\ntargets = ai\n")
    old = service.gateway
    path.write_text(RELOADABLE + "[model:m1]\ntargets = ai, nowhere:x\n")
    with capture_logs() as logs:
        assert service.reload() is False
    assert service.gateway is old
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert "[model:m1] targets: no service is named 'nowhere'" in rejected["reason"]


def test_a_client_that_leaves_while_its_stream_is_resumed_cancels_the_resume():
    h = harness()
    response, received, done = broken_stream(h, ["One "])
    resume = h.agents["primary"].last
    assert len(h.agents["primary"].requests) == 2
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()
    assert h.agents["primary"].cancelled == [resume]
    [line] = h.access.lines
    assert line["outcome"] == "client_disconnected" and line["status"] == 499
    route = h.gateway.broker.models.targets_for("gpt-4o")[0].route
    assert [endpoint.in_flight for endpoint in route.endpoints] == [0] and route.in_flight == 0
    done.addErrback(lambda failure: None)


def test_a_client_that_leaves_while_a_refusal_is_read_leaves_nothing_in_flight():
    h = harness()
    d = chat(h)
    refusal = h.agents["primary"].last.respond(FakeResponse(400, JSON))
    refusal.send(b'{"error": {"code": "context_')
    h.flush()
    d.cancel()
    d.addErrback(lambda failure: None)  # the client's own view: cancelled
    h.flush()
    assert refusal.transport.stopped and h.agents["local"].requests == []
    route = h.gateway.broker.models.targets_for("gpt-4o")[0].route
    assert route.endpoints[0].in_flight == 0 and route.in_flight == 0


def test_a_v1_request_on_a_configuration_without_models_says_what_is_missing():
    h = Harness(GATEWAY_HEAD + "[service:plain]\nurl = http://plain.test\n")
    response = result_of(h.request("POST", "/v1/chat/completions", data=b'{"model": "gpt-4o", "messages": []}'))
    error = json.loads(result_of(treq.content(response)))["error"]
    assert response.code == 404 and error["type"] == "model_not_found"
    assert error["message"].startswith("no models are configured: add a [model:NAME] section")
    listed = result_of(h.request("GET", "/v1/models"))
    assert json.loads(result_of(treq.content(listed))) == {"object": "list", "data": []}


def test_a_stream_relay_holds_about_a_kilobyte_whatever_it_relays():
    # A relay lives as long as its stream.  With a dictionary of its own (as CPython
    # made one past 29 attributes, or in another order than the first instance's)
    # a governed or translated relay was 1.6 to 2.4 KB, and so was every plain one
    # once a translated relay had been made first; its slots hold it in about 1 KB.
    import tracemalloc

    from twisted.internet.task import Clock

    from txgateway.openai.relays import EventStreamRelay
    from txgateway.openai.wire import read_chunk
    from txgateway.speaking import Transcript

    translated = {"read": lambda event: read_chunk(event), "write": lambda event, facts: event}
    governed = {"reserved": 100, "closing": lambda last, reserved: []}
    options = {
        "translated and governed": {**translated, **governed}, "translated": translated, "governed": governed, "plain": {},
    }
    clock, transcript = Clock(), Transcript(False)

    def relay(given: dict) -> EventStreamRelay:
        return EventStreamRelay(clock, 5.0, transcript, lambda usage: None, False, **given)

    for given in options.values():
        relay(given)  # every kind made once, the translated ones first
    held, kept = {}, []
    tracemalloc.start()
    try:
        for variant, given in options.items():
            before = tracemalloc.get_traced_memory()[0]
            kept.append([relay(given) for _ in range(500)])
            held[variant] = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    assert held["plain"] < 1500, held  # about 1.1 KB; a relay of its own dictionary, 2.4
    # A governed relay's bound is one small object more; nothing else differs.
    assert all(size - held["plain"] < 150 for size in held.values()), held


def test_a_configured_models_targets_are_made_once_and_a_wildcards_for_each_name(tmp_path):
    # A stream holds its call's targets for minutes: a configured model's are one tuple for all its calls.
    from tests.test_operations import RELOADABLE, make_service

    service, reactor, path = make_service(tmp_path, RELOADABLE + "[model:m1]\ntargets = ai, data:small\n[model:*]\ntargets = ai\n")
    models = service.gateway.broker.models
    first = models.targets_for("m1")
    assert models.targets_for("m1") is first
    assert [(t.route.config.name, t.model) for t in first] == [("ai", "m1"), ("data", "small")]
    assert first[0].route is models.targets_for("m1")[0].route
    other = models.targets_for("some-model")
    assert [(t.route.config.name, t.model) for t in other] == [("ai", "some-model")]
    assert other[0].route is not first[0].route  # a deployment of its own: breakers of its own
