"""
L{Conversations}: the Responses the gateway holds for its callers.  A
call with C{previous_response_id} is sent on with the whole conversation
as its input (every earlier turn's input and output, oldest first), so it
goes to any target, whichever answered before; a Response answered with
C{store} (the API's default) is kept, its owner the caller's key; and
C{GET}/C{DELETE /v1/responses/{id}} and C{GET .../input_items} are
answered from what is kept.

The pure parts (the conversation's items, a Response read back from the
answer's bytes, a page of input items) are functions here; the store is
an L{IResponseStore}, the clock injected.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txgateway import errors
from txgateway.anthropic.wire import event_json
from txgateway.dataplane.server import AnswerRecorder
from txgateway.errors import GatewayError
from txgateway.openai.wire import EventSplitter, decode_json, split_events
from txgateway.responses.store import IResponseStore, StoredResponse, StoreFailed

__all__ = [
    "Conversations", "StreamEndRecorder", "answered_response", "conversation_items", "input_item_page", "listed_items", "turn_input",
]

#: The most turns a conversation is followed back (each is one look in the store).
MAX_TURNS = 1000


def turn_input(body: dict) -> list:
    """A request's own C{input} as items (a string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def conversation_items(chain: list[StoredResponse]) -> list:
    """The items of the turns in C{chain} (oldest first): each turn's input, then its output."""
    items: list = []
    for record in chain:
        items.extend(record.input)
        output = record.response.get("output")
        items.extend(output if isinstance(output, list) else ())
    return items


#: The types of the events a stream's Response is read from, and the same as bytes (searched for in an event).
_END_TYPES = ("response.completed", "response.incomplete")
_COMPLETED, _INCOMPLETE = (kind.encode("ascii") for kind in _END_TYPES)


def answered_response(body: bytes, stream: bool) -> dict | None:
    """
    The Response an answer's bytes carry: the JSON Response itself, or the
    one C{response.completed} (or C{response.incomplete}) ends a stream
    with; L{None} for anything else (an error, a broken stream).
    """
    if not stream:
        try:
            response = decode_json(body)
        except (ValueError, UnicodeDecodeError):
            return None
        return response if type(response) is dict and response.get("object") == "response" else None
    # The end event is the last: read the stream from its end (a last event may lack its blank line).
    splitter = EventSplitter()
    events = splitter.feed(body)
    events.append(splitter.rest())
    for event in reversed(events):
        data = event_json(event)
        if type(data) is not dict:
            continue
        if data.get("type") in _END_TYPES:
            response = data.get("response")
            return response if type(response) is dict else None
        return None  # the last event is no end: a broken stream
    return None


class StreamEndRecorder(AnswerRecorder):
    """
    The recorder of a stream whose Response is to be kept.  That Response
    is read from the stream's last event that carries JSON
    (L{answered_response}), so this holds no more than what decides it:
    the last whole event that ended the Response (until a later JSON
    event says the stream went on), and the event not ended yet.  An
    event is read as JSON only when its bytes name an end type, or when
    it follows one that did; the deltas before are let go as they pass,
    unread.  Every byte written still counts against its limit.
    """

    __slots__ = ("_end", "_tail")

    def __init__(self, limit: int) -> None:
        self._end: bytes | None = None
        #: What came after the last whole event (L{split_events}): no splitter of its own, a stream holds this.
        self._tail = b""
        super().__init__(limit)

    @property  # type: ignore[override]
    def parts(self) -> list[bytes]:
        """What is held, in the order it was written: the end event (if any), then what has not ended."""
        held = [self._tail] if self._tail else []
        return held if self._end is None else [self._end, *held]

    @parts.setter
    def parts(self, parts: list[bytes]) -> None:
        self._end = None
        self._tail = b""
        self._take(b"".join(parts))

    def started(self, code: int, reason: bytes | None, headers: list) -> None:
        """The answer's status line was decided (its headers are not held: a kept Response is read from its body)."""
        AnswerRecorder.started(self, code, reason, ())

    def wrote(self, data: bytes) -> None:
        """Body bytes were written."""
        if self.counted(data):
            self._take(data)

    def _take(self, data: bytes) -> None:
        # Whole events as they end (at a blank line, LF or CRLF, whose bytes may come in two writes).
        events, self._tail = split_events(self._tail, data)
        for event in events:
            self._ended(event)

    def _ended(self, event: bytes) -> None:
        """One whole event was written (with its blank line)."""
        if self._end is None and _COMPLETED not in event and _INCOMPLETE not in event:
            return  # no end yet: a delta decides nothing
        data = event_json(event)
        if type(data) is dict:
            self._end = event if data.get("type") in _END_TYPES else None


