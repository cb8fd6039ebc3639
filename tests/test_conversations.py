"""
The Responses the gateway holds: the stores (memory, a SQLite file) and
L{Conversations} (a conversation followed back, a Response kept from its
answer's bytes, the owner's check, retention, the input items' pages),
on a fake clock.
"""

from __future__ import annotations

import ctypes
import json
import sqlite3
from contextlib import closing

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred
from twisted.internet.task import Clock

from tests.fakes import result_of
from txgateway import errors
from txgateway.errors import GatewayError
from txgateway.dataplane.server import AnswerRecorder
from txgateway.responses.conversations import (
    Conversations, StreamEndRecorder, answered_response, conversation_items, input_item_page, listed_items, turn_input,
)
from txgateway.responses.store import MemoryResponseStore, SqliteResponseStore, StoredResponse, StoreFailed

DAY = 24 * 3600.0


def done(coroutine):
    """The result of a coroutine that finishes at once (unit tests never wait)."""
    return result_of(ensureDeferred(coroutine))


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.lines.append((level, event, fields))


def kept(*args, **kwargs) -> tuple:
    """A record and its encoding, as a store is given them."""
    made = record(*args, **kwargs)
    return made, made.encode()


def record(response_id: str, owner: str = "alice", previous: str | None = None, text: str = "hi", at: float = 0.0) -> StoredResponse:
    response = {"id": response_id, "object": "response", "status": "completed",
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text.upper()}]}]}
    return StoredResponse(response_id, owner, previous, [{"type": "message", "role": "user", "content": text}], response, at, at + DAY)


def put_now(store, clock: Clock, made: StoredResponse, encoded: bytes) -> bool:
    """Put a record and let the turn end (the SQLite store commits a turn's puts together at its end): whether it was kept."""
    putting = store.put(made, encoded)
    clock.advance(0)
    return result_of(putting)


@pytest.fixture(params=["memory", "sqlite"])
def store_and_clock(request, tmp_path):
    clock = Clock()
    if request.param == "memory":
        return MemoryResponseStore(clock, 3), clock
    return SqliteResponseStore(str(tmp_path / "state" / "responses.db"), clock, maybeDeferred, 3), clock


def test_a_kept_response_comes_back_whole_until_it_expires(store_and_clock):
    store, clock = store_and_clock
    assert put_now(store, clock, *kept("resp_1")) is True
    assert result_of(store.get("resp_1")) == record("resp_1")
    assert result_of(store.get("resp_other")) is None
    clock.advance(DAY)
    assert result_of(store.get("resp_1")) is None


def test_another_owner_never_replaces_a_kept_response(store_and_clock):
    store, clock = store_and_clock
    put_now(store, clock, *kept("resp_1", text="mine"))
    assert put_now(store, clock, *kept("resp_1", owner="mallory", text="theirs")) is False
    assert result_of(store.get("resp_1")).input[0]["content"] == "mine"
    assert put_now(store, clock, *kept("resp_1", text="again")) is True


def test_a_deleted_response_is_gone_and_deleting_it_again_says_so(store_and_clock):
    store, clock = store_and_clock
    put_now(store, clock, *kept("resp_1"))
    assert result_of(store.delete("resp_1")) is True
    assert result_of(store.get("resp_1")) is None
    assert result_of(store.delete("resp_1")) is False


def test_extending_keeps_earlier_turns_as_long_as_the_newest(store_and_clock):
    store, clock = store_and_clock
    put_now(store, clock, *kept("resp_1"))
    result_of(store.extend(["resp_1"], 2 * DAY))
    clock.advance(1.5 * DAY)
    assert result_of(store.get("resp_1")) is not None
    result_of(store.extend(["resp_1"], DAY))  # never shortened
    assert result_of(store.get("resp_1")) is not None


def test_the_memory_store_keeps_max_entries_the_oldest_going_first():
    store = MemoryResponseStore(Clock(), 3)
    for n in range(5):
        result_of(store.put(*kept(f"resp_{n}")))
    assert len(store) == 3
    assert result_of(store.get("resp_1")) is None and result_of(store.get("resp_4")) is not None


