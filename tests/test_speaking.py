"""
What every API package shares (C{txgateway.speaking}): here, the
L{Transcript} of a streamed answer, which a resume is sent from and a
governed stream is settled by.
"""

from __future__ import annotations

import tracemalloc

import attrs

from txgateway.speaking import MessageText, TextBuffer, Transcript


@attrs.frozen
class Sent:
    """A chunk's facts, as a relay hands them to the transcript."""

    text: str = ""
    tool_call: bool = False
    finished: bool = False
    finish_reasons: tuple = ()
    message_id: str | None = None
    data: dict | None = None


def test_the_text_sent_is_kept_whole_in_any_script():
    transcript = Transcript(resumable=True)
    for piece in ("Hello", ", ", "wörld ", "日本", " 🎉", ""):
        transcript.sent(Sent(text=piece), first_stream=True)
    assert transcript.text == "Hello, wörld 日本 🎉"
    assert transcript.text_bytes == len("Hello, wörld 日本 🎉".encode("utf-8"))
    assert transcript.content_chunks == 5  # an empty piece is no content


def test_a_lone_surrogate_from_json_comes_back_as_it_came():
    transcript = Transcript(resumable=True)
    transcript.sent(Sent(text="a\ud800"), first_stream=True)  # json.loads('"a\\ud800"') gives such text
    transcript.sent(Sent(text="b"), first_stream=True)
    assert transcript.text == "a\ud800b"
    assert transcript.text_bytes == 5  # counted as its three bytes: never fewer tokens settled than sent


def test_a_long_streams_transcript_costs_about_its_texts_bytes():
    # A stream of minutes sends thousands of pieces of a few characters; each
    # kept as a string of its own would be about 60 bytes.
    pieces = [f"w{n % 10}rd" for n in range(20_000)]
    tracemalloc.start()
    try:
        transcript = Transcript(resumable=True)
        for piece in pieces:
            transcript.sent(Sent(text=piece), first_stream=True)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert transcript.text_bytes == 80_000
    assert held < 2 * 80_000


def test_a_text_buffer_gives_back_its_pieces_in_order_and_counts_their_bytes():
    buffer = TextBuffer()
    assert not buffer and str(buffer) == ""
    taken = [buffer.append(piece) for piece in ("Hé", "", "日本", "a\ud800")]
    assert taken == [3, 0, 6, 4]
    assert buffer and str(buffer) == "Hé日本a\ud800"


def test_a_text_buffer_of_many_small_pieces_costs_about_their_bytes():
    tracemalloc.start()
    try:
        buffer = TextBuffer()
        for n in range(20_000):
            buffer.append(f"w{n % 10}rd")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(str(buffer)) == 80_000
    assert held < 2 * 80_000  # 20,000 strings of their own would be about 1.1 MB


def test_the_first_streams_chunk_id_is_kept_and_a_tool_call_ends_resumability():
    transcript = Transcript(resumable=True)
    transcript.sent(Sent(text="a", data={"id": "chatcmpl-1"}), first_stream=True)
    transcript.sent(Sent(text="b", data={"id": "chatcmpl-2"}), first_stream=True)
    transcript.sent(Sent(tool_call=True, finished=True, finish_reasons=("tool_calls",), data={"id": "x"}), first_stream=False)
    assert transcript.chunk_id == "chatcmpl-1"
    assert not transcript.resumable and transcript.finished
    assert transcript.finish_reasons == ("tool_calls",)


def test_a_stream_no_target_resumes_keeps_only_the_size_of_its_text():
    # Most services do not resume: a stream of minutes would hold its whole text for nothing.
    transcript = Transcript(resumable=False)
    for piece in ("Hello", ", wörld"):
        transcript.sent(Sent(text=piece), first_stream=True)
    assert transcript.text == ""
    assert (transcript.text_bytes, transcript.text_chars, transcript.content_chunks) == (13, 12, 2)