_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def listed_items(response_id: str, items: list) -> list:
    """
    C{items} as C{input_items} lists them: each with an id (its own, or
    one made from the response's id and its place, the same on every
    listing), and a message's text as its parts.
    """
    listed = []
    for place, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        item = {**item, "type": kind}
        if not isinstance(item.get("id"), str):
            digest = hashlib.sha256(f"{response_id}:{place}".encode()).hexdigest()[:40]
            item["id"] = f"{_PREFIXES.get(kind, 'item')}_{digest}"
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        listed.append(item)
    return listed


def input_item_page(items: list, query: dict[str, str]) -> dict:
    """
    One page of C{input_items}, as the API pages them: C{order} (C{desc},
    the default, or C{asc}), C{limit} (1 to 100, 20 by default), C{after}
    (an item's id: the page starts past it).

    @raise GatewayError: 400 for a parameter out of its range.
    """
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(errors.BAD_REQUEST, f"order must be asc or desc, not {order[:20]!r}")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise GatewayError(errors.BAD_REQUEST, "limit must be a whole number from 1 to 100") from None
    if not 1 <= limit <= 100:
        raise GatewayError(errors.BAD_REQUEST, "limit must be a whole number from 1 to 100")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        places = [n for n, item in enumerate(ordered) if item.get("id") == after]
        if not places:
            raise GatewayError(errors.BAD_REQUEST, f"after: no input item is named {after[:80]!r}")
        ordered = ordered[places[0] + 1:]
    page = ordered[:limit]
    return {
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit,
    }