def test_the_sqlite_file_survives_a_restart_and_sweeps_past_max_entries(tmp_path):
    path = str(tmp_path / "responses.db")
    clock = Clock()
    first = SqliteResponseStore(path, clock, maybeDeferred, 3)
    for n in range(500):
        clock.advance(1)
        put_now(first, clock, *kept(f"resp_{n}", at=clock.seconds()))
    first.close()
    again = SqliteResponseStore(path, clock, maybeDeferred, 3)
    assert result_of(again.get("resp_498")) is not None  # a restart keeps them
    assert result_of(again.get("resp_0")) is None  # the upkeep at the 500th put kept the 3 newest
    again.close()


def _sqlite_memory_used() -> int:
    """The bytes SQLite's library holds in this process (its own count, which the sqlite3 module does not expose)."""
    import _sqlite3

    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return used()


def test_the_sqlite_files_page_caches_stay_small_however_many_responses_are_kept(tmp_path):
    # SQLite's default is a 2 MiB cache a connection, filled by puts of records seldom read again and by the
    # upkeep's sweeps: memory that looked like each open stream's.  The put connection keeps 512 KiB, the upkeep 64.
    clock = Clock()
    before = _sqlite_memory_used()
    store = SqliteResponseStore(str(tmp_path / "responses.db"), clock, maybeDeferred, 10_000)
    for n in range(1200):  # two rounds of upkeep, each sweeping every record
        clock.advance(1)
        made = record(f"resp_{n}", text="word " * 800, at=clock.seconds())
        put_now(store, clock, made, made.encode())
    assert result_of(store.get("resp_3")) is not None
    held = _sqlite_memory_used() - before
    store.close()
    assert held < 1_000_000, f"SQLite holds {held} bytes for the response file"


def _ids_in_the_file(path: str) -> set[str]:
    """The ids another connection (another worker) finds in the response file."""
    with closing(sqlite3.connect(path)) as other:
        return {row[0] for row in other.execute("SELECT id FROM responses")}


def test_the_puts_of_one_turn_are_committed_together_when_the_turn_ends(tmp_path):
    path = str(tmp_path / "responses.db")
    clock = Clock()
    store = SqliteResponseStore(path, clock, maybeDeferred, 100)
    told = []
    for n in range(3):
        store.put(*kept(f"resp_{n}")).addCallback(told.append)
    assert told == [] and _ids_in_the_file(path) == set()  # nothing is said kept before it is
    clock.advance(0)
    assert told == [True, True, True]
    assert _ids_in_the_file(path) == {"resp_0", "resp_1", "resp_2"}
    store.close()


def test_a_get_in_the_same_turn_as_a_put_commits_it_first(tmp_path):
    clock = Clock()
    store = SqliteResponseStore(str(tmp_path / "responses.db"), clock, maybeDeferred, 100)
    putting = store.put(*kept("resp_1"))
    assert result_of(store.get("resp_1")) == record("resp_1")
    assert result_of(putting) is True  # told at the get, not at the turn's end
    clock.advance(0)
    store.close()


def test_a_turn_whose_commit_fails_keeps_none_of_its_puts_and_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "responses.db")
    clock = Clock()
    store = SqliteResponseStore(path, clock, maybeDeferred, 100)
    put_now(store, clock, *kept("resp_0"))
    first, second = store.put(*kept("resp_1")), store.put(*kept("resp_2"))

    def full(self):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(type(store._file), "commit", full)
    clock.advance(0)
    for putting in (first, second):
        failure = []
        putting.addErrback(failure.append)
        assert failure and failure[0].check(StoreFailed) and "disk is full" in str(failure[0].value)
    monkeypatch.undo()
    assert _ids_in_the_file(path) == {"resp_0"}
    assert result_of(store.get("resp_1")) is None
    assert put_now(store, clock, *kept("resp_3")) is True  # the next turn writes again
    store.close()


def test_a_put_that_fails_fails_every_put_of_its_turn(tmp_path, monkeypatch):
    path = str(tmp_path / "responses.db")
    clock = Clock()
    store = SqliteResponseStore(path, clock, maybeDeferred, 100)
    first, second = store.put(*kept("resp_1")), store.put(*kept("resp_2"))
    written = type(store._file).put

    def broken(self, made, encoded):
        if made.id == "resp_2":
            raise sqlite3.OperationalError("disk I/O error")
        return written(self, made, encoded)

    monkeypatch.setattr(type(store._file), "put", broken)
    clock.advance(0)
    monkeypatch.undo()
    for putting in (first, second):
        failure = []
        putting.addErrback(failure.append)
        assert failure and failure[0].check(StoreFailed)
    assert _ids_in_the_file(path) == set()
    assert put_now(store, clock, *kept("resp_1")) is True
    store.close()


