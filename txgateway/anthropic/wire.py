"""
What the gateway reads of Anthropic's Messages API, as pure functions and
values with no I/O: the request body (its model, whether it streams, its
C{max_tokens}), the body sent to each Anthropic target, what each event of
a Messages stream carries (in the terms of L{ChunkFacts}, the same facts
the relays read of an OpenAI stream), what a JSON answer says of itself,
and the error shape of the API.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from zope.interface import implementer

from txgateway import errors
from txgateway.errors import ErrorKind
from txgateway.bodies import FAST, BodyReading
from txgateway.openai.wire import AnswerFacts, ChunkFacts, ModelNamed, Usage, read_body, reported_count
from txgateway.openai.wire import decode_json as _loads
from txgateway.speaking import IModelCall, bounded_id
from txgateway.openai.wire import encode_json as _dumps

__all__ = [
    "ANTHROPIC",
    "MESSAGES",
    "MessagesCall",
    "MessagesStreamReader",
    "anthropic_error",
    "error_type_for",
    "gateway_error_body",
    "messages_path",
    "read_message",
    "event_json",
    "sse_event",
]

#: The name of Anthropic's API (a service's C{api}, a call's C{api}).
ANTHROPIC = "anthropic"
#: The kind of a Messages request (as C{chat} is of an OpenAI chat completion).
MESSAGES = "messages"

def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@implementer(IModelCall)
@attrs.frozen
class MessagesCall(ModelNamed):
    """
    One Messages request (C{POST /v1/messages}), parsed once.  It answers
    the same questions as L{txgateway.openai.wire.OpenAICall}, so the
    broker, the governor and the access line read either alike.

    @ivar body: the decoded JSON object.
    @ivar raw: the body's bytes as the client sent them.
    @ivar stream: C{"stream": true}.
    """

    body: dict
    raw: bytes
    stream: bool
    api = ANTHROPIC
    cacheable = True
    unbounded = None
    kind = MESSAGES
    generates = True
    #: A Messages stream always reports its usage (in C{message_delta}).
    client_wants_usage = True
    single_choice = True

    @property
    def max_tokens(self) -> int | None:
        """C{max_tokens}, which the API requires."""
        return _integer(self.body.get("max_tokens"))

    def capped(self, tokens: int) -> "MessagesCall":
        """The call let complete at most C{tokens}: its C{max_tokens}."""
        body = {**self.body, "max_tokens": tokens}
        return attrs.evolve(self, body=body, raw=_dumps(body))

    def end_user(self) -> tuple[str | None, str | None]:
        """
        C{metadata.user_id}; Claude Code's is a JSON string, whose
        C{account_uuid} (else C{device_id}) is the user and C{session_id}
        the session.
        """
        metadata = self.body.get("metadata")
        said = metadata.get("user_id") if isinstance(metadata, dict) else None
        if isinstance(said, str) and said.startswith("{"):
            try:
                fields = json.loads(said)
            except ValueError:
                fields = None
            if isinstance(fields, dict):
                user = bounded_id(fields.get("account_uuid")) or bounded_id(fields.get("device_id"))
                return user, bounded_id(fields.get("session_id"))
        return bounded_id(said), None

    def operation(self, path: bytes) -> str:
        """The GenAI operation: always C{chat}."""
        return "chat"

    @property
    def resumable_kind(self) -> bool:
        """A stream may be continued from its text (Anthropic's API continues an assistant prefill)."""
        return self.stream

    @classmethod
    def parse(cls, raw: bytes, reading: BodyReading = FAST) -> "MessagesCall":
        """
        Read a request body, or raise L{BadCall} when it is not a JSON
        object (or, as C{reading} says, one over its bounds or, for a
        governed caller, one the gateway cannot account for, naming the field).
        """
        body = read_body(raw, reading)
        return cls(body, raw, body.get("stream") is True)

    def body_for(self, model: str | None, prefill: str | None = None) -> bytes:
        """
        The body sent to an Anthropic target: C{model} rewritten (unless
        L{None}) and, with C{prefill}, the assistant text so far as the last
        message (which the API continues).
        """
        changes: dict[str, Any] = {}
        if model is not None and model != self.body.get("model"):
            changes["model"] = model
        if prefill is not None:
            changes["messages"] = with_prefill(self.body.get("messages"), prefill)
        if not changes:
            return self._unchanged()
        return _dumps({**self.body, **changes})


def messages_path(path: bytes) -> bool:
    """Whether C{path} (under a service's base URL) is the Messages API's model call, C{/messages}."""
    bare = path.split(b"?", 1)[0].rstrip(b"/")
    return bare.endswith(b"/messages") or bare == b"messages"


def with_prefill(messages: Any, prefill: str) -> list:
    """
    C{messages} with the assistant's text so far last, as Anthropic's API
    continues it: without its trailing whitespace (which the API refuses
    in a final assistant turn), joined to a last assistant message.
    """
    messages = list(messages) if isinstance(messages, list) else []
    text = prefill.rstrip()
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        last = messages[-1]
        content = last.get("content")
        if isinstance(content, str):
            return [*messages[:-1], {**last, "content": (content + text).rstrip()}]
        if isinstance(content, list):
            return [*messages[:-1], {**last, "content": [*content, {"type": "text", "text": text}]}]
    return [*messages, {"role": "assistant", "content": text}]


def sse_event(name: str, data: dict) -> bytes:
    """One server-sent event as Anthropic's API writes it: its type named, then its data."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + _dumps(data) + b"\n\n"


def _usage_of(usage: Any, model: str | None, final: bool = True) -> Usage | None:
    """A Messages usage object in the gateway's terms: every input token is a prompt token."""
    if not isinstance(usage, dict):
        return None
    fresh, bad_fresh = reported_count(usage.get("input_tokens"))
    written, bad_written = reported_count(usage.get("cache_creation_input_tokens"))
    read, bad_read = reported_count(usage.get("cache_read_input_tokens"))
    found = Usage.reported(model, fresh + written + read, usage.get("output_tokens"), read, final)
    return attrs.evolve(found, clamped=True) if bad_fresh or bad_written or bad_read else found


def read_message(body: bytes) -> AnswerFacts:
    """The usage, id and stop reason a Messages JSON answer reports (none of them when it is not one)."""
    try:
        decoded = _loads(body)
    except (ValueError, UnicodeDecodeError):
        return AnswerFacts()
    if type(decoded) is not dict:
        return AnswerFacts()
    model = decoded.get("model")
    usage = _usage_of(decoded.get("usage"), model if isinstance(model, str) else None)
    message_id = decoded.get("id")
    reason = decoded.get("stop_reason")
    return AnswerFacts(usage, message_id if isinstance(message_id, str) else None, (reason,) if isinstance(reason, str) else ())


def event_json(event: bytes) -> Any:
    """The decoded C{data:} of one event, L{None} when it has none, or the bytes when it is not JSON."""
    data = None
    for line in event.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:].lstrip(b" ")
            data = value if data is None else data + b"\n" + value
    if data is None:
        return None
    try:
        return _loads(data)
    except (ValueError, UnicodeDecodeError):
        return data


