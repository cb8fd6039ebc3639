"""
The seam between routing and the APIs it carries: routing decides where a
call goes and when to try again; how a call is said to a target and its
answer read back belongs to the API's own package, behind L{ISpeaker}.

One name says "which API" everywhere: C{api} (a service's C{api}, a model
call's C{api}), C{client_api} and C{target_api} (a speaker's, the request
context's, an attempt span's).  A speaker
serves one pair of them (OpenAI to OpenAI, Messages to OpenAI, ...); a new
API is a new package with its L{IApi} and its speakers, registered in
L{Speakers}, and no change to routing.

Also the vocabulary both sides share: L{BadCall}, L{Untranslatable}, the
L{Transcript} of a streamed answer, and the L{AnswerReading} routing hands
a speaker for one attempt's answer.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "BadCall",
    "FIRST_BYTE",
    "FIRST_TOKEN",
    "WHOLE_ANSWER",
    "AnswerReading",
    "IApi",
    "IModelCall",
    "ISpeaker",
    "MessageText",
    "PlainHttp",
    "Speakers",
    "TextBuffer",
    "Transcript",
    "Untranslatable",
]

#: What an attempt waits for before its answer is final (its commit point):
#: the first body byte, a completion stream's first token, or (for an
#: answer translated whole) all of it.
FIRST_BYTE, FIRST_TOKEN, WHOLE_ANSWER = "first byte", "first token", "whole answer"


class BadCall(ValueError):
    """The body is not a model request the gateway can route (the message says why)."""


class Untranslatable(ValueError):
    """
    A request field (or endpoint) that has no equivalent in the target's
    API: the target is left out, or the client gets a 400 naming it.
    """


class TextBuffer:
    """
    Text that arrives in pieces (a stream's deltas), kept as its UTF-8
    bytes in one growing buffer: a stream of minutes has thousands of
    pieces of a few characters, each of which would otherwise be a string
    of its own (about 55 bytes for 4 characters).  Lone surrogates (JSON
    allows them) are kept as they came.
    """

    __slots__ = ("_utf8",)

    def __init__(self) -> None:
        self._utf8 = bytearray()

    @staticmethod
    def encoded(text: str) -> bytes:
        """C{text} as the buffer keeps it: UTF-8, a lone surrogate as its three bytes."""
        return text.encode("utf-8", "surrogatepass")

    def append(self, text: str) -> int:
        """Add C{text}; the UTF-8 bytes it took (L{encoded})."""
        encoded = self.encoded(text)
        self._utf8 += encoded
        return len(encoded)

    def __bool__(self) -> bool:
        return bool(self._utf8)

    def __len__(self) -> int:
        """The UTF-8 bytes kept."""
        return len(self._utf8)

    def __str__(self) -> str:
        """All the text added, in order."""
        return self._utf8.decode("utf-8", "surrogatepass")

    def text_between(self, start: int, end: int) -> str:
        """The text added between two byte offsets, each where an L{append} began or ended."""
        return self._utf8[start:end].decode("utf-8", "surrogatepass")

    def copy_between(self, start: int, end: int) -> "TextBuffer":
        """A buffer of its own holding the text added between two such offsets."""
        copy = TextBuffer()
        copy._utf8 = self._utf8[start:end]
        return copy


class Transcript:
    """
    What the client has been sent of one streamed answer, across every
    attempt that made it: choice 0's text (kept only while the stream may
    be resumed: a resume is sent it), its size, whether it finished (and
    why each choice did), the first stream's chunk id (resumed chunks carry
    it too), and whether it could be continued (a kind of call a prefill
    continues, a target that resumes, no tool call so far).
    """

    def __init__(self, resumable: bool) -> None:
        #: The text, only where the stream may be resumed (most services do not resume: no buffer at all).
        self._text: TextBuffer | None = TextBuffer() if resumable else None
        self._bytes = 0
        #: The characters of the assistant text sent so far (the logs' C{text_chars}).
        self.text_chars = 0
        self.finished = False
        self.resumable = resumable
        self.chunk_id: str | None = None
        #: Chunks with content (text or a tool call) relayed, across every attempt.
        self.content_chunks = 0
        self.finish_reasons: tuple[str, ...] = ()
        #: The gateway cut the stream at its bound (a backend that went past the completion reserved).
        self.cut = False
        #: The piece of text kept last and where it began in the buffer: a L{MessageText}
        #: of the same events reads its text from here instead of keeping it again.
        self._last_text: str | None = None
        self._last_at = 0

    @property
    def text(self) -> str:
        """The assistant text sent so far, while the stream may be resumed (else C{""}: it is not kept)."""
        return "" if self._text is None else str(self._text)

    @property
    def text_bytes(self) -> int:
        """The UTF-8 bytes of the assistant text sent so far (a lone surrogate counts its three)."""
        return self._bytes

    def sent(self, facts: Any, first_stream: bool) -> None:
        """
        C{facts}' event reached the client (a chunk's facts: its C{text},
        C{tool_call}, C{finished}, C{finish_reasons}, C{message_id}, C{data}).
        """
        text = facts.text
        if text:
            if self.resumable:
                kept = self._text
                self._last_at = len(kept)
                self._bytes += kept.append(text)
                self._last_text = text
            else:
                self._bytes += len(TextBuffer.encoded(text))
            self.text_chars += len(text)
        if text or facts.tool_call:
            self.content_chunks += 1
        if facts.finished:
            self.finished = True
        if facts.finish_reasons:
            self.finish_reasons += facts.finish_reasons
        if facts.tool_call and self.resumable:
            self.resumable = False
            self._text = self._last_text = None  # nothing continues it now
        if first_stream and self.chunk_id is None and facts.data is not None:
            chunk_id = facts.message_id or facts.data.get("id")
            self.chunk_id = chunk_id if isinstance(chunk_id, str) else None


class MessageText:
    """
    The text of one message a stream translator writes (the Responses
    API's C{output_text.done} and the completed Response say it whole),
    kept once: a stretch of the L{Transcript}'s own buffer while every
    piece is the one the transcript kept last, right after the stretch
    (the relay tells the transcript of each event before its writer);
    else, from the first piece that is not, a buffer of its own (the
    stretch so far copied in).  The transcript keeps its text only while
    the stream may be resumed; without a transcript, always a buffer of its own.
    """

    __slots__ = ("_transcript", "_buffer", "_start", "_end")

    def __init__(self, transcript: Transcript | None) -> None:
        self._transcript = transcript
        self._buffer = TextBuffer() if transcript is None else None
        self._start = 0
        #: Where the stretch ends in the transcript's buffer (L{None}: no piece yet).
        self._end: int | None = None

    def append(self, text: str) -> None:
        """Add the next piece of the message's text."""
        transcript = self._transcript
        if transcript is not None:
            # Resumable, the transcript keeps one buffer, never another: its pieces are kept there in order.
            if transcript._last_text is text and transcript.resumable:
                kept = transcript._text
                if self._end is None:
                    self._buffer, self._start = kept, transcript._last_at
                    self._end = len(kept)
                    return
                if transcript._last_at == self._end:
                    self._end = len(kept)
                    return
            # The transcript kept another piece, or none: the message keeps its own from here.
            self._transcript = None
            self._buffer = TextBuffer() if self._end is None else self._buffer.copy_between(self._start, self._end)
        self._buffer.append(text)

    def __bool__(self) -> bool:
        return self._end is not None if self._transcript is not None else bool(self._buffer)

    def __str__(self) -> str:
        """The message's text, every piece in order."""
        if self._transcript is not None:
            return "" if self._end is None else self._buffer.text_between(self._start, self._end)
        return str(self._buffer)


class IModelCall(Interface):
    """A model request the gateway read from a client's body, in the client's API."""

    api = Attribute("The client's API by name (C{openai}, C{anthropic}): which speakers speak it.")
    model = Attribute("The model asked for (a string), or L{None}.")
    stream = Attribute("The client asked for a stream the gateway follows event by event.")
    max_tokens = Attribute("The most the client lets it complete, or L{None}.")
    generates = Attribute("The call generates text: its completion is reserved.")
    resumable_kind = Attribute("A broken stream of it can be asked for again with its text as a prefill.")
    client_wants_usage = Attribute("The client asked for its stream's usage event itself.")
    cacheable = Attribute("Its answer may be kept by the response cache (one with an id of its own may not).")
    unbounded = Attribute(
        "Why the gateway cannot bound what the call costs (work the target does past the answer, or on a"
        " conversation it holds and the gateway does not read), or L{None}: a governed key's such call is refused."
    )

    def operation(path: bytes) -> str:
        """The GenAI operation (C{chat}, C{text_completion}, C{embeddings}...) of the call to C{path}."""

    def answer_started() -> None:
        """
        The client's answer started: what only an attempt sent unchanged
        needed (the body's bytes as sent) may be let go.
        """

    def end_user() -> tuple:
        """Who the call is for, as its body says: (the end user, their session), each a string or L{None}."""

    def capped(tokens: int) -> "IModelCall":
        """
        The same call, let complete at most C{tokens} in all (its choices
        together): its API's maximum field set to that, the body made anew.
        """


#: The longest end user or session id kept (a longer one is cut): they go on every access line.
MOST_ID_CHARACTERS = 128


def bounded_id(value: Any) -> str | None:
    """An end user's or a session's id as the gateway keeps it: a non-empty string, cut to L{MOST_ID_CHARACTERS}."""
    return value[:MOST_ID_CHARACTERS] if isinstance(value, str) and value else None


@attrs.define(eq=False)
class AnswerReading:
    """
    What routing hands a speaker to read one attempt's answer with: the
    clock and idle timeout of its relay, the call's transcript, whether
    the attempt resumes a broken stream, the completion tokens reserved
    (past which a stream is cut; L{None}: unbounded), and where what the
    answer says of itself goes (C{on_usage}: a usage report of this
    answer; C{on_answer}: a JSON answer's facts).
    """

    clock: Any
    idle_timeout: float
    transcript: Transcript | None
    resumed: bool
    completion_reserved: int | None
    on_usage: Callable[[Any], None]
    on_answer: Callable[[Any], None]


class ISpeaker(Interface):
    """
    How one call in its client's API is spoken to targets of one API, and
    their answers read back in the client's API.  Made once per call and
    target API (a translated stream's writer serves every attempt that
    continues the answer).
    """

    client_api = Attribute("The client's API by name.")
    target_api = Attribute("The target's API by name.")
    translated = Attribute("The two differ: the call is translated.")
    answer_headers = Attribute("Headers the client's answer carries from the translation (what it left out), as pairs of bytes.")
    takes_prefill = Attribute(
        "A broken stream can go on from the text sent so far (C{body} with a prefill); L{False}: the target's API has no prefill."
    )

    def path(path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """
        The path (and query) sent to an endpoint whose URL's path is
        C{base_path}, for the client's C{path}; C{as_sent}: the client named
        the target's own path (C{/api/<service>/...}).
        """

    def body(config: Any, model: str | None, prefill: str | None) -> bytes:
        """
        The body sent to a target of C{config}'s service: the C{model} named (L{None}: as the client named
        it), with C{prefill} (the text sent so far) when resuming.

        @raise Untranslatable: the call has no equivalent in the target's API.
        """

    def headers(request: Any, config: Any, withheld: tuple[bytes, ...]) -> tuple[list, tuple[bytes, ...]]:
        """
        The target's credentials and API headers for C{config}'s service,
        given the client headers already C{withheld}: the headers added,
        and every header withheld.
        """

    def completion_floor(config: Any) -> int:
        """The completion tokens a target of C{config}'s service is sent when the client names none (0: none)."""

    def answer_relay(code: int, event_stream: bool, reading: AnswerReading) -> tuple[Any, str] | None:
        """
        The relay (an C{IAnswerRelay} of the data plane) that reads an
        answer of status C{code} up to its commit point, and what it waits for there (L{FIRST_TOKEN},
        L{WHOLE_ANSWER}, L{FIRST_BYTE}); L{None}: its bytes are relayed as
        they are.
        """

    def refusal_body_needed(code: int) -> bool:
        """Whether a refusal of status C{code} (a 4xx but 429) is read before L{refusal_moves_on}."""

    def refusal_moves_on(code: int, body: bytes | None) -> str | None:
        """Why a refusal sends the call to the next target (for the log), or L{None}: the client sees it."""

    def broken_event(kind: Any, message: str, request_id: str) -> bytes:
        """The one event that tells the client, in its API, that its stream broke (an C{ErrorKind})."""


class IApi(Interface):
    """
    One API as the gateway speaks it: which requests of it are model calls
    (read, governed), and how a target of it is given its credentials.
    """

    name = Attribute("The API's name (a model call's C{api}, a speaker's C{target_api}).")
    title = Attribute("How a refusal names it (C{OpenAI's API}).")
    service_api = Attribute("The C{api} of the services whose C{/api/} paths it reads (OpenAI's and its Responses API: C{openai}).")

    def read_call(rest: bytes, body: bytes, reading: Any) -> IModelCall | None:
        """
        The model call a C{POST} to C{rest} (under a service of this API)
        makes, read as C{reading} says; L{None}: C{rest} is no model call.

        @raise BadCall: the body is not one the gateway can read.
        """

    def model_call_path(rest: bytes) -> bool:
        """Whether a C{POST} to C{rest} is one of the model calls the gateway reads."""

    def credentials(request: Any, config: Any, key: bytes | None, translated: bool) -> tuple[list, tuple[bytes, ...]]:
        """
        The headers a target of this API is given (its C{key}, its API's
        version) and the client headers it must not get.
        """


@implementer(IApi)
class PlainHttp:
    """A service that speaks no model API (C{api = http}): bytes relayed, its key as a bearer token."""

    name = "http"
    title = "plain HTTP"
    service_api = "http"

    def read_call(self, rest: bytes, body: bytes, reading: Any) -> None:
        """No request of it is a model call."""
        return None

    def model_call_path(self, rest: bytes) -> bool:
        """No path of it is a model call."""
        return False

    def credentials(self, request: Any, config: Any, key: bytes | None, translated: bool) -> tuple[list, tuple[bytes, ...]]:
        """Its key, when it has one, as C{Authorization: Bearer}."""
        return ([(b"Authorization", b"Bearer " + key)] if key is not None else []), ()


#: Makes the speaker of one model call (its client's API) to one target API,
#: given the path the client called and the request's start (a translated
#: answer's C{created}).
SpeakerFactory = Callable[[Any, bytes, float], ISpeaker]


@attrs.frozen
class Speakers:
    """
    Every API the gateway speaks, by name, and a speaker for each pair of
    client and target API it can carry.  Routing holds this and nothing
    of any API's package.
    """

    apis: Mapping[str, IApi]
    pairs: Mapping[tuple[str, str], SpeakerFactory]

    def __attrs_post_init__(self) -> None:
        for api in self.apis.values():
            if not IApi.providedBy(api):
                raise TypeError(f"{api!r} does not provide IApi")

    def reader(self, service_api: str, rest: bytes) -> IApi | None:
        """
        The API that reads a C{POST} to C{rest} under a service of
        C{service_api} as its model call: the first of that service's whose
        model call C{rest} is; L{None}: none is (its bytes are relayed).
        """
        for api in self.apis.values():
            if api.service_api == service_api and api.model_call_path(rest):
                return api
        return None

    def api(self, name: str) -> IApi:
        """The API named C{name}; L{KeyError} when none is (a config names only known ones)."""
        return self.apis[name]

    def speaker(self, call: IModelCall, target_api: str, path: bytes, started_at: float) -> ISpeaker:
        """
        The speaker of C{call} to a target of C{target_api}.

        @raise Untranslatable: the gateway cannot carry the client's API to that one.
        """
        factory = self.pairs.get((call.api, target_api))
        if factory is None:
            raise Untranslatable(f"no translation from {self.apis[call.api].title} to {self.apis[target_api].title}")
        return factory(call, path, started_at)
