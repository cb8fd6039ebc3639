"""
Anthropic's Messages API as the gateway speaks it (L{MESSAGES_API}), and
the three speakers of this package: a Messages call to a Messages target
(L{MessagesToMessages}), an OpenAI chat call translated for one
(L{ChatToMessages}), and a Messages call translated for an OpenAI target
(L{MessagesToChat}).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from txgateway.anthropic.translate import (
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_answer_to_message,
    chat_error_to_anthropic,
    chat_request_to_messages,
    message_answer_to_chat,
    messages_error_to_chat,
    messages_request_to_chat,
)
from txgateway.anthropic.wire import ANTHROPIC, MessagesCall, MessagesStreamReader, gateway_error_body, messages_path, read_message
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import ErrorKind
from txgateway.openai.speaker import OPENAI, OPENAI_API, Speaker
from txgateway.openai.wire import CHAT, OpenAICall, encode_json
from txgateway.speaking import IApi, ISpeaker, Untranslatable

__all__ = ["MESSAGES_API", "ChatToMessages", "MessagesApi", "MessagesToChat", "MessagesToMessages", "PAIRS"]

#: Headers of the Messages API a backend of another API never gets.
_MESSAGES_HEADERS = (b"anthropic-version", b"anthropic-beta", b"x-api-key")


@implementer(IApi)
class MessagesApi:
    """Anthropic's Messages API: its one model call (C{/messages}), its key in C{x-api-key}, its version header."""

    name = ANTHROPIC
    title = "Anthropic's Messages API"
    service_api = ANTHROPIC

    def read_call(self, rest: bytes, body: bytes, reading: Any) -> MessagesCall | None:
        """The Messages request a C{POST} to C{rest} makes, or L{None} for a path that is no model call."""
        if not messages_path(rest):
            return None
        return MessagesCall.parse(body, reading)

    def model_call_path(self, rest: bytes) -> bool:
        """C{/messages}."""
        return messages_path(rest)

    def credentials(
        self, request: IncomingRequest, config: ServiceConfig, key: bytes | None, translated: bool
    ) -> tuple[list, tuple[bytes, ...]]:
        """
        Its key in C{x-api-key} (and no C{Authorization} then), and the
        service's C{anthropic-version} unless the client's own Messages
        call sent one.
        """
        extra: list = []
        kept_back: tuple[bytes, ...] = ()
        if key is not None:
            extra.append((b"x-api-key", key))
            kept_back = (b"authorization",)
        if translated or request.header(b"anthropic-version") is None:
            extra.append((b"anthropic-version", config.anthropic_version.encode("ascii")))
        return extra, kept_back


#: The one L{MessagesApi}.
MESSAGES_API = MessagesApi()


def _messages_path(path: bytes, base_path: bytes) -> bytes:
    """An Anthropic endpoint may be given with or without C{/v1} (as C{ANTHROPIC_BASE_URL} is): without, it is added."""
    return path if base_path.endswith(b"/v1") else b"/v1" + path


class _MessagesClient(Speaker):
    """The client speaks Messages: its key in C{x-api-key}, its broken stream in Anthropic's error shape."""

    client_api = ANTHROPIC
    own_headers = _MESSAGES_HEADERS

    def clients_key(self, request: IncomingRequest, withheld: tuple[bytes, ...]) -> bytes | None:
        """The client's C{x-api-key}, unless it is the gateway's (withheld)."""
        key = request.header(b"x-api-key")
        return key.strip() if key and b"x-api-key" not in withheld else None

    def broken_event(self, kind: ErrorKind, message: str, request_id: str) -> bytes:
        """Anthropic's error shape as one SSE C{error} event (an Anthropic SDK raises it)."""
        return b"event: error\ndata: " + gateway_error_body(kind, message, request_id)[1] + b"\n\n"


@implementer(ISpeaker)
class MessagesToMessages(_MessagesClient):
    """A Messages call to a Messages target: sent as it is, its model renamed, a prefill as its last assistant turn."""

    target_api = ANTHROPIC
    target = MESSAGES_API
    read_events = MessagesStreamReader
    read_answer = staticmethod(read_message)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The client's path (with C{/v1} when the endpoint's base lacks it and the client did not name it)."""
        return path if as_sent else _messages_path(path, base_path)

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The client's body, the model renamed, the text so far as a last assistant turn."""
        return self.call.body_for(model, prefill=prefill)


@implementer(ISpeaker)
class ChatToMessages(Speaker):
    """
    An OpenAI chat call translated for a Messages target: its answer (JSON,
    stream, error) translated back to chat completions.  Only chat is.
    """

    target_api = ANTHROPIC
    translated = True
    target = MESSAGES_API
    read_events = MessagesStreamReader
    read_answer = staticmethod(read_message)
    translate_error = staticmethod(messages_error_to_chat)

    def __init__(self, call: OpenAICall, path: bytes, started_at: float) -> None:
        super().__init__(call, path, started_at)
        self._operation = call.operation(path)
        created = self._created = int(started_at)
        self.write_events = MessagesToChatStream(created, call.client_wants_usage) if call.stream else None

    def translate_answer(self, body: bytes) -> bytes:
        """A whole Messages answer as a chat completion (a method, not a closure: a stream holds its speaker)."""
        return message_answer_to_chat(body, self._created)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The Messages endpoint (the client's query is its own API's)."""
        return _messages_path(b"/messages", base_path)

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The chat request as a Messages request, C{max_tokens} the service's when the client names none."""
        call = self.call
        if call.kind != CHAT:
            raise Untranslatable(f"Anthropic's API has no {self._operation!r} endpoint")
        return encode_json(chat_request_to_messages(call.body, model or call.model, config.max_tokens, prefill))

    def completion_floor(self, config: ServiceConfig) -> int:
        """The service's C{max_tokens}, which the target is sent when the client names none."""
        return config.max_tokens if self.call.max_tokens is None else 0


@implementer(ISpeaker)
class MessagesToChat(_MessagesClient):
    """A Messages call translated for an OpenAI target: its answer (JSON, stream, error) translated back to Messages."""

    target_api = OPENAI_API
    translated = True
    target = OPENAI
    translate_error = staticmethod(chat_error_to_anthropic)

    def __init__(self, call: MessagesCall, path: bytes, started_at: float) -> None:
        super().__init__(call, path, started_at)
        stops = call.body.get("stop_sequences")
        stops = tuple(stop for stop in stops if isinstance(stop, str)) if isinstance(stops, list) else ()
        self._stops = stops
        self.write_events = ChatToMessagesStream(stops) if call.stream else None

    def translate_answer(self, body: bytes) -> bytes:
        """A whole chat completion as a Messages answer (a method, not a closure: a stream holds its speaker)."""
        return chat_answer_to_message(body, self._stops)

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The chat completions endpoint (the client's query, Anthropic's C{?beta=true}, is its own API's)."""
        return b"/chat/completions"

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The Messages request as a chat request (its thinking and C{top_k} as the service says)."""
        call = self.call
        return encode_json(messages_request_to_chat(
            call.body, model or call.model, prefill, effort=config.reasoning_effort == "send", top_k=config.top_k == "pass",
        ))


#: The speakers this package provides, by (client API, target API).
PAIRS = {
    (ANTHROPIC, ANTHROPIC): MessagesToMessages,
    (OPENAI_API, ANTHROPIC): ChatToMessages,
    (ANTHROPIC, OPENAI_API): MessagesToChat,
}
