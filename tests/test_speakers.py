"""
The four speakers the API packages provide, each on its own: they provide
ISpeaker, and say the path, body and headers of their pair.
"""

from __future__ import annotations

import json

import pytest
from zope.interface.verify import verifyObject

from txgateway.anthropic.wire import MessagesCall
from txgateway.config.gateway import parse_config
from txgateway.daemon.service import every_speaker
from txgateway.dataplane.server import IncomingRequest
from txgateway.openai.wire import OpenAICall
from txgateway.responses.wire import ResponsesCall
from txgateway.speaking import IApi, ISpeaker, Untranslatable

SPEAKERS = every_speaker()
CONFIG = parse_config(
    "[service:gpt]\nurl = http://gpt.test/v1\napi = openai\n"
    "[service:claude]\nurl = http://claude.test\napi = anthropic\nmax_tokens = 777\n",
    "test.ini", {},
).services

CHAT = OpenAICall.parse(b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}', b"/chat/completions")
EMBEDDINGS = OpenAICall.parse(b'{"model": "m", "input": "hi"}', b"/embeddings")
MESSAGES = MessagesCall.parse(b'{"model": "c", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}')


def request(*headers: tuple[bytes, bytes]) -> IncomingRequest:
    return IncomingRequest(None, b"POST", b"/v1/x", list(headers), b"{}")


@pytest.mark.parametrize(("call", "target"), [(CHAT, "openai"), (CHAT, "anthropic"), (MESSAGES, "anthropic"), (MESSAGES, "openai")])
def test_every_pair_has_a_speaker_that_provides_the_interface(call, target):
    speaker = SPEAKERS.speaker(call, target, b"/chat/completions", 0.0)
    assert verifyObject(ISpeaker, speaker)
    assert (speaker.client_api, speaker.target_api, speaker.translated) == (call.api, target, call.api != target)


def test_every_api_provides_its_interface():
    for name in ("http", "openai", "anthropic"):
        assert verifyObject(IApi, SPEAKERS.api(name))


def test_openai_to_messages_says_the_messages_path_with_v1_when_the_base_lacks_it():
    speaker = SPEAKERS.speaker(CHAT, "anthropic", b"/chat/completions", 0.0)
    assert speaker.path(b"/chat/completions?x=1", b"", False) == b"/v1/messages"
    assert speaker.path(b"/chat/completions", b"/v1", False) == b"/messages"  # joined to /v1


def test_openai_to_messages_sends_the_services_max_tokens_and_reserves_them():
    speaker = SPEAKERS.speaker(CHAT, "anthropic", b"/chat/completions", 0.0)
    body = json.loads(speaker.body(CONFIG["claude"], "claude-x", None))
    assert (body["model"], body["max_tokens"]) == ("claude-x", 777)
    assert speaker.completion_floor(CONFIG["claude"]) == 777


def test_an_embeddings_call_has_no_messages_equivalent():
    speaker = SPEAKERS.speaker(EMBEDDINGS, "anthropic", b"/embeddings", 0.0)
    with pytest.raises(Untranslatable, match="embeddings"):
        speaker.body(CONFIG["claude"], None, None)


def test_messages_to_openai_says_chat_completions_and_withholds_the_messages_headers():
    speaker = SPEAKERS.speaker(MESSAGES, "openai", b"/messages", 0.0)
    assert speaker.path(b"/messages?beta=true", b"/v1", False) == b"/chat/completions"
    extra, withheld = speaker.headers(request((b"x-api-key", b"client-key")), CONFIG["gpt"], ())
    assert extra == [(b"Authorization", b"Bearer client-key")]
    assert {b"x-api-key", b"anthropic-version", b"anthropic-beta"} <= set(withheld)


def test_messages_to_messages_keeps_the_clients_version_and_its_own_path_when_named():
    speaker = SPEAKERS.speaker(MESSAGES, "anthropic", b"/messages", 0.0)
    assert speaker.path(b"/v1/messages", b"", True) == b"/v1/messages"
    assert speaker.path(b"/messages", b"", False) == b"/v1/messages"
    extra, _ = speaker.headers(request((b"anthropic-version", b"2023-06-01")), CONFIG["claude"], ())
    assert extra == []


def test_a_refusal_moves_on_by_openai_s_rules_and_a_broken_stream_is_said_in_the_clients_api():
    openai = SPEAKERS.speaker(CHAT, "anthropic", b"/chat/completions", 0.0)
    messages = SPEAKERS.speaker(MESSAGES, "openai", b"/messages", 0.0)
    assert openai.refusal_moves_on(404, None) == "status 404"
    assert openai.refusal_moves_on(400, b'{"error": {"message": "prompt is too long"}}') is not None
    assert openai.refusal_moves_on(400, b'{"error": {"message": "bad field"}}') is None
    from txgateway import errors
    assert b'"type": "stream_broken"' in openai.broken_event(errors.STREAM_BROKEN, "cut", "r-1")
    assert b'"txgateway_type":"stream_broken"' in messages.broken_event(errors.STREAM_BROKEN, "cut", "r-1").replace(b" ", b"")


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (lambda raw: OpenAICall.parse(raw, b"/chat/completions"),
         b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}'),
        (MessagesCall.parse, b'{"model": "c", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]}'),
        (ResponsesCall.parse, b'{"model": "r", "stream": true, "input": "hi"}'),
    ],
)
def test_a_call_lets_go_of_its_bytes_when_its_answer_starts_and_still_says_its_body(parse, raw):
    # A stream lasts minutes and its prompt is tens of KB: once its answer
    # started, nothing needs the bytes as sent (a resume's body is made anew).
    call = parse(raw)
    assert call.body_for(None) is raw  # sent unchanged while attempts may be made
    call.answer_started()
    assert call.raw == b""
    assert json.loads(call.body_for(None)) == json.loads(raw)