class MessagesStreamReader:
    """
    Reads a Messages event stream one whole event at a time, in the terms
    of L{ChunkFacts}: a content delta (or a tool use starting) is a token,
    the end events (C{content_block_stop}, C{message_delta},
    C{message_stop}) count as tokens too; C{message_start} and C{ping} do
    not.  The usage is reported once, at C{message_delta}, with the input
    tokens C{message_start} said.  An C{error} event ends the attempt like
    a malformed chunk.  Thinking, like a tool use, makes the stream one
    that cannot be continued from its text.

    @param after_space: the stream continues a prefill whose trailing
        whitespace was cut (the API refuses it): the whitespace its first
        text begins with is left out, as the client has had it.
    """

    def __init__(self, after_space: bool = False) -> None:
        self._model: str | None = None
        self._input: Usage | None = None
        self._after_space = after_space
        #: The index of the content block open now (started, not stopped), or L{None}.
        self._open_block: Any = None

    def closing_events(self, last: dict | None, reserved: int) -> list[bytes]:
        """
        The events that end a Messages stream the gateway cut at the
        C{reserved} output tokens, as the API ends one that reached
        C{max_tokens}: the open content block stopped, C{message_delta}
        with C{stop_reason} C{max_tokens} and those tokens as its output,
        C{message_stop}.
        """
        events = []
        if self._open_block is not None:
            events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": self._open_block}))
        events.append(sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": reserved},
        }))
        events.append(sse_event("message_stop", {"type": "message_stop"}))
        return events

    def __call__(self, event: bytes) -> ChunkFacts:
        data = event_json(event)
        if data is None:
            return ChunkFacts()
        if type(data) is not dict:
            return ChunkFacts(malformed=f"an event that is not a JSON object: {bytes(data)[:60]!r}")
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data.get("delta")
            delta = delta if type(delta) is dict else {}
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                text = text if type(text) is str else ""
                if self._after_space:
                    self._after_space = False
                    if text[:1].isspace():
                        text = text.lstrip()
                        data = {**data, "delta": {**delta, "text": text}}
                        return ChunkFacts(data, text=text, token=True, rewritten=sse_event("content_block_delta", data))
                return ChunkFacts(data, text=text, token=True)
            return ChunkFacts(data, token=True, tool_call=True)
        if kind == "content_block_start":
            self._open_block = data.get("index")
            block = data.get("content_block")
            block_type = block.get("type") if type(block) is dict else None
            if block_type == "text":
                return ChunkFacts(data)
            return ChunkFacts(data, token=True, tool_call=True)
        if kind == "message_start":
            message = data.get("message")
            message = message if type(message) is dict else {}
            model = message.get("model")
            self._model = model if type(model) is str else None
            self._input = _usage_of(message.get("usage"), self._model, final=False)
            message_id = message.get("id")
            # What the prompt cost is known now: a stream left before its end still settles it.
            return ChunkFacts(data, message_id=message_id if type(message_id) is str else None, usage=self._input)
        if kind == "message_delta":
            delta = data.get("delta")
            reason = delta.get("stop_reason") if type(delta) is dict else None
            usage = _usage_of(data.get("usage"), self._model)
            if usage is not None and self._input is not None and usage.prompt_tokens == 0:
                usage = attrs.evolve(usage, prompt_tokens=self._input.prompt_tokens, cached_tokens=self._input.cached_tokens)
            reasons = (reason,) if type(reason) is str else ()
            return ChunkFacts(data, token=True, finished=bool(reasons), usage=usage, finish_reasons=reasons)
        if kind == "content_block_stop":
            self._open_block = None
            return ChunkFacts(data, token=True)
        if kind == "message_stop":
            return ChunkFacts(data, done=True, token=True, finished=True)
        if kind == "error":
            error = data.get("error")
            error = error if type(error) is dict else {}
            return ChunkFacts(malformed=f"an error event: {error.get('type')}: {error.get('message')}")
        return ChunkFacts(data)  # ping, and event types this gateway does not know: passed on


#: The Messages API's error type for each of the gateway's own errors.  A
#: gateway that cannot serve at all (every circuit open) is overloaded:
#: 529, which Anthropic's SDKs raise as C{OverloadedError} and retry.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STATUS_OF_KIND = {errors.CIRCUIT_OPEN.type: 529}


def error_type_for(status: int) -> str:
    """The Messages API's error type for an answer's status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def anthropic_error(status: int, message: str, request_id: str | None = None) -> bytes:
    """The Messages API's error body: C{{"type": "error", "error": {"type", "message"}, "request_id"}}."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type_for(status), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return _dumps(body)


def gateway_error_body(kind: ErrorKind, message: str, request_id: str) -> tuple[int, bytes]:
    """
    The status and Anthropic-shaped body of one of the gateway's own
    errors; the gateway's stable type stays in C{error.txgateway_type}.
    """
    status = _STATUS_OF_KIND.get(kind.type, kind.status)
    body = {
        "type": "error",
        "error": {"type": error_type_for(status), "message": message, "txgateway_type": kind.type},
        "request_id": request_id,
    }
    return status, _dumps(body)
