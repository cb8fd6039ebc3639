"""
The lean dispatch of the epoll reactor's ready sockets, on a real (not
running, not global) C{EPollReactor} and a real socket pair: data reaches
its reader, a reader that raises is logged and disconnected as Twisted's
own dispatch does, and a Twisted whose C{doPoll} changed keeps its own.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import abstract, task
from twisted.python import log

from txgateway.daemon import dispatch

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class _Reader(abstract.FileDescriptor):
    """Reads one end of a socket pair; raises from doRead when told to."""

    def __init__(self, reactor, sock, explode=False):
        super().__init__(reactor)
        self.sock = sock
        self.explode = explode
        self.received = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        data = self.sock.recv(4096)
        if self.explode:
            raise RuntimeError("a reader that breaks")
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)
        self.reactor.removeReader(self)

    def logPrefix(self):
        return "test-reader"


@pytest.fixture
def reactor():
    made = epollreactor.EPollReactor()
    yield made
    made._poller.close()
    for selectable in list(made._selectables.values()):
        try:
            selectable.connectionLost(None)
        except Exception:
            pass


@pytest.fixture
def pair():
    one, two = socket.socketpair()
    yield one, two
    one.close()
    two.close()


def test_the_copied_doPoll_is_the_installed_twisted_one():
    """A Twisted release that changes doPoll fails here: read it again, then update DOPOLL_DIGEST."""
    assert dispatch._dopoll_digest(epollreactor.EPollReactor) == dispatch.DOPOLL_DIGEST


def test_a_ready_socket_reaches_its_reader(reactor, pair, monkeypatch):
    assert dispatch.lean_dispatch(reactor) is True

    def legacy_context(*args, **kwargs):
        raise AssertionError("dispatched through callWithLogger")

    monkeypatch.setattr(epollreactor.log, "callWithLogger", legacy_context)
    reader = _Reader(reactor, pair[0])
    reactor.addReader(reader)
    pair[1].send(b"a chunk")
    reactor.doIteration(1.0)
    assert reader.received == [b"a chunk"]
    assert reader.lost == []


def test_a_reader_that_raises_is_logged_and_disconnected(reactor, pair):
    dispatch.lean_dispatch(reactor)
    broken = _Reader(reactor, pair[0], explode=True)
    reactor.addReader(broken)
    seen = []
    log.addObserver(seen.append)
    try:
        pair[1].send(b"data")
        reactor.doIteration(1.0)
    finally:
        log.removeObserver(seen.append)
    assert len(broken.lost) == 1
    assert broken.lost[0].check(RuntimeError)
    assert any(event.get("isError") for event in seen)


def test_an_error_past_the_readers_own_handling_is_logged_and_the_loop_goes_on(reactor):
    """A selectable whose disconnection raises: logged with its prefix; the next ready socket is still served."""
    dispatch.lean_dispatch(reactor)
    first_pair, second_pair = socket.socketpair(), socket.socketpair()
    try:
        bad = _Reader(reactor, first_pair[0], explode=True)

        def lost_badly(reason):
            raise ValueError("connectionLost that breaks")

        bad.connectionLost = lost_badly
        good = _Reader(reactor, second_pair[0])
        reactor.addReader(bad)
        reactor.addReader(good)
        first_pair[1].send(b"x")
        second_pair[1].send(b"y")
        seen = []
        log.addObserver(seen.append)
        try:
            reactor.doIteration(1.0)
        finally:
            log.removeObserver(seen.append)
        reactor.removeReader(bad)
        assert good.received == [b"y"]
        errors = [event for event in seen if event.get("isError")]
        assert any(event.get("system") == "test-reader" for event in errors)
    finally:
        for sock in (*first_pair, *second_pair):
            sock.close()


def test_other_reactors_keep_their_own_dispatch():
    clock = task.Clock()
    assert dispatch.lean_dispatch(clock) is False
    from twisted.internet import pollreactor

    other = pollreactor.PollReactor()
    try:
        before = other.doIteration
        assert dispatch.lean_dispatch(other) is False
        assert other.doIteration == before
    finally:
        other._poller = None


def test_a_changed_twisted_keeps_its_own_dispatch(reactor, monkeypatch):
    monkeypatch.setattr(dispatch, "DOPOLL_DIGEST", "another Twisted's")
    before = reactor.doIteration
    assert dispatch.lean_dispatch(reactor) is False
    assert reactor.doIteration == before


def test_the_timers_bookkeeping_is_the_installed_twisted_one():
    """A Twisted release that changes how its timers' heap is kept fails here: read it again, then update TIMERS_DIGEST."""
    assert dispatch._timers_digest(epollreactor.EPollReactor) == dispatch.TIMERS_DIGEST


def test_cancelled_timers_leave_the_heap_once_an_eighth_of_it_and_the_others_fire_in_order(reactor):
    assert dispatch.lean_dispatch(reactor) is True
    now = [1000.0]
    reactor.seconds = lambda: now[0]
    fired = []
    live = [reactor.callLater(10 + n, fired.append, n) for n in range(400)]
    cancelled = [reactor.callLater(5 + n, fired.append, -n) for n in range(49)]
    reactor.runUntilCurrent()  # into the heap
    for call in cancelled:
        call.cancel()
    reactor.doPoll(0)
    assert len(reactor._pendingTimedCalls) == 449  # 49: not yet worth a copy of the heap
    late = [reactor.callLater(7, fired.append, -1000 - n) for n in range(10)]
    reactor.runUntilCurrent()
    for call in late:
        call.cancel()
    made_now = reactor.callLater(8, fired.append, "new")
    made_now.cancel()  # made in this iteration: not in the heap yet
    reactor.doPoll(0)
    assert len(reactor._pendingTimedCalls) == 400 and all(call.active() for call in reactor._pendingTimedCalls)
    assert reactor._cancellations == 1
    reactor.runUntilCurrent()
    assert reactor._cancellations == 0
    now[0] += 500
    reactor.runUntilCurrent()
    assert fired == list(range(400)) and not any(call.active() for call in live)


def test_a_twisted_whose_timers_are_kept_otherwise_keeps_its_cancelled_ones(reactor, monkeypatch):
    monkeypatch.setattr(dispatch, "TIMERS_DIGEST", "0" * 64)
    assert dispatch.lean_dispatch(reactor) is True
    reactor.seconds = lambda: 1000.0
    calls = [reactor.callLater(10 + n, lambda: None) for n in range(100)]
    reactor.runUntilCurrent()
    for call in calls[:60]:
        call.cancel()
    reactor.doPoll(0)
    assert len(reactor._pendingTimedCalls) == 100