def test_the_file_is_not_locked_while_a_turn_runs(tmp_path):
    # A turn's puts are written at its end: until then another worker (another connection) may write.
    path = str(tmp_path / "responses.db")
    clock = Clock()
    store = SqliteResponseStore(path, clock, maybeDeferred, 100)
    putting = store.put(*kept("resp_1"))
    with closing(sqlite3.connect(path, timeout=0)) as other:
        other.execute("INSERT INTO responses (id, owner, stored_at, expires_at, record) VALUES ('resp_w', 'w', 0, 1, x'00')")
        other.commit()
    clock.advance(0)
    assert result_of(putting) is True and _ids_in_the_file(path) == {"resp_1", "resp_w"}
    store.close()


def test_closing_commits_the_turns_puts(tmp_path):
    path = str(tmp_path / "responses.db")
    store = SqliteResponseStore(path, Clock(), maybeDeferred, 100)
    putting = store.put(*kept("resp_1"))
    store.close()
    assert result_of(putting) is True and _ids_in_the_file(path) == {"resp_1"}


def test_a_sqlite_file_that_fails_is_a_store_failure(tmp_path):
    store = SqliteResponseStore(str(tmp_path / "responses.db"), Clock(), maybeDeferred, 3)
    store.close()
    failure = []
    store.get("resp_1").addErrback(failure.append)
    assert failure and failure[0].check(StoreFailed)


def test_a_record_of_another_version_reads_as_none():
    with pytest.raises(ValueError):
        StoredResponse.decode(b'{"id": "x"}')
    assert StoredResponse.decode(record("resp_1").encode()) == record("resp_1")


# -- the pure parts


def test_a_turns_input_is_items_and_a_conversation_is_each_turns_input_then_output():
    assert turn_input({"input": "hello"}) == [{"type": "message", "role": "user", "content": "hello"}]
    assert turn_input({}) == []
    items = conversation_items([record("resp_1", text="one"), record("resp_2", text="two")])
    assert [item.get("content") for item in items] == [
        "one", [{"type": "output_text", "text": "ONE"}], "two", [{"type": "output_text", "text": "TWO"}],
    ]


def test_the_response_is_read_from_a_json_answer_or_from_a_streams_end_event():
    response = {"id": "resp_1", "object": "response", "output": []}
    assert answered_response(json.dumps(response).encode(), False) == response
    assert answered_response(b'{"error": {"type": "x"}}', False) is None
    assert answered_response(b"not json", False) is None
    stream = (
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1"}}\n\n'
        b'event: response.completed\ndata: ' + json.dumps({"type": "response.completed", "response": response}).encode() + b"\n\n"
    )
    assert answered_response(stream, True) == response
    broken = stream + b'event: error\ndata: {"type":"error","code":"stream_broken"}\n\n'
    assert answered_response(broken, True) is None
    assert answered_response(stream[: stream.index(b"event: response.completed")], True) is None


def _long_stream(deltas: int, end: bytes) -> bytes:
    response = {"id": "resp_1", "object": "response", "output": [{"type": "message", "content": [{"text": "w" * deltas}]}]}
    events = [b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1"}}\n\n']
    events += [b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"w"}\n\n'] * deltas
    if end == b"completed":
        events.append(b"event: response.completed\ndata: " + json.dumps({"type": "response.completed", "response": response}).encode() + b"\n\n")
    elif end:
        events.append(end)
    return b"".join(events)


_DELTA_NAMING_THE_END = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"response.completed"}\n\n'