def test_a_tool_call_lets_go_of_the_text_nothing_will_continue():
    transcript = Transcript(resumable=True)
    transcript.sent(Sent(text="Let me look"), first_stream=True)
    transcript.sent(Sent(tool_call=True), first_stream=True)
    transcript.sent(Sent(text=" more"), first_stream=True)
    assert not transcript.resumable and transcript.text == ""
    assert (transcript.text_bytes, transcript.text_chars) == (16, 16)


def told(transcript: Transcript, message: MessageText, *pieces: str, taken: bool = True) -> None:
    """Each piece's event told to the transcript, then (C{taken}) written into the message, as a relay and its writer do."""
    for piece in pieces:
        transcript.sent(Sent(text=piece), first_stream=True)
        if taken:
            message.append(piece)


def test_a_messages_text_is_the_transcripts_own_not_kept_again():
    pieces = [f"w{n % 10}rd" for n in range(20_000)]
    tracemalloc.start()
    try:
        transcript = Transcript(resumable=True)
        message = MessageText(transcript)
        told(transcript, message, *pieces)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert str(message) == transcript.text == "".join(pieces)
    assert held < 1.3 * 80_000  # the text once, not twice


def test_a_message_opened_later_says_only_its_own_pieces():
    transcript = Transcript(resumable=True)
    before = MessageText(transcript)
    told(transcript, before, "Thinking ", "done.")
    message = MessageText(transcript)  # another item came between: a new message
    told(transcript, message, "Hé ", "日本", "a\ud800")
    assert str(before) == "Thinking done."
    assert str(message) == "Hé 日本a\ud800" and message
    assert transcript.text == "Thinking done.Hé 日本a\ud800"


def test_a_piece_the_transcript_kept_and_the_message_did_not_take_parts_them():
    transcript = Transcript(resumable=True)
    message = MessageText(transcript)
    told(transcript, message, "one ", "two ")
    told(transcript, message, "(not the message's) ", taken=False)
    told(transcript, message, "three")
    assert str(message) == "one two three"
    assert transcript.text == "one two (not the message's) three"


def test_a_piece_the_transcript_did_not_keep_parts_them():
    transcript = Transcript(resumable=True)
    message = MessageText(transcript)
    told(transcript, message, "one ")
    message.append("two ")  # never told to the transcript
    told(transcript, message, "three")
    assert str(message) == "one two three" and transcript.text == "one three"


def test_a_message_goes_on_with_its_own_text_once_the_transcript_lets_go_of_it():
    transcript = Transcript(resumable=True)
    message = MessageText(transcript)
    told(transcript, message, "Let me ")
    transcript.sent(Sent(text="look", tool_call=True), first_stream=True)  # its text kept, then let go of
    message.append("look")
    told(transcript, message, " again")
    assert not transcript.resumable and transcript.text == ""
    assert str(message) == "Let me look again"


def test_a_message_opened_after_the_transcript_let_go_of_its_text_keeps_its_own():
    transcript = Transcript(resumable=True)
    piece = "look"
    transcript.sent(Sent(text=piece, tool_call=True), first_stream=True)  # kept last, then let go of
    message = MessageText(transcript)
    message.append(piece)  # the very same piece, and the transcript keeps nothing now
    told(transcript, message, " again")
    assert str(message) == "look again"


def test_a_message_keeps_its_own_text_when_the_transcript_keeps_none():
    for transcript in (Transcript(resumable=False), None):
        message = MessageText(transcript)
        assert not message and str(message) == ""
        for piece in ("Hello", ", wörld"):
            if transcript is not None:
                transcript.sent(Sent(text=piece), first_stream=True)
            message.append(piece)
        assert message and str(message) == "Hello, wörld"


def test_a_transcript_that_keeps_no_text_holds_no_buffer_for_it():
    def held_by_a_thousand(resumable: bool) -> float:
        tracemalloc.start()
        try:
            transcripts = [Transcript(resumable=resumable) for _ in range(1000)]
            return tracemalloc.get_traced_memory()[0] / len(transcripts)
        finally:
            tracemalloc.stop()

    # Most streams are of services that do not resume: a thousand streams, a thousand empty buffers.
    assert held_by_a_thousand(False) < held_by_a_thousand(True) - 80
