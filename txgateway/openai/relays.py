"""
The relays of OpenAI answers: a completion stream followed event by event
(its commit point at the first token, the text sent so far kept for a
resume, the usage counted, the chunks a client did not ask for left out),
and a JSON answer whose usage is read as it passes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from txgateway.dataplane.client import StreamEnded
from txgateway.dataplane.relay import BodyRelay, StreamBroken
from txgateway.dataplane.server import IncomingRequest
from txgateway.openai.wire import AnswerFacts, ChunkFacts, EventSplitter, Usage, chunk_event, read_answer, read_chunk
from txgateway.speaking import Transcript

__all__ = ["CUT_SLACK", "EventStreamRelay", "JsonAnswerRelay", "TranslatedAnswerRelay", "Transcript"]

#: Content events a governed stream may relay past the completion tokens it
#: reserved before it is cut: an event carries at least one token, but a few
#: carry none (a tool use's or a thinking block's start, a signature).
CUT_SLACK = 8
#: The most of a JSON answer kept to read its usage (larger ones are relayed unread).
JSON_USAGE_LIMIT = 1024 * 1024


class EventStreamRelay(BodyRelay):
    """
    A L{BodyRelay} for a chat or text completion stream, relayed whole
    event by whole event.  It is resumable: when it breaks, the text sent
    so far can be continued by another attempt.

    Before the commit it holds events until one carries a token (content,
    a finish reason or usage): role-only chunks and comments do not
    commit.  A chunk that is not JSON ends the attempt like a broken
    connection.  After the end of the answer (a finish reason or
    C{[DONE]}) a broken connection is no failure.  A resumed stream
    (C{resumed}) has its role-only chunks dropped and its chunks renamed
    with the first stream's id.

    @param on_usage: called with each usage the stream reports, committed
        or not (what the backend bills).
    @param forward_usage: the client asked for the usage chunk; else it is
        not relayed.
    @param read: what one event carries (L{read_chunk} for OpenAI's
        stream; a Messages stream has its own reader).
    @param write: the event as the client gets it, for a stream translated
        to the client's API (L{None}: the event as it came); its C{finish()}
        ends an answer whose stream ended whole without its last event.
    """

    __slots__ = (
        "_read", "_write", "_cut", "_splitter", "_transcript", "_on_usage", "_forward_usage", "_resumed", "_held_facts",
        "malformed", "_after_done", "_backend_ended", "_drain_call",
    )

    resumable = True

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        transcript: Transcript,
        on_usage: Callable[[Usage], None],
        forward_usage: bool,
        resumed: bool = False,
        read: Callable[[bytes], ChunkFacts] = read_chunk,
        write: Any = None,
        reserved: int | None = None,
        closing: Callable[[dict | None, int], list[bytes]] | None = None,
    ) -> None:
        super().__init__(None, clock, idle_timeout)
        self._read = read
        self._write = write
        #: A governed stream's bound (L{None}: none): one attribute for its four values.
        self._cut = _CutBound(reserved, closing) if reserved is not None else None
        self._splitter = EventSplitter()
        self._transcript = transcript
        self._on_usage = on_usage
        self._forward_usage = forward_usage
        self._resumed = resumed
        self._held_facts: list[ChunkFacts] | tuple[()] = []
        self.malformed: str | None = None
        self._after_done = False  # the client's answer ended at [DONE]
        self._backend_ended = False
        self._drain_call = None

    def body_received(self, data: bytes) -> None:
        if self._after_done:
            return
        # What one read completes goes out in one write (small writes, one
        # an event, would each be a packet).
        ready: list[tuple[bytes, ChunkFacts]] = []
        read = self._read
        for event in self._splitter.feed(data):
            kept = self._kept(event, read(event))
            if kept is None:
                if self.malformed is not None:
                    break
                continue
            if self._request is None:
                # The first token's event may commit at once (the broker
                # resumes inside _hold): the events after it are relayed.
                self._held_facts.append(kept[1])
                self._hold(kept[0], first=kept[1].token)
                continue
            ready.append(kept)
        self._relay_events(ready)

    def _relay_events(self, ready: list[tuple[bytes, ChunkFacts]]) -> bool:
        """
        Relay these events in one write, up to C{[DONE]}, which ends the
        client's answer; returns whether it did.
        """
        if self._cut is not None:
            return self._relay_bounded(ready)
        return self._relay_plain(ready)

    def _relay_plain(self, ready: list[tuple[bytes, ChunkFacts]]) -> bool:
        """Relay these events in one write, up to C{[DONE]}; returns whether the answer ended."""
        out: list[bytes] = []
        ended = False
        write = self._write
        for event, facts in ready:
            self._transcript.sent(facts, not self._resumed)
            out.append(event if write is None else write(event, facts))
            if facts.done:
                ended = True
                break
        if out:
            self._pass(b"".join(out))
        if ended:
            self._answer_done()
        return ended

    def _relay_bounded(self, ready: list[tuple[bytes, ChunkFacts]]) -> bool:
        """
        L{_relay_events} for a governed stream: the events up to its bound
        of content events are relayed as any are; at the first past it,
        the stream is ended as its backend's API ends one at its limit, and
        the backend is no longer read.
        """
        cut = self._cut
        room = cut.bound - self._transcript.content_chunks - cut.other_choices
        others = 0
        for position, (_, facts) in enumerate(ready):
            pieces = _other_choices_content(facts.data)
            if facts.text or facts.tool_call:
                pieces += 1
            if pieces:
                if room < pieces:
                    break
                room -= pieces
                others += pieces - (1 if facts.text or facts.tool_call else 0)
        else:
            cut.other_choices += others
            return self._relay_plain(ready)
        cut.other_choices += others
        if self._relay_plain(ready[:position]):
            return True  # it ended whole before the bound
        self._pass(b"".join(self._closed(self._write, facts.data)))
        self._answer_done()
        if self._control is not None:
            self._control.stopProducing()
        return True

    def _closed(self, write: Any, last: dict | None) -> list[bytes]:
        """
        The end of a stream cut at its bound: the backend API's own closing
        events (a finish for C{length}, C{max_tokens}), read and written to
        the client like the backend's.  C{last}: the data of the event the
        cut fell on (its id and model name the closing chunk's).
        """
        transcript = self._transcript
        transcript.cut = True
        out = []
        cut = self._cut
        for event in cut.closing(last, cut.reserved):
            kept = self._kept(event, self._read(event))
            if kept is not None:
                transcript.sent(kept[1], not self._resumed)
                out.append(kept[0] if write is None else write(*kept))
        return out

    def _kept(self, event: bytes, facts: ChunkFacts) -> tuple[bytes, ChunkFacts] | None:
        """
        One event (and C{facts}, what it carries) as the client gets it; L{None} for
        one left out (a usage chunk not asked for, a resumed stream's role
        chunk) or malformed (the attempt is then stopped).
        """
        if facts.malformed is not None:
            self.malformed = facts.malformed
            if self._control is not None:
                self._control.stopProducing()
            return None
        if facts.usage is not None:
            self._on_usage(facts.usage)
            if facts.usage_only and not self._forward_usage:
                return None
        if facts.rewritten is not None:
            event = facts.rewritten
        if self._resumed and facts.data is not None:
            if not facts.token:
                return None  # the resumed stream's role chunk (or message start): the client has had one
            if self._write is None:
                event = self._renamed(facts.data, event)
        return event, facts

    def _answer_done(self) -> None:
        """
        The answer is whole at C{[DONE]}: the client's answer ends now (a
        client may hang up as soon as it reads it), and the rest of the
        backend's body, if any, is read and dropped, for at most the idle
        timeout, so that its connection may serve again.
        """
        self._after_done = True
        self._disarm_idle_timer()
        if self._watching:
            self._watching = False
            self._request.unregister_producer()
        if not self.done.called:
            self.complete = True
            self.done.callback(None)
        if self._held_end is None and self._control is not None and not self._backend_ended:
            self._drain_call = self._clock.callLater(self._idle_timeout, self._control.stopProducing)

    def _renamed(self, data: dict, event: bytes) -> bytes:
        chunk_id = self._transcript.chunk_id
        if chunk_id is None or data.get("id") in (None, chunk_id):
            return event
        return chunk_event({**data, "id": chunk_id})

    def commit(self, request: IncomingRequest) -> None:
        held, self._held = self._held, ()  # nothing is held after the commit
        held_facts, self._held_facts = self._held_facts, ()
        self._request = request
        ended = self._relay_events(list(zip(held, held_facts)))
        if not ended and self._held_end is not None:
            (error,) = self._held_end
            self._held_end = None
            self.body_ended(error)

    def body_ended(self, error: Exception | None) -> None:
        self._backend_ended = True
        if self._after_done:
            if self._drain_call is not None and self._drain_call.active():
                self._drain_call.cancel()
            return
        if error is None and self.malformed is None:
            rest = self._splitter.rest()
            if rest.strip():
                self.body_received(rest + b"\n\n")  # a last event without its blank line
                if self._after_done:
                    return
        if self.malformed is not None:
            error = StreamEnded(self.malformed)
        elif error is None and getattr(self._read, "needs_end", False) and not self._transcript.finished:
            # A stream whole only with its end event (the Responses API's response.completed)
            # that ended without it is broken, never a truncated success.
            error = StreamEnded("the stream ended before its end event")
        elif error is not None and self._request is not None and self._transcript.finished:
            error = None  # the answer was whole; only the connection's end was lost
        if error is None and self._request is not None and self._write is not None:
            tail = self._write.finish()
            if tail:
                self._pass(tail)
        super().body_ended(error)


class _CutBound:
    """
    Where a governed stream is cut: the completion tokens reserved, the most
    content events relayed (the reserve and L{CUT_SLACK}), how the backend's
    API ends a stream at its limit, and the content events of choices other
    than the first (C{n} above 1), which the transcript does not count.
    """

    __slots__ = ("reserved", "bound", "closing", "other_choices")

    def __init__(self, reserved: int, closing: Any) -> None:
        self.reserved = reserved
        self.bound = reserved + CUT_SLACK
        self.closing = closing
        self.other_choices = 0


def _other_choices_content(data: dict | None) -> int:
    """How many choices but the first carry content in one chunk's C{data} (a stream of C{n} above 1)."""
    choices = data.get("choices") if data is not None else None
    if type(choices) is not list:
        return 0
    if len(choices) == 1 and type(choices[0]) is dict and choices[0].get("index", 0) == 0:
        return 0  # most chunks: the first choice alone
    return sum(
        1 for choice in choices
        if type(choice) is dict and choice.get("index", 0) != 0 and type(choice.get("delta")) is dict
        and any(value for key, value in choice["delta"].items() if key != "role")
    )