@pytest.mark.parametrize("end", [
    b"completed",
    b"",  # broken: no end event
    b": keep-alive\n\n",  # a comment after the deltas: the last JSON event still decides
    b'event: error\ndata: {"type":"error"}\n\n',
    b"data: not json\n\n",
    b'data: {"type":"response.completed","response":{"id":"resp_1","object":"response"}}',  # cut before its end
    b"completed, then a delta",  # the stream went on past its end: not a Response
    b"completed, then a delta naming the end",
    b"completed, then a comment",
])
@pytest.mark.parametrize("write_size", [1, 7, 100, 5000])
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_a_streams_recorder_keeps_only_its_end_and_reads_as_the_whole_stream_would(end, write_size, line_end):
    after = {
        b"completed, then a delta": _long_stream(1, b"").split(b"\n\n", 1)[1],
        b"completed, then a delta naming the end": _DELTA_NAMING_THE_END,
        b"completed, then a comment": b": done\n\n",
    }
    stream = (_long_stream(500, b"completed" if end in after else end) + after.get(end, b"")).replace(b"\n", line_end)
    recorder = Conversations(MemoryResponseStore(Clock(), 1), Clock(), DAY, 10**8, Log()).recorder(True)
    recorder.started(200, None, [])
    # Never more than the end and the event not ended yet (a long stream is hundreds of KB).
    most = 2 * (max(len(event) for event in stream.split(2 * line_end)) + 4) + write_size
    assert most < len(stream)
    for at in range(0, len(stream), write_size):
        recorder.wrote(stream[at:at + write_size])
        assert sum(len(part) for part in recorder.parts) <= most
    assert answered_response(b"".join(recorder.parts), True) == answered_response(stream, True)
    assert recorder.size == len(stream) and not recorder.overflowed


def test_a_streams_recorder_holds_no_delta_before_the_end_nor_any_header():
    recorder = StreamEndRecorder(10**8)
    recorder.started(200, b"OK", [(b"content-type", b"text/event-stream"), (b"x-request-id", b"r1")])
    assert (recorder.code, recorder.headers) == (200, ())
    for event in _long_stream(100, b"").split(b"\n\n")[:-1] + [_DELTA_NAMING_THE_END[:-2]]:
        recorder.wrote(event + b"\n\n")
        assert recorder.parts == []


def test_a_streams_recorder_finds_an_events_end_across_an_empty_write():
    completed = _long_stream(0, b"completed").split(b"\n\n")[1]
    recorder = StreamEndRecorder(10**8)
    for part in (completed + b"\n", b"", b"\n"):
        recorder.wrote(part)
    assert recorder.parts == [completed + b"\n\n"]  # read as ended, nothing left waiting
    assert answered_response(b"".join(recorder.parts), True)["id"] == "resp_1"


def test_a_stream_framed_with_crlf_ends_with_its_response():
    stream = _long_stream(3, b"completed").replace(b"\n", b"\r\n")
    assert answered_response(stream, True)["id"] == "resp_1"


def test_a_streams_recorder_over_its_limit_keeps_nothing():
    recorder = StreamEndRecorder(50_000)
    stream = _long_stream(2000, b"completed")
    for at in range(0, len(stream), 100):
        recorder.wrote(stream[at:at + 100])
    assert recorder.overflowed and recorder.parts == []
    assert answered_response(b"".join(recorder.parts), True) is None


def test_a_streams_recorder_never_keeps_from_an_event_that_has_not_ended():
    # That event reads as JSON when the recorder lets go; its next line makes it something else.
    completed = _long_stream(0, b"completed")
    deltas = _long_stream(20, b"")
    unended = b'data: {"pad":"' + b"x" * 4096 + b'"}'
    recorder = StreamEndRecorder(10**8)
    for part in (deltas, completed, unended, b"\ndata: more\n\n"):
        recorder.wrote(part)
    whole = deltas + completed + unended + b"\ndata: more\n\n"
    assert answered_response(whole, True) is not None
    assert answered_response(b"".join(recorder.parts), True) == answered_response(whole, True)


def test_a_stream_ending_in_one_large_event_is_kept_whole():
    text = "x" * 200_000
    response = {"id": "resp_1", "object": "response", "output": [{"type": "message", "content": [{"text": text}]}]}
    stream = _long_stream(300, b"") + b"event: response.completed\ndata: " + json.dumps(
        {"type": "response.completed", "response": response}).encode() + b"\n\n"
    recorder = Conversations(MemoryResponseStore(Clock(), 1), Clock(), DAY, 10**8, Log()).recorder(True)
    for at in range(0, len(stream), 1000):
        recorder.wrote(stream[at:at + 1000])
    assert answered_response(b"".join(recorder.parts), True) == response