class Conversations:
    """
    The conversations the gateway holds, in C{store}: each kept Response
    lives C{ttl} seconds (a conversation going on keeps its earlier turns
    as long as its newest), and one of more than C{max_bytes} (its own
    input and the Response) is not kept (logged C{response_not_stored}).
    A caller sees only its own: another caller's id is as unknown as one
    never made.
    """

    def __init__(self, store: IResponseStore, clock: IReactorTime, ttl: float, max_bytes: int, log: Any) -> None:
        if not IResponseStore.providedBy(store):
            raise TypeError(f"a response store is an IResponseStore, not {store!r}")
        self.store = store
        self._clock = clock
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._log = log
        #: The puts of this process not yet done: a next turn waits for its previous one.
        self._pending: dict[str, Deferred] = {}

    async def _look(self, response_id: str, owner: str) -> StoredResponse | None:
        """The record of C{response_id} if C{owner} may see it (L{StoreFailed} when the store fails)."""
        pending = self._pending.get(response_id)
        if pending is not None:
            # Its turn is still being kept (by this process): wait for it, whatever the put's outcome.
            waiting: Deferred = Deferred()

            def kept(result: Any) -> Any:
                waiting.callback(None)
                return result

            pending.addBoth(kept)
            await waiting
        record = await self.store.get(response_id)
        return record if record is not None and record.owner == owner else None

    async def _found(self, response_id: str, owner: str) -> StoredResponse:
        """L{_look}, or the error a client gets: 404 when it is not (its own), 503 when the store failed."""
        try:
            record = await self._look(response_id, owner)
        except StoreFailed as error:
            raise GatewayError(errors.RESPONSES_UNAVAILABLE, str(error)) from None
        if record is None:
            raise GatewayError(errors.NOT_FOUND, f"no response is named {response_id[:100]!r}")
        return record

    async def chain(self, response_id: str, owner: str) -> list[StoredResponse]:
        """
        The conversation up to C{response_id}, oldest turn first.

        @raise GatewayError: 404 C{previous_response_not_found} when a turn
            of it is unknown, expired, deleted or another caller's; 503
            when the store fails; 400 past L{MAX_TURNS}.
        """
        chain: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None:
            if len(chain) >= MAX_TURNS:
                raise GatewayError(errors.BAD_REQUEST, f"the conversation is over {MAX_TURNS} turns long: begin another")
            try:
                record = await self._look(next_id, owner)
            except StoreFailed as error:
                raise GatewayError(errors.RESPONSES_UNAVAILABLE, str(error)) from None
            if record is None:
                said = "" if next_id == response_id else f" (an earlier turn of {response_id[:100]!r})"
                raise GatewayError(errors.PREVIOUS_RESPONSE_NOT_FOUND, f"no response is named {next_id[:100]!r}{said}")
            chain.append(record)
            next_id = record.previous_id
        chain.reverse()
        return chain

    async def continued(self, body: dict, owner: str) -> tuple[dict, list[StoredResponse]]:
        """
        C{body} with its conversation: C{previous_response_id} replaced by
        the earlier turns' items before its own input (as L{chain} raises).
        """
        previous = body.get("previous_response_id")
        if previous is None:
            return body, []
        if not isinstance(previous, str) or not previous:
            raise GatewayError(errors.BAD_REQUEST, "previous_response_id is not a response's id")
        chain = await self.chain(previous, owner)
        expanded = {key: value for key, value in body.items() if key != "previous_response_id"}
        expanded["input"] = conversation_items(chain) + turn_input(body)
        return expanded, chain

    def recorder(self, stream: bool = False) -> AnswerRecorder:
        """What copies an answer to keep (no more than a record may hold): of a C{stream}, only its end."""
        return StreamEndRecorder(self._max_bytes) if stream else AnswerRecorder(self._max_bytes)

    def keep(self, body: dict, owner: str, chain: Sequence[StoredResponse], recorder: AnswerRecorder, stream: bool) -> Deferred[None] | None:
        """
        Keep the Response C{recorder} saw (C{body} its request as the
        client sent it, C{chain} the turns it went on from), when it is
        one: an error, a broken stream or one too large is not kept.  A
        failure of the store is logged, never raised: the answer is out.
        """
        if recorder.code != 200:
            return None
        if recorder.overflowed:
            self._log.warning("response_not_stored", reason=f"over [responses] max_response_bytes ({self._max_bytes})")
            return None
        response = answered_response(b"".join(recorder.parts), stream)
        if response is None or not isinstance(response.get("id"), str):
            return None
        now = self._clock.seconds()
        previous = body.get("previous_response_id")
        record = StoredResponse(
            response["id"], owner, previous if isinstance(previous, str) else None, turn_input(body), response, now, now + self._ttl,
        )
        encoded = record.encode()
        if len(encoded) > self._max_bytes:
            self._log.warning("response_not_stored", response_id=record.id, reason=f"over [responses] max_response_bytes ({self._max_bytes})")
            return None
        putting = self._kept(record, encoded, [turn.id for turn in chain])
        self._pending[record.id] = putting

        def kept(result: Any) -> Any:
            if self._pending.get(record.id) is putting:
                del self._pending[record.id]
            return result

        return putting.addBoth(kept)

    def _kept(self, record: StoredResponse, encoded: bytes, earlier: list[str]) -> Deferred[None]:
        async def put() -> None:
            try:
                kept = await self.store.put(record, encoded)
                if earlier:
                    await self.store.extend(earlier, record.expires_at)
            except StoreFailed as error:
                self._log.error("response_not_stored", response_id=record.id, reason=str(error))
                return
            if not kept:
                self._log.error("response_not_stored", response_id=record.id, reason="another caller's response has this id")

        return Deferred.fromCoroutine(put())

    async def retrieve(self, response_id: str, owner: str) -> dict:
        """The Response C{response_id} (L{GatewayError} 404 or 503 as L{_found})."""
        return (await self._found(response_id, owner)).response

    async def delete(self, response_id: str, owner: str) -> dict:
        """Forget C{response_id}: the API's deletion object (L{GatewayError} 404 or 503 as L{_found})."""
        await self._found(response_id, owner)
        try:
            await self.store.delete(response_id)
        except StoreFailed as error:
            raise GatewayError(errors.RESPONSES_UNAVAILABLE, str(error)) from None
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, response_id: str, owner: str, query: dict[str, str]) -> dict:
        """
        A page of the input C{response_id} was made from: the earlier
        turns' items and its own input (L{input_item_page}).
        """
        record = await self._found(response_id, owner)
        chain = await self.chain(record.previous_id, owner) if record.previous_id is not None else []
        items = listed_items(response_id, conversation_items(chain) + record.input)
        return input_item_page(items, query)

