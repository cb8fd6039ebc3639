"""
Who is calling: the end user (and session) a call is for, as each API
says it (OpenAI's C{user} or C{safety_identifier}, the Responses API's,
Anthropic's C{metadata.user_id} with Claude Code's JSON string inside,
Codex's C{session-id} header), bounded, on the access line and the spans.
"""

from __future__ import annotations

import json

import pytest

from tests.fakes import FakeResponse, result_of
from tests.test_messages_routing import INI, JSON, claude_answer
from tests.fakes import Harness
from txgateway.anthropic.wire import MessagesCall
from txgateway.openai.wire import OpenAICall
from txgateway.responses.wire import ResponsesCall
from txgateway.speaking import MOST_ID_CHARACTERS

CLAUDE_CODE_USER = json.dumps({"device_id": "dev-1", "account_uuid": "", "session_id": "sess-9"})


@pytest.mark.parametrize(("call", "said"), [
    (OpenAICall.parse(b'{"model": "m", "user": "alice"}', b"/v1/chat/completions"), ("alice", None)),
    (OpenAICall.parse(b'{"model": "m", "safety_identifier": "h-1"}', b"/v1/chat/completions"), ("h-1", None)),
    (ResponsesCall.parse(b'{"model": "m", "safety_identifier": "h-2", "user": "u"}'), ("h-2", None)),
    (MessagesCall.parse(json.dumps({"model": "m", "metadata": {"user_id": "bob"}}).encode()), ("bob", None)),
    (MessagesCall.parse(json.dumps({"model": "m", "metadata": {"user_id": CLAUDE_CODE_USER}}).encode()), ("dev-1", "sess-9")),
    (MessagesCall.parse(b'{"model": "m", "metadata": {"user_id": "{not json"}}'), ("{not json", None)),
    (OpenAICall.parse(b'{"model": "m", "user": 7}', b"/v1/chat/completions"), (None, None)),
])
def test_each_api_says_who_its_call_is_for(call, said):
    assert call.end_user() == said


def test_a_long_end_user_is_cut():
    call = OpenAICall.parse(json.dumps({"model": "m", "user": "x" * 1000}).encode(), b"/v1/chat/completions")
    assert len(call.end_user()[0]) == MOST_ID_CHARACTERS


def test_the_end_user_and_session_are_on_the_access_line():
    h = Harness(INI)
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": CLAUDE_CODE_USER}}
    d = h.request("POST", "/v1/messages", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    h.agents["claude"].last.respond(FakeResponse(200, JSON, claude_answer()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert (line["end_user"], line["session"]) == ("dev-1", "sess-9")


def test_codexs_session_header_names_the_session():
    h = Harness(INI)
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "user": "carol"}
    d = h.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json", "session-id": "codex-session-1"})
    h.agents["gpt"].last.respond(FakeResponse(200, JSON, json.dumps({
        "id": "c", "object": "chat.completion", "model": "gpt-x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
        "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert (line["end_user"], line["session"]) == ("carol", "codex-session-1")


def test_a_services_end_user_header_wins_over_the_body():
    h = Harness(INI.replace("[service:claude]\n", "[service:claude]\nend_user_header = X-End-User\n", 1))
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "from-body"}}
    d = h.request("POST", "/v1/messages", data=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json", "X-End-User": "erin@example.com"})
    h.agents["claude"].last.respond(FakeResponse(200, JSON, claude_answer()))
    h.flush()
    assert result_of(d).code == 200
    [line] = h.access.lines
    assert line["end_user"] == "erin@example.com"


def test_an_end_user_header_that_is_no_header_name_fails_at_start_naming_it():
    from txgateway.config.gateway import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"\[service:ai\] end_user_header: expected an HTTP header's name"):
        parse_config("[service:ai]\nurl = http://x:1\nend_user_header = X End User\n", "g.ini", {})
