"""
The Responses API as the gateway speaks it (L{RESPONSES_API}), and its
speakers: to a target that speaks it (L{ResponsesToResponses}: an
C{api = openai} service with C{responses = native}), and translated to
chat completions (L{ResponsesToChat}: C{responses = chat}, the default).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from txgateway.anthropic.speakers import MESSAGES_API
from txgateway.anthropic.translate import MessagesToChatStream, chat_request_to_messages, message_answer_to_chat, messages_error_to_chat
from txgateway.anthropic.wire import ANTHROPIC, MessagesStreamReader, read_message
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.relay import BodyRelay
from txgateway.errors import ErrorKind
from txgateway.ids import random_hex
from txgateway.openai.speaker import OPENAI, OPENAI_API, OpenAIApi, Speaker
from txgateway.openai.wire import ChunkFacts, encode_json, read_chunk
from txgateway.responses.translate import (
    CLAUDE_THINKING, ChatToResponsesStream, chat_answer_to_response, claude_thinking, tool_names, responses_request_to_chat,
)
from txgateway.responses.wire import RESPONSES, ResponsesCall, ResponsesStreamReader, error_event, read_response, responses_path
from txgateway.speaking import AnswerReading, IApi, ISpeaker, Untranslatable

__all__ = ["PAIRS", "RESPONSES_API", "ResponsesApi", "ResponsesToChat", "ResponsesToMessages", "ResponsesToResponses"]


def new_response_id() -> str:
    """
    The id of a Response the gateway makes (a translated answer): random,
    so that no two are alike, whichever target answered, and none is guessed.
    """
    return "resp_" + random_hex(24)


#: A body holding Claude's thinking holds these bytes (a reasoning item's C{encrypted_content} begins with them).
_CLAUDE_THINKING = CLAUDE_THINKING.encode("ascii")


@implementer(IApi)
class ResponsesApi(OpenAIApi):
    """OpenAI's Responses API: its model call (C{/responses}) under an C{api = openai} service, its key as OpenAI's."""

    name = RESPONSES
    title = "OpenAI's Responses API"

    def read_call(self, rest: bytes, body: bytes, reading: Any) -> ResponsesCall | None:
        """The Responses request a C{POST} to C{rest} makes, or L{None} for a path that is no Responses call."""
        if not responses_path(rest):
            return None
        return ResponsesCall.parse(body, reading)

    def model_call_path(self, rest: bytes) -> bool:
        """C{/responses}."""
        return responses_path(rest)


#: The one L{ResponsesApi}.
RESPONSES_API = ResponsesApi()


@implementer(ISpeaker)
class ResponsesToResponses(Speaker):
    """
    A Responses call to a target that speaks it: sent as it is (its model
    renamed), its events read for the commit point, the text and the
    usage of C{response.completed}; a broken stream ends with the API's
    C{error} event (a Responses target takes no prefill to go on from).
    """

    client_api = RESPONSES
    target_api = RESPONSES
    target = RESPONSES_API
    #: The Responses API has no assistant prefill: a broken stream ends with its error event.
    takes_prefill = False
    read_events = ResponsesStreamReader
    read_answer = staticmethod(read_response)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The client's path, under the endpoint's base."""
        return path

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The client's body, the model renamed; Claude's thinking (reasoning items of the gateway's making) left out."""
        if self.call.raw and _CLAUDE_THINKING not in self.call.raw:
            return self.call.body_for(model)
        body = dict(self.call.body)
        if model is not None:
            body["model"] = model
        if isinstance(body.get("input"), list):
            body["input"] = [item for item in body["input"] if claude_thinking(item) is None]
        return encode_json(body)

    def broken_event(self, kind: ErrorKind, message: str, request_id: str) -> bytes:
        """The Responses API's C{error} event."""
        return error_event(kind, message, request_id)


@implementer(ISpeaker)
class ResponsesToChat(Speaker):
    """
    A Responses call translated to chat completions (what every
    OpenAI-compatible server speaks), its answer rebuilt as a Response: a
    JSON one, or a stream as the Responses API's event sequence.  Errors
    are OpenAI's shape both ways.  A broken stream ends with the API's
    C{error} event.
    """

    client_api = RESPONSES
    target_api = OPENAI_API
    translated = True
    target = OPENAI

    def __init__(self, call: ResponsesCall, path: bytes, started_at: float) -> None:
        super().__init__(call, path, started_at)
        created = self._created = int(started_at)
        names = self._names = tool_names(call.body.get("tools"))
        response_id = self._response_id = new_response_id()
        self.write_events = ChatToResponsesStream(created, names, response_id) if call.stream else None

    def translate_answer(self, body: bytes) -> bytes:
        """A whole chat completion as a Response (a method, not a closure: a stream holds its speaker)."""
        return chat_answer_to_response(body, self._created, self._names, self._response_id)

    def answer_relay(self, code: int, event_stream: bool, reading: AnswerReading) -> tuple[BodyRelay, str] | None:
        """As every speaker's, and a stream's messages read their text from its transcript: it is kept once."""
        if self.write_events is not None and reading.transcript is not None:
            self.write_events.text_kept_by(reading.transcript)
        return super().answer_relay(code, event_stream, reading)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The chat completions endpoint."""
        return b"/chat/completions"

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """
        The Responses request as a chat request (built-in tools left out,
        or refused as the service says), with the text so far as an
        assistant prefill when a broken stream goes on.
        """
        chat = _as_chat(self, config, model)
        if prefill is not None:
            chat["messages"].append({"role": "assistant", "content": prefill})
        return encode_json(chat)

    def broken_event(self, kind: ErrorKind, message: str, request_id: str) -> bytes:
        """The Responses API's C{error} event."""
        return error_event(kind, message, request_id)


def _as_chat(speaker: Speaker, config: ServiceConfig, model: str | None, thinking: bool = False) -> dict:
    """
    A Responses request as chat for C{speaker}'s target: the built-in
    tools left out (named in its answer's C{X-Gateway-Dropped-Tools}), or
    refused when the service says C{builtin_tools = refuse}; with
    C{thinking} (Claude), Claude's own reasoning items sent back.
    """
    chat, left_out = responses_request_to_chat(speaker.call.body, model, thinking)
    if left_out:
        names = ", ".join(sorted(set(left_out)))
        if config.builtin_tools == "refuse":
            raise Untranslatable(f"the built-in tools {names} are not run by {config.name!r} (builtin_tools = refuse)")
        speaker.answer_headers = ((b"X-Gateway-Dropped-Tools", names.encode("ascii", "replace")),)
    return chat


class _ThroughChat:
    """
    A Messages stream written as the Responses API's events by way of chat
    completions: each Messages event as chat chunks (L{MessagesToChatStream}),
    each chunk as Responses events (L{ChatToResponsesStream}).
    """

    def __init__(self, created: int, names: dict, response_id: str) -> None:
        self._to_chat = MessagesToChatStream(created, True)  # the usage chunk too: the Response carries it
        self._to_responses = ChatToResponsesStream(created, names, response_id)

    def _on(self, chat: bytes) -> bytes:
        out = b""
        for part in chat.split(b"\n\n"):
            if part:
                event = part + b"\n\n"
                out += self._to_responses(event, read_chunk(event))
        return out

    def finish(self) -> bytes:
        """The end events of a stream that ended whole without C{message_stop}."""
        return self._on(self._to_chat.finish()) + self._to_responses.finish()

    def __call__(self, event: bytes, facts: ChunkFacts) -> bytes:
        return self._on(self._to_chat(event, facts))


@implementer(ISpeaker)
class ResponsesToMessages(Speaker):
    """
    A Responses call translated for Claude by way of chat completions (the
    Messages translation the gateway already has): the request as chat,
    then as Messages; the answer as chat, then as a Response (a stream as
    the API's event sequence).  Errors come back in OpenAI's shape.
    """

    client_api = RESPONSES
    target_api = ANTHROPIC
    translated = True
    target = MESSAGES_API
    read_events = MessagesStreamReader
    read_answer = staticmethod(read_message)
    translate_error = staticmethod(messages_error_to_chat)

    def __init__(self, call: ResponsesCall, path: bytes, started_at: float) -> None:
        super().__init__(call, path, started_at)
        created = self._created = int(started_at)
        names = self._names = tool_names(call.body.get("tools"))
        response_id = self._response_id = new_response_id()
        self.write_events = _ThroughChat(created, names, response_id) if call.stream else None

    def translate_answer(self, body: bytes) -> bytes:
        """A whole Messages answer as a Response, through chat (a method, not a closure: a stream holds its speaker)."""
        return chat_answer_to_response(message_answer_to_chat(body, self._created), self._created, self._names, self._response_id)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The Messages endpoint (with C{/v1} when the endpoint's base lacks it)."""
        return b"/messages" if base_path.endswith(b"/v1") else b"/v1/messages"

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The Responses request as chat, then as Messages (C{max_tokens} the service's when the client names none)."""
        chat = _as_chat(self, config, model, thinking=True)
        return encode_json(chat_request_to_messages(chat, model or self.call.model, config.max_tokens, prefill))

    def completion_floor(self, config: ServiceConfig) -> int:
        """The service's C{max_tokens}, which Claude is sent when the client names none."""
        return config.max_tokens if self.call.max_tokens is None else 0

    def broken_event(self, kind: ErrorKind, message: str, request_id: str) -> bytes:
        """The Responses API's C{error} event."""
        return error_event(kind, message, request_id)


#: The speakers this package provides, by (client API, target API).
PAIRS = {
    (RESPONSES, RESPONSES): ResponsesToResponses,
    (RESPONSES, OPENAI_API): ResponsesToChat,
    (RESPONSES, ANTHROPIC): ResponsesToMessages,
}
