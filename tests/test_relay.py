"""The body relay's flow control and idle timer, against a recording request."""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from tests.fakes import FakeBodyTransport, result_of
from txgateway.dataplane.client import StreamEnded
from txgateway.dataplane.relay import BodyRelay, StreamBroken, StreamIdle


class RecordingRequest:
    def __init__(self):
        self.written = []
        self.producer = None

    def register_producer(self, producer):
        self.producer = producer

    def unregister_producer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)


def connected(idle_timeout=5.0):
    clock, request, transport = Clock(), RecordingRequest(), FakeBodyTransport()
    relay = BodyRelay(request, clock, idle_timeout)
    relay.body_started(transport)
    relay.watch_idle()
    return clock, request, transport, relay


def test_the_relay_is_the_clients_push_producer():
    _, request, _, relay = connected()
    assert request.producer is relay


def test_a_slow_client_pauses_the_backend_read_and_resumes_it():
    _, request, transport, relay = connected()
    request.producer.pauseProducing()
    assert transport.paused
    request.producer.resumeProducing()
    assert not transport.paused


def test_the_idle_timer_stands_still_while_the_client_is_the_slow_one():
    clock, request, transport, relay = connected(idle_timeout=5)
    request.producer.pauseProducing()
    clock.advance(60)
    assert not transport.stopped
    request.producer.resumeProducing()
    clock.advance(4.999)
    assert not transport.stopped
    clock.advance(0.001)
    assert transport.stopped


def test_each_chunk_rearms_the_idle_timer():
    clock, request, transport, relay = connected(idle_timeout=5)
    for n in range(5):
        clock.advance(4)
        relay.body_received(b"%d" % n)
    assert request.written == [b"0", b"1", b"2", b"3", b"4"]
    assert not transport.stopped


def test_the_idle_timeout_counts_from_the_last_chunk_exactly():
    """The timer is not moved per chunk: when it fires early it waits what is left, to the instant."""
    clock, request, transport, relay = connected(idle_timeout=5)
    clock.advance(3)
    relay.body_received(b"a")
    clock.advance(1.5)
    relay.body_received(b"b")  # the last chunk, at 4.5 s
    clock.advance(4.75)
    assert not transport.stopped
    clock.advance(0.25)
    assert transport.stopped
    assert clock.getDelayedCalls() == []


def test_a_chunk_before_a_pause_does_not_shorten_the_wait_after_the_resume():
    clock, request, transport, relay = connected(idle_timeout=5)
    clock.advance(2)
    relay.body_received(b"a")
    request.producer.pauseProducing()
    clock.advance(30)
    request.producer.resumeProducing()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.999)
    assert not transport.stopped
    clock.advance(0.001)
    assert transport.stopped


def test_an_idle_body_fails_done_with_stream_idle():
    clock, _, transport, relay = connected(idle_timeout=5)
    clock.advance(5)
    relay.body_ended(StreamEnded("aborted"))
    failures = []
    relay.done.addErrback(failures.append)
    assert failures[0].check(StreamIdle)


def test_a_complete_body_fires_done_and_leaves_no_timer():
    clock, request, _, relay = connected()
    relay.body_received(b"all")
    relay.body_ended(None)
    assert result_of(relay.done) is None
    assert request.producer is None
    assert clock.getDelayedCalls() == []


def test_cancelling_done_stops_the_backend_transport():
    clock, _, transport, relay = connected()
    relay.done.cancel()
    relay.done.addErrback(lambda f: None)
    assert transport.stopped
    assert clock.getDelayedCalls() == []


def test_a_body_complete_before_watching_needs_no_timer():
    clock, request, transport = Clock(), RecordingRequest(), FakeBodyTransport()
    relay = BodyRelay(request, clock, 5.0)
    relay.body_started(transport)
    relay.body_received(b"small")
    relay.body_ended(None)
    relay.watch_idle()
    assert clock.getDelayedCalls() == []
    assert result_of(relay.done) is None


def test_the_client_leaving_mid_answer_is_a_cancellation_not_a_broken_stream():
    _, request, transport, relay = connected()
    relay.body_received(b"part")
    request.producer.stopProducing()  # the client's connection is gone
    assert transport.stopped
    relay.body_ended(StreamEnded("aborted by us"))
    failures = []
    relay.done.addErrback(failures.append)
    assert failures[0].check(CancelledError)


def test_a_body_that_breaks_fails_done_with_stream_broken():
    _, _, _, relay = connected()
    relay.body_received(b"part")
    relay.body_ended(StreamEnded("the connection was lost mid-answer"))
    failures = []
    relay.done.addErrback(failures.append)
    assert failures[0].check(StreamBroken)
    assert "lost mid-answer" in failures[0].getErrorMessage()


def test_trailer_and_the_headers_connection_names_are_hop_by_hop_both_ways():
    from tests.fakes import FakeResponse
    from txgateway.dataplane.headers import request_headers_for_upstream, response_headers_for_client
    from txgateway.dataplane.server import IncomingRequest

    hops = {b"Trailer": b"Expires", b"Connection": b"x-hop", b"X-Hop": b"1", b"TE": b"trailers", b"X-Kept": b"2"}
    answer = FakeResponse(200, hops, b"")
    assert response_headers_for_client(answer) == [(b"X-Kept", b"2")]
    request = IncomingRequest(None, b"GET", b"/x", list(hops.items()))
    sent = dict(request_headers_for_upstream(request, "r1", "10.0.0.1"))
    assert b"X-Kept" in sent and not {b"Trailer", b"Connection", b"X-Hop", b"TE"} & set(sent)


def _held_relay():
    """A relay before its commit point (no client request yet), its backend started."""
    relay = BodyRelay(None, Clock(), 5.0)
    relay.body_started(FakeBodyTransport())
    return relay


def test_the_commit_points_wait_is_let_go_once_the_first_data_came_and_a_later_ask_is_answered_at_once():
    import gc
    import weakref

    relay = _held_relay()
    waiting = relay.first_data
    seen = weakref.ref(waiting)
    relay.body_received(b"data: {}\n\n")
    assert result_of(waiting) is None and relay.has_first_data
    del waiting
    gc.collect()
    assert seen() is None  # a stream lasts minutes: its relay keeps no fired Deferred
    assert result_of(relay.first_data) is None


def test_first_data_asked_only_after_the_first_bytes_came_has_fired():
    relay = _held_relay()
    relay.body_received(b"x")
    assert relay.first_data.called and result_of(relay.first_data) is None


def test_a_body_that_breaks_before_its_first_data_fails_it_for_whoever_asks_then():
    relay = _held_relay()
    relay.body_ended(StreamEnded("the connection was lost"))
    failed = relay.first_data
    assert failed.called and not relay.has_first_data
    assert relay.first_data is failed  # the same failure, once
    failed.addErrback(lambda failure: failure.trap(StreamBroken))