def test_listed_input_items_have_ids_the_same_on_every_listing_and_text_as_parts():
    items = [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c1", "output": "ok", "id": "own"}]
    listed = listed_items("resp_1", items)
    assert listed == listed_items("resp_1", items)
    assert listed[0]["id"].startswith("msg_") and listed[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert listed[1]["id"] == "own"
    assert listed_items("resp_2", items)[0]["id"] != listed[0]["id"]


def test_input_items_are_paged_as_the_api_pages_them():
    items = [{"id": f"i{n}"} for n in range(5)]
    page = input_item_page(items, {"limit": "2"})
    assert [i["id"] for i in page["data"]] == ["i4", "i3"] and page["has_more"] and page["last_id"] == "i3"
    page = input_item_page(items, {"limit": "2", "after": "i3"})
    assert [i["id"] for i in page["data"]] == ["i2", "i1"]
    page = input_item_page(items, {"order": "asc", "after": "i2"})
    assert [i["id"] for i in page["data"]] == ["i3", "i4"] and not page["has_more"]
    for query in ({"limit": "0"}, {"limit": "x"}, {"order": "up"}, {"after": "nothing"}):
        with pytest.raises(GatewayError) as caught:
            input_item_page(items, query)
        assert caught.value.kind is errors.BAD_REQUEST


# -- Conversations


def answered(recorder: AnswerRecorder, response: dict, code: int = 200) -> AnswerRecorder:
    recorder.started(code, None, [])
    recorder.wrote(json.dumps(response).encode())
    return recorder


def make(max_bytes: int = 100_000) -> tuple[Conversations, MemoryResponseStore, Clock, Log]:
    clock, log = Clock(), Log()
    store = MemoryResponseStore(clock, 100)
    return Conversations(store, clock, DAY, max_bytes, log), store, clock, log


def test_a_response_is_kept_with_its_owner_and_its_turns_input():
    conversations, store, _, _ = make()
    body = {"model": "m", "input": "hello"}
    result_of(conversations.keep(body, "alice", [], answered(conversations.recorder(), record("resp_1").response), False))
    kept = result_of(store.get("resp_1"))
    assert (kept.owner, kept.input, kept.previous_id) == ("alice", [{"type": "message", "role": "user", "content": "hello"}], None)
    assert done(conversations.retrieve("resp_1", "alice"))["id"] == "resp_1"


def test_a_call_going_on_is_sent_with_every_earlier_turn_and_without_the_previous_id():
    conversations, store, _, _ = make()
    result_of(store.put(*kept("resp_1", text="one")))
    result_of(store.put(*kept("resp_2", previous="resp_1", text="two")))
    body, chain = done(conversations.continued({"model": "m", "previous_response_id": "resp_2", "input": "three"}, "alice"))
    assert "previous_response_id" not in body and [turn.id for turn in chain] == ["resp_1", "resp_2"]
    assert [item["content"] if isinstance(item["content"], str) else item["content"][0]["text"] for item in body["input"]] == [
        "one", "ONE", "two", "TWO", "three",
    ]
    assert done(conversations.continued({"input": "x"}, "alice")) == ({"input": "x"}, [])


def test_another_callers_response_is_not_found_whichever_way_it_is_asked_for():
    conversations, store, _, _ = make()
    result_of(store.put(*kept("resp_1")))
    for asking in (
        lambda: conversations.continued({"previous_response_id": "resp_1"}, "mallory"),
        lambda: conversations.retrieve("resp_1", "mallory"),
        lambda: conversations.delete("resp_1", "mallory"),
        lambda: conversations.input_items("resp_1", "mallory", {}),
    ):
        failure = []
        ensureDeferred(asking()).addErrback(failure.append)
        assert failure[0].value.kind in (errors.NOT_FOUND, errors.PREVIOUS_RESPONSE_NOT_FOUND)
    assert result_of(store.get("resp_1")) is not None  # mallory's delete did nothing


def test_a_missing_earlier_turn_is_named_and_a_failed_store_is_503():
    conversations, store, _, _ = make()
    result_of(store.put(*kept("resp_2", previous="resp_1")))
    failure = []
    ensureDeferred(conversations.continued({"previous_response_id": "resp_2"}, "alice")).addErrback(failure.append)
    assert failure[0].value.kind is errors.PREVIOUS_RESPONSE_NOT_FOUND and "resp_1" in failure[0].value.message

    class Failing(MemoryResponseStore):
        def get(self, response_id):
            return fail(StoreFailed("Redis went away"))

    broken = Conversations(Failing(Clock(), 1), Clock(), DAY, 1000, Log())
    failure = []
    ensureDeferred(broken.retrieve("resp_1", "alice")).addErrback(failure.append)
    assert failure[0].value.kind is errors.RESPONSES_UNAVAILABLE


def test_keeping_a_turn_keeps_its_earlier_turns_as_long():
    conversations, store, clock, _ = make()
    result_of(store.put(*kept("resp_1")))
    clock.advance(0.9 * DAY)
    chain = [result_of(store.get("resp_1"))]
    body = {"previous_response_id": "resp_1", "input": "more"}
    result_of(conversations.keep(body, "alice", chain, answered(conversations.recorder(), record("resp_2").response), False))
    clock.advance(0.5 * DAY)
    assert result_of(store.get("resp_1")) is not None
    assert result_of(store.get("resp_2")).previous_id == "resp_1"


def test_errors_broken_streams_and_too_large_responses_are_not_kept():
    conversations, store, _, log = make(max_bytes=2000)
    assert conversations.keep({}, "alice", [], answered(conversations.recorder(), {"error": {}}, 400), False) is None
    assert conversations.keep({}, "alice", [], answered(conversations.recorder(), {"error": {}}), False) is None
    large = record("resp_big", text="x" * 3000).response
    assert conversations.keep({}, "alice", [], answered(conversations.recorder(), large), False) is None
    assert len(store) == 0
    assert [event for _, event, _ in log.lines] == ["response_not_stored"]


def test_a_next_turn_waits_for_its_previous_one_still_being_kept():
    clock = Clock()
    store = MemoryResponseStore(clock, 10)
    held: list[Deferred] = []

    class Slow(MemoryResponseStore):
        def put(self, kept, encoded):
            d = Deferred()
            held.append(d)
            d.addCallback(lambda _: store.put(kept, encoded))
            return d

        def get(self, response_id):
            return store.get(response_id)

    conversations = Conversations(Slow(clock, 10), clock, DAY, 10_000, Log())
    conversations.keep({"input": "one"}, "alice", [], answered(conversations.recorder(), record("resp_1").response), False)
    going_on = ensureDeferred(conversations.continued({"previous_response_id": "resp_1", "input": "two"}, "alice"))
    assert not going_on.called
    held[0].callback(None)
    body, chain = result_of(going_on)
    assert [turn.id for turn in chain] == ["resp_1"]


def test_a_deleted_response_is_answered_as_the_api_does_and_gone_after():
    conversations, store, _, _ = make()
    result_of(store.put(*kept("resp_1")))
    assert done(conversations.delete("resp_1", "alice")) == {"id": "resp_1", "object": "response", "deleted": True}
    assert result_of(store.get("resp_1")) is None


def test_input_items_are_the_earlier_turns_and_the_responses_own_input():
    conversations, store, _, _ = make()
    result_of(store.put(*kept("resp_1", text="one")))
    result_of(store.put(*kept("resp_2", previous="resp_1", text="two")))
    page = done(conversations.input_items("resp_2", "alice", {"order": "asc"}))
    assert [item["content"][0]["text"] for item in page["data"]] == ["one", "ONE", "two"]


def test_conversations_need_a_response_store():
    with pytest.raises(TypeError):
        Conversations(object(), Clock(), DAY, 1, Log())


def _open_store(path: str, ready, results) -> None:
    ready.wait()
    try:
        SqliteResponseStore(path, Clock(), maybeDeferred, 10).close()
        results.put("opened")
    except Exception as error:  # noqa: BLE001 - what a worker would die of
        results.put(repr(error))


def test_workers_starting_together_all_open_a_new_response_file(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(40):  # before the mend, some rounds in every run of 40 failed "database is locked"
        path = str(tmp_path / f"round{round_}" / "responses.db")
        ready, results = context.Barrier(3), context.Queue()
        workers = [context.Process(target=_open_store, args=(path, ready, results)) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert [results.get(timeout=5) for _ in workers] == ["opened"] * 3