class JsonAnswerRelay(BodyRelay):
    """
    A L{BodyRelay} that also reads the JSON answer it relays (up to
    L{JSON_USAGE_LIMIT}): C{on_answer} gets its usage, id and finish reasons
    (C{read}: how, for the API the backend speaks).
    """

    __slots__ = ("_on_answer", "_read", "_copy", "_copied")

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        on_answer: Callable[[AnswerFacts], None],
        read: Callable[[bytes], AnswerFacts] = read_answer,
    ) -> None:
        super().__init__(None, clock, idle_timeout)
        self._on_answer = on_answer
        self._read = read
        self._copy: list[bytes] | None = []
        self._copied = 0

    def body_received(self, data: bytes) -> None:
        if self._copy is not None:
            self._copied += len(data)
            if self._copied > JSON_USAGE_LIMIT:
                self._copy = None
            else:
                self._copy.append(data)
        super().body_received(data)

    def body_ended(self, error: Exception | None) -> None:
        if error is None and self._copy:
            facts = self._read(b"".join(self._copy))
            self._copy = None
            self._on_answer(facts)
        super().body_ended(error)


class TranslatedAnswerRelay(BodyRelay):
    """
    A L{BodyRelay} for a JSON answer translated to the client's API: it
    holds the whole body (up to C{limit} bytes) and passes its commit point
    only at the body's end, with the translation held in its place (its
    length is the client's C{Content-Length}).  C{on_answer} reads the
    backend's own body first (its usage, id and stop reason).
    """

    __slots__ = ("_translate", "_on_answer", "_limit", "_parts", "_size", "_original", "_translation")

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        translate: Callable[[bytes], bytes],
        on_answer: Callable[[bytes], None] | None = None,
        limit: int = 16 * JSON_USAGE_LIMIT,
    ) -> None:
        super().__init__(None, clock, idle_timeout)
        self._translate = translate
        self._on_answer = on_answer
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._original: bytes | None = None
        self._translation = b""

    #: What the translation is, whatever the backend's body was.
    content_type = b"application/json"

    def client_length(self, backend_length: int | None) -> int | None:
        """The translated body's length."""
        return len(self._translation)

    def body_received(self, data: bytes) -> None:
        # Only ever before the commit: the commit point is the body's end.
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)

    def body_ended(self, error: Exception | None) -> None:
        if self._request is not None or self._held_end is not None:
            super().body_ended(error)
            return
        if error is None and self._size > self._limit:
            error = StreamBroken(f"an answer of more than {self._limit} bytes cannot be translated")
        if error is None:
            self._original = b"".join(self._parts)
            self._parts = []
            if self._on_answer is not None:
                self._on_answer(self._original)
            self._translation = self._translate(self._original)
            self._held = [self._translation]
        super().body_ended(error)

    def held_body(self, limit: int) -> Deferred[bytes | None]:
        """The backend's own body (untranslated), once whole."""
        if self._held_end is not None:
            return succeed(self._original)
        return super().held_body(limit)
