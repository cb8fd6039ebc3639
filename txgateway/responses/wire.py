"""
What the gateway reads of OpenAI's Responses API (C{POST /v1/responses}),
as pure values with no I/O: the request (its model, whether it streams,
its C{max_output_tokens}), what each event of its stream carries in the
relays' L{ChunkFacts} terms, what a JSON answer says of itself, and the
error event a client of it gets.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from txgateway.anthropic.wire import event_json
from txgateway.bodies import FAST, BodyReading
from txgateway.errors import ErrorKind
from txgateway.openai.wire import AnswerFacts, ChunkFacts, ModelNamed, Usage, read_body
from txgateway.openai.wire import decode_json as _loads
from txgateway.openai.wire import encode_json as _dumps
from txgateway.speaking import IModelCall, bounded_id

__all__ = ["RESPONSES", "ResponsesCall", "ResponsesStreamReader", "error_event", "read_response", "responses_path"]

#: The name of the Responses API (a call's C{api}, a speaker's C{client_api} and C{target_api}).
RESPONSES = "responses"


def responses_path(path: bytes) -> bool:
    """Whether C{path} (under a service's base URL) is the Responses API's model call, C{/responses}."""
    bare = path.split(b"?", 1)[0].rstrip(b"/")
    return bare.endswith(b"/responses") or bare == b"responses"


@implementer(IModelCall)
@attrs.frozen
class ResponsesCall(ModelNamed):
    """
    One Responses request, parsed once: it answers the same questions as
    the other model calls, so the broker, the governor and the access line
    read it alike.

    @ivar body: the decoded JSON object.
    @ivar raw: the body's bytes as the client sent them.
    @ivar stream: C{"stream": true}.
    """

    body: dict
    raw: bytes
    stream: bool
    api = RESPONSES
    generates = True
    #: Never cached: each Response has an id of its own, which a replay must not repeat.
    cacheable = False
    #: Every Responses stream reports its usage in C{response.completed}: nothing is asked for.
    client_wants_usage = True
    #: A broken stream goes on from its text where its target takes a prefill (a translated one:
    #: chat completions, Claude); a native target takes none (its speaker says so).
    resumable_kind = True

    @property
    def unbounded(self) -> str | None:
        """
        Why what it costs is not in its body: a background run (it goes on
        past the answer, unread), or a conversation the target holds
        (C{previous_response_id}, C{conversation}, a stored C{prompt}: input
        the gateway never sees, so it cannot reserve it).
        """
        if self.body.get("background") is True:
            return "'background' runs past its answer, where the gateway cannot read what it spends"
        for field in ("previous_response_id", "conversation", "prompt"):
            if self.body.get(field) is not None:
                return f"{field!r} has the target add input the gateway never reads (send the conversation as input)"
        return None

    @property
    def max_tokens(self) -> int | None:
        """The most the client lets it write: C{max_output_tokens} (reasoning included)."""
        value = self.body.get("max_output_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def capped(self, tokens: int) -> "ResponsesCall":
        """The call let write at most C{tokens}: its C{max_output_tokens}."""
        body = {**self.body, "max_output_tokens": tokens}
        return attrs.evolve(self, body=body, raw=_dumps(body))

    def end_user(self) -> tuple[str | None, None]:
        """The Responses API's C{safety_identifier}, else its C{user}; no session (Codex names it in a header)."""
        return bounded_id(self.body.get("safety_identifier")) or bounded_id(self.body.get("user")), None

    def operation(self, path: bytes) -> str:
        """The GenAI operation, named for the endpoint: C{responses}."""
        return RESPONSES

    @classmethod
    def parse(cls, raw: bytes, reading: BodyReading = FAST) -> "ResponsesCall":
        """
        Read a request body, or raise L{txgateway.speaking.BadCall} when it
        is not a JSON object (or, as C{reading} says, one over its bounds
        or, for a governed caller, one the gateway cannot account for).
        """
        body = read_body(raw, reading)
        return cls(body, raw, body.get("stream") is True)

    def body_for(self, model: str | None) -> bytes:
        """The body sent to a Responses target: C{model} rewritten (unless L{None})."""
        if model is None or model == self.body.get("model"):
            return self._unchanged()
        return _dumps({**self.body, "model": model})


def _usage_of(response: Any) -> Usage | None:
    """A Response's usage in the gateway's terms: input (cached ones too) and output, reasoning included."""
    if type(response) is not dict:
        return None
    usage = response.get("usage")
    if type(usage) is not dict or not ("input_tokens" in usage or "output_tokens" in usage):
        return None
    model = response.get("model")
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    return Usage.reported(model if type(model) is str else None, usage.get("input_tokens"), usage.get("output_tokens"), cached)


def read_response(body: bytes) -> AnswerFacts:
    """The usage, id and status a Response JSON answer reports (none of them when it is not one)."""
    try:
        decoded = _loads(body)
    except (ValueError, UnicodeDecodeError):
        return AnswerFacts()
    if type(decoded) is not dict:
        return AnswerFacts()
    response_id = decoded.get("id")
    status = decoded.get("status")
    return AnswerFacts(
        _usage_of(decoded), response_id if isinstance(response_id, str) else None, (status,) if isinstance(status, str) else (),
    )


def sse_event(name: str, data: dict) -> bytes:
    """One server-sent event of the Responses API: its type named twice, as the API does."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + _dumps(data) + b"\n\n"


#: The events whose deltas are the answer's output: the first commits the attempt.
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta"})
_OTHER_OUTPUT = frozenset({
    "response.function_call_arguments.delta", "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
    "response.custom_tool_call_input.delta",
})
#: The events that end a Response: its usage is in their C{response}.
_ENDS = frozenset({"response.completed", "response.incomplete"})


class ResponsesStreamReader:
    """
    Reads a Responses event stream one whole event at a time, in the
    terms of L{ChunkFacts}.  The first output delta (text, a refusal, a
    function call's arguments, reasoning) or an output item that is not a
    message (a function call, a reasoning item) is the commit point; only
    text keeps the stream's text.  C{response.completed} (or
    C{response.incomplete}) ends it, with the usage; C{error} and
    C{response.failed} end the attempt like a malformed event.  A stream
    whose body ends before its end event is broken (L{needs_end}), never a
    truncated success.
    """

    #: The stream is whole only with its end event (the relay breaks one that ends without it).
    needs_end = True

    def __init__(self, after_space: bool = False) -> None:
        #: The Response as C{response.created} said it, for the closing events of a cut stream.
        self._response: dict = {}
        self._sequence = 0

    def closing_events(self, last: dict | None, reserved: int) -> list[bytes]:
        """
        The event that ends a Responses stream the gateway cut at the
        C{reserved} output tokens, as the API ends one that reached
        C{max_output_tokens}: C{response.incomplete}.
        """
        response = {
            **self._response, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
            "usage": {"output_tokens": reserved},
        }
        data = {"type": "response.incomplete", "sequence_number": self._sequence + 1, "response": response}
        return [sse_event("response.incomplete", data)]

    def __call__(self, event: bytes) -> ChunkFacts:
        data = event_json(event)
        if data is None:
            return ChunkFacts()
        if type(data) is not dict:
            return ChunkFacts(malformed=f"an event that is not a JSON object: {bytes(data)[:60]!r}")
        sequence = data.get("sequence_number")
        if type(sequence) is int:
            self._sequence = sequence
        kind = data.get("type")
        if kind in _TEXT_DELTAS:
            delta = data.get("delta")
            return ChunkFacts(data, text=delta if type(delta) is str else "", token=True)
        if kind in _OTHER_OUTPUT:
            return ChunkFacts(data, token=True, tool_call=True)
        if kind == "response.output_item.added":
            item = data.get("item")
            if type(item) is dict and item.get("type") != "message":
                return ChunkFacts(data, token=True, tool_call=True)
            return ChunkFacts(data)
        if kind in _ENDS:
            response = data.get("response")
            status = response.get("status") if type(response) is dict else None
            reasons = (status,) if type(status) is str else ("completed",)
            return ChunkFacts(data, done=True, token=True, finished=True, usage=_usage_of(response), finish_reasons=reasons)
        if kind in ("response.created", "response.in_progress"):
            response = data.get("response")
            if type(response) is dict:
                self._response = {key: response[key] for key in ("id", "object", "created_at", "model") if key in response}
                response_id = response.get("id")
                return ChunkFacts(data, message_id=response_id if type(response_id) is str else None)
            return ChunkFacts(data)
        if kind == "response.failed":
            response = data.get("response")
            error = response.get("error") if type(response) is dict else None
            error = error if type(error) is dict else {}
            return ChunkFacts(malformed=f"the response failed: {error.get('code')}: {error.get('message')}")
        if kind == "error":
            return ChunkFacts(malformed=f"an error event: {data.get('code')}: {data.get('message')}")
        return ChunkFacts(data)  # the other events (item and part boundaries, dones): passed on


def error_event(kind: ErrorKind, message: str, request_id: str) -> bytes:
    """
    The event that tells a Responses client its stream broke: the API's
    C{error} event (an SDK raises it), the gateway's stable type as its
    C{code}, the request id beside it.
    """
    return sse_event("error", {
        "type": "error", "code": kind.type, "message": message, "param": None, "request_id": request_id,
    })

