"""
What the gateway reads of OpenAI's wire format, as pure functions and
values with no I/O: the request body (its model, whether it streams), the
body sent to each target, what a backend's refusal means for the next
target, server-sent events split as they arrive, and what each streamed
chunk carries (text, a finish, usage).

Only traffic of services with C{api = openai} comes here; nothing else
pays for it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from zope.interface import implementer

from txgateway.bodies import FAST, BadBody, BodyReading
from txgateway.speaking import BadCall, IModelCall, bounded_id

try:
    from orjson import dumps as _orjson_dumps
    from orjson import loads as _loads  # a chunk in a fraction of json's time

    def _dumps(value: Any) -> bytes:
        return _orjson_dumps(value)

except ImportError:  # PyPy: its json is fast enough

    _loads = json.loads

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


#: JSON in and out, as fast as this interpreter can (for the translations too).
encode_json = _dumps
decode_json = _loads

__all__ = [
    "AnswerFacts",
    "BadCall",
    "ChunkFacts",
    "EventSplitter",
    "OpenAICall",
    "USAGE_BOUND",
    "Usage",
    "reported_count",
    "after_refusal",
    "chunk_event",
    "closing_events",
    "decode_json",
    "encode_json",
    "error_codes",
    "read_answer",
    "read_body",
    "model_call_path",
    "read_chunk",
    "split_events",
]

#: The endpoints whose streams the gateway follows token by token.
CHAT = "chat"
COMPLETIONS = "completions"

#: C{error.code} (or C{type}) values of a 400 after which the next target may do better.
_NEXT_TARGET_CODES = frozenset({"context_length_exceeded"})
#: C{error.code} (or C{type}) values of a 400 that no other target may see.
_PASS_THROUGH_CODES = frozenset({"content_policy_violation", "content_filter"})
#: Words of an error message (vLLM's, Anthropic's, which carry no such code) that say the prompt is too long.
CONTEXT_PHRASES = ("maximum context length", "prompt is too long", "context limit", "context window")


def read_body(raw: bytes, reading: BodyReading = FAST) -> dict:
    """
    A request's JSON object, read as C{reading} says (bounded, and strictly
    for a governed caller).

    @raise BadCall: it is not one (the message says why).
    """
    try:
        return reading.read(raw, _loads)
    except BadBody as error:
        raise BadCall(str(error)) from None


def _endpoint_kind(path: bytes) -> str | None:
    path = path.split(b"?", 1)[0].rstrip(b"/")
    if path.endswith(b"chat/completions"):
        return CHAT
    if path.endswith(b"/completions") or path == b"completions":
        return COMPLETIONS
    return None


def model_call_path(path: bytes) -> bool:
    """
    Whether C{path} (under a service's base URL) is one of OpenAI's model
    calls the gateway reads: chat and text completions, embeddings (the
    Responses API is L{txgateway.responses}').
    """
    bare = path.split(b"?", 1)[0].rstrip(b"/")
    return _endpoint_kind(bare) is not None or bare.endswith(b"/embeddings") or bare == b"embeddings"


class ModelNamed:
    """What every model call's body says alike: the model the client asked for."""

    __slots__ = ()
    body: dict
    raw: bytes

    @property
    def model(self) -> str | None:
        """The C{model} the client asked for (a string, or L{None})."""
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    def answer_started(self) -> None:
        """
        The client's answer started: the body's bytes as sent are let go
        (a stream lasts minutes, its prompt tens of KB).  Nothing sends the
        request unchanged again: a resume's body is made from the parsed
        call (and would be, unchanged, from it too).
        """
        object.__setattr__(self, "raw", b"")  # the one field of the frozen call that changes

    def _unchanged(self) -> bytes:
        """The body as the client sent it, or as made again from the parsed call once let go."""
        return self.raw or _dumps(self.body)


@implementer(IModelCall)
@attrs.frozen
class OpenAICall(ModelNamed):
    """
    One OpenAI request, parsed once.

    @ivar body: the decoded JSON object.
    @ivar raw: the body's bytes as the client sent them.
    @ivar kind: C{chat}, C{completions}, or L{None} for any other endpoint.
    @ivar stream: C{"stream": true} on a chat or text completion.
    @ivar client_wants_usage: the client asked for the usage chunk itself.
    """

    body: dict
    raw: bytes
    kind: str | None
    stream: bool
    client_wants_usage: bool
    #: The endpoint generates text (chat, text completions, OpenAI's Responses API):
    #: its completion is reserved.
    generates: bool = False
    #: The client's API (a Messages request says C{anthropic}).
    api = "openai"
    #: Its answer may be kept by the response cache (a service with C{cache}).
    cacheable = True
    #: Everything it costs is in its body: it is bounded.
    unbounded = None

    @property
    def max_tokens(self) -> int | None:
        """The most the client lets it complete: C{max_completion_tokens}, else C{max_tokens}."""
        for field in ("max_completion_tokens", "max_tokens"):
            value = self.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def capped(self, tokens: int) -> "OpenAICall":
        """
        The call let complete at most C{tokens} (split among its C{n}
        choices): in the field the client used, else C{max_completion_tokens}
        (C{max_tokens} for a text completion).
        """
        choices = self.body.get("n")
        per_choice = tokens // choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1 else tokens
        field = next((name for name in ("max_completion_tokens", "max_tokens") if name in self.body), None)
        if field is None:
            field = "max_tokens" if self.kind == COMPLETIONS else "max_completion_tokens"
        body = {**self.body, field: per_choice}
        return attrs.evolve(self, body=body, raw=encode_json(body))

    def end_user(self) -> tuple[str | None, None]:
        """OpenAI's C{user}, else its C{safety_identifier}; no session."""
        return bounded_id(self.body.get("user")) or bounded_id(self.body.get("safety_identifier")), None

    def operation(self, path: bytes) -> str:
        """The GenAI operation: C{chat}, C{text_completion}, C{embeddings}, or the path's last word."""
        if self.kind == CHAT:
            return "chat"
        if self.kind == COMPLETIONS:
            return "text_completion"
        last = path.split(b"?", 1)[0].rstrip(b"/").rsplit(b"/", 1)[-1]
        return last.decode("ascii", "replace") or "other"

    @property
    def single_choice(self) -> bool:
        """One choice is asked for (C{n} absent or 1): the only kind a stream can be resumed for."""
        return self.body.get("n") in (None, 1)

    @classmethod
    def parse(cls, raw: bytes, path: bytes, reading: BodyReading = FAST) -> "OpenAICall":
        """
        Read a request body, or raise L{BadCall} when it is not a JSON
        object (or, as C{reading} says, one over its bounds or, for a
        governed caller, one the gateway cannot account for, naming the field).
        """
        body = read_body(raw, reading)
        kind = _endpoint_kind(path)
        stream = kind is not None and body.get("stream") is True
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return cls(body, raw, kind, stream, wants_usage, kind is not None)

    def body_for(self, model: str | None, prefill: str | None = None) -> bytes:
        """
        The body sent to a target: C{model} rewritten (unless L{None}), the
        usage chunk asked for on a stream, and with C{prefill} the assistant
        text so far (one more message, or the end of a text prompt).
        """
        changes: dict[str, Any] = {}
        if model is not None and model != self.body.get("model"):
            changes["model"] = model
        if self.stream and not self.client_wants_usage:
            options = self.body.get("stream_options")
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if prefill is not None:
            if self.kind == CHAT:
                messages = self.body.get("messages")
                messages = list(messages) if isinstance(messages, list) else []
                changes["messages"] = [*messages, {"role": "assistant", "content": prefill}]
            elif self.kind == COMPLETIONS and isinstance(self.body.get("prompt"), str):
                changes["prompt"] = self.body["prompt"] + prefill
        if not changes:
            return self._unchanged()
        return _dumps({**self.body, **changes})

    @property
    def resumable_kind(self) -> bool:
        """Whether a broken stream of this request can be asked for again with its text as a prefill."""
        if not (self.stream and self.single_choice):
            return False
        return self.kind == CHAT or (self.kind == COMPLETIONS and isinstance(self.body.get("prompt"), str))


#: What a refusal means: try the next target, or give the client this answer.
NEXT_TARGET = "next_target"
PASS_THROUGH = "pass_through"


def error_codes(body: bytes | None) -> tuple[set[str], str]:
    """The C{code}/C{type} strings of an OpenAI-style error body, and its message."""
    if not body:
        return set(), ""
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return set(), ""
    if not isinstance(decoded, dict):
        return set(), ""
    error = decoded.get("error")
    holder = error if isinstance(error, dict) else decoded
    codes = {value for value in (holder.get("code"), holder.get("type")) if isinstance(value, str)}
    message = holder.get("message")
    if isinstance(error, str):
        message = error
    return codes, message if isinstance(message, str) else ""


def after_refusal(code: int, body: bytes | None) -> str:
    """
    What a backend's 4xx (but 429) means between targets: L{NEXT_TARGET}
    for 401, 403, 404 and a 400 whose context length was exceeded (that
    model or key cannot serve it, another may); L{PASS_THROUGH} for a
    content filter's 400 and any other 4xx (the client's to see).
    """
    if code in (401, 403, 404):
        return NEXT_TARGET
    if code == 400:
        codes, message = error_codes(body)
        if codes & _PASS_THROUGH_CODES:
            return PASS_THROUGH
        # vLLM, Anthropic and others say it in words, with no code.
        lowered = message.lower()
        if codes & _NEXT_TARGET_CODES or any(phrase in lowered for phrase in CONTEXT_PHRASES):
            return NEXT_TARGET
    return PASS_THROUGH


#: The most tokens one backend answer is believed to report in any field;
#: more (or less than 0) is a hostile or broken backend's number, clamped.
USAGE_BOUND = 100_000_000


def reported_count(value: Any) -> tuple[int, bool]:
    """
    A token count as a backend reported it, bounded: an integer from 0 to
    L{USAGE_BOUND} (a whole float is taken as its integer), and whether it
    had to be clamped to be one (a negative, a huge or a fractional number,
    not a number at all).  Absent (L{None}) is 0, not clamped.
    """
    if value is None:
        return 0, False
    if type(value) is int:
        if 0 <= value <= USAGE_BOUND:
            return value, False
        return (0 if value < 0 else USAGE_BOUND), True
    if type(value) is float and value == value:
        if value.is_integer() and 0 <= value <= USAGE_BOUND:
            return int(value), False
        return (0 if value < 0 else USAGE_BOUND if value > USAGE_BOUND else int(value)), True
    return 0, True


@attrs.frozen
class Usage:
    """The tokens one backend answer reports, and the model it names."""

    model: str | None
    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens the backend served from its cache (C{prompt_tokens_details.cached_tokens}).
    cached_tokens: int = 0
    #: A number the backend reported was out of bounds (negative, huge, not a number) and was clamped.
    clamped: bool = False
    #: The answer's whole usage; L{False}: only what it knew so far (a Messages
    #: stream's C{message_start}), which a later report completes.
    final: bool = True

    @classmethod
    def reported(cls, model: str | None, prompt: Any, completion: Any, cached: Any = None, final: bool = True) -> "Usage":
        """A backend's usage with each count bounded (see L{reported_count}); the cached tokens at most the prompt's."""
        if (type(prompt) is int and type(completion) is int and 0 <= prompt <= USAGE_BOUND
                and 0 <= completion <= USAGE_BOUND and (cached is None or (type(cached) is int and 0 <= cached <= prompt))):
            return cls(model, prompt, completion, cached or 0, False, final)  # what every honest backend reports
        prompt_tokens, bad_prompt = reported_count(prompt)
        completion_tokens, bad_completion = reported_count(completion)
        cached_tokens, bad_cached = reported_count(cached)
        return cls(
            model, prompt_tokens, completion_tokens, min(cached_tokens, prompt_tokens),
            bad_prompt or bad_completion or bad_cached, final,
        )

    def merged(self, later: "Usage") -> "Usage":
        """
        This answer's usage with a later report of the same answer: each
        count the most either says (a stream that reports cumulative usage
        on every chunk is counted once, not summed).
        """
        return Usage(
            later.model or self.model,
            max(self.prompt_tokens, later.prompt_tokens),
            max(self.completion_tokens, later.completion_tokens),
            max(self.cached_tokens, later.cached_tokens),
            self.clamped or later.clamped,
            self.final or later.final,
        )


def _usage_from(decoded: Any) -> Usage | None:
    if not isinstance(decoded, dict):
        return None
    usage = decoded.get("usage")
    if not isinstance(usage, dict):
        return None
    model = decoded.get("model")
    model = model if isinstance(model, str) else None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage.reported(model, usage.get("prompt_tokens"), usage.get("completion_tokens"), cached)
    if "input_tokens" in usage or "output_tokens" in usage:
        # OpenAI's Responses API counts input and output (reasoning included).
        details = usage.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage.reported(model, usage.get("input_tokens"), usage.get("output_tokens"), cached)
    return None  # no count at all: not a usage to settle by


@attrs.frozen
class AnswerFacts:
    """What a JSON answer says of itself: its usage, its id, and why each of its choices ended."""

    usage: Usage | None = None
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()


_NO_FACTS = AnswerFacts()


def read_answer(body: bytes) -> AnswerFacts:
    """The usage, id and finish reasons a JSON answer reports (none of them when it is not one)."""
    try:
        decoded = _loads(body)
    except (ValueError, UnicodeDecodeError):
        return _NO_FACTS
    if type(decoded) is not dict:
        return _NO_FACTS
    answer_id = decoded.get("id")
    return AnswerFacts(_usage_from(decoded), answer_id if type(answer_id) is str else None, _finish_reasons(decoded.get("choices")))


def _finish_reasons(choices: Any) -> tuple[str, ...]:
    if type(choices) is not list:
        return ()
    return tuple(
        choice["finish_reason"] for choice in choices if type(choice) is dict and type(choice.get("finish_reason")) is str
    )


def split_events(tail: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """
    The events that C{data} completes after C{tail} (what came after the
    last whole event before it), each with its blank-line end, and the new
    tail: what an L{EventSplitter} does, for a holder that keeps its own tail.
    """
    buffer = tail + data if tail else data
    if b"\r" not in buffer:
        # The usual stream: events end with a blank line of "\n" alone.
        parts = buffer.split(b"\n\n")
        tail = parts.pop()
        return [part + b"\n\n" for part in parts], tail
    events = []
    start = 0
    while True:
        end, size = _event_end(buffer, start)
        if end < 0:
            break
        events.append(buffer[start : end + size])
        start = end + size
    return events, buffer[start:]


class EventSplitter:
    """
    Cuts a server-sent-event stream into whole events as bytes arrive: an
    event split over reads waits for its end, several in one read come
    out together.  Only the unfinished tail is ever kept.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The events completed by C{data}, each with its blank-line end."""
        events, self._tail = split_events(self._tail, data)
        return events

    @property
    def waiting(self) -> bytes:
        """What came after the last whole event, kept until its end comes (L{rest} takes it)."""
        return self._tail

    def rest(self) -> bytes:
        """What came after the last whole event (a last event without its blank line)."""
        tail, self._tail = self._tail, b""
        return tail


def chunk_event(chunk: dict) -> bytes:
    """One server-sent event carrying C{chunk}."""
    return b"data: " + _dumps(chunk) + b"\n\n"


def closing_events(last: dict | None, reserved: int) -> list[bytes]:
    """
    The events that end a completion stream the gateway cut at the
    C{reserved} completion tokens, as an OpenAI backend would have ended it: choice 0
    finished for C{length}, then C{[DONE]}.  C{last}: the stream's last
    chunk, whose id, creation time and model the closing chunk carries.
    """
    last = last or {}
    chunk = {
        "id": last.get("id") or "chatcmpl-cut", "object": last.get("object") or "chat.completion.chunk",
        "created": last.get("created") or 0, "model": last.get("model") or "",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
    }
    if "choices" in last and isinstance(last["choices"], list) and last["choices"] and isinstance(last["choices"][0], dict) \
            and "text" in last["choices"][0]:
        chunk["choices"] = [{"index": 0, "text": "", "finish_reason": "length"}]  # a text completion
    return [chunk_event(chunk), b"data: [DONE]\n\n"]


def _event_end(buffer: bytes, start: int) -> tuple[int, int]:
    """Where the first blank line at or after C{start} begins, and its length (-1 when none)."""
    lf = buffer.find(b"\n\n", start)
    crlf = buffer.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, 2


@attrs.define(slots=True)
class ChunkFacts:
    """
    What one server-sent event of a chat or text completion stream carries.

    @ivar data: the decoded JSON chunk, or L{None} (a comment, C{[DONE]},
        no data).
    @ivar done: the event is C{data: [DONE]}.
    @ivar text: the text it adds to choice 0.
    @ivar token: it carries content, a finish reason or usage (the commit
        point's signal); role-only chunks and comments do not.
    @ivar finished: choice 0 got its C{finish_reason}.
    @ivar finish_reasons: the C{finish_reason}s it carries, of any choice.
    @ivar usage: the usage it reports.
    @ivar usage_only: a usage chunk with no choices (the one C{include_usage} adds).
    @ivar tool_call: choice 0 calls a tool, or a Messages stream carries
        anything but text (thinking, a tool use): such a stream cannot be
        resumed by text.
    @ivar malformed: the data is not a JSON object (the reason), else L{None}.
    """

    data: dict | None = None
    done: bool = False
    text: str = ""
    token: bool = False
    finished: bool = False
    usage: Usage | None = None
    usage_only: bool = False
    tool_call: bool = False
    malformed: str | None = None
    finish_reasons: tuple[str, ...] = ()
    #: The answer's id, when the event names it apart from C{data["id"]} (a Messages C{message_start}).
    message_id: str | None = None
    #: The event as the client gets it, when the reader changed it (else the event as it came).
    rewritten: bytes | None = None


_NOTHING = ChunkFacts()


def _event_data(event: bytes) -> bytes | None:
    """The joined C{data:} lines of one event, or L{None} when it has none."""
    if event.startswith(b"data: ") and event.endswith(b"\n\n"):
        one = event[6:-2]
        if b"\n" not in one and b"\r" not in one:
            return one  # the usual event: one data line
    lines = None
    for line in event.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            lines = [value] if lines is None else [*lines, value]
    if lines is None:
        return None
    return b"\n".join(lines)


def read_chunk(event: bytes) -> ChunkFacts:
    """What one whole event of a completion stream carries."""
    data = _event_data(event)
    if data is None:
        return _NOTHING
    if data == b"[DONE]" or data.strip() == b"[DONE]":
        return ChunkFacts(done=True, token=True, finished=True)
    try:
        decoded = _loads(data)
    except (ValueError, UnicodeDecodeError):
        return ChunkFacts(malformed=f"a chunk that is not JSON: {data[:60]!r}")
    if type(decoded) is not dict:
        return ChunkFacts(malformed=f"a chunk that is not a JSON object: {data[:60]!r}")
    usage = _usage_from(decoded) if decoded.get("usage") else None
    choices = decoded.get("choices")
    text = ""
    token = usage is not None
    finished = tool_call = False
    reasons: tuple[str, ...] = ()
    if type(choices) is list:
        for choice in choices:
            if type(choice) is not dict:
                continue
            reason = choice.get("finish_reason")
            if reason and type(reason) is str:
                reasons += (reason,)
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if type(delta) is dict:
                content = delta.get("content")
                if type(content) is str:
                    text = content
                for key, value in delta.items():
                    if key != "role" and value:
                        token = True
                        if key in ("tool_calls", "function_call"):
                            tool_call = True
            elif type(choice.get("text")) is str:
                text = choice["text"]
                token = token or bool(text)
            if reason:
                finished = token = True
    return ChunkFacts(decoded, False, text, token, finished, usage, usage is not None and not choices, tool_call, None, reasons)
