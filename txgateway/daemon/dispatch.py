"""
A leaner dispatch of the epoll reactor's ready sockets.

Twisted's C{EPollReactor.doPoll} calls each ready socket through
C{twisted.python.log.callWithLogger}: the socket's C{logPrefix()}, a copy
of the legacy log context with it as C{system}, a push and a pop of the
context stack, then C{_doReadOrWrite}.  The gateway logs through
structlog and never reads that context, and a relayed stream chunk is one
ready socket: measured at about 1.5 us of a chunk's 25 (py-spy on
``bench/streams.py``).  L{lean_dispatch} gives the reactor a C{doPoll}
that calls C{_doReadOrWrite} directly, with the same errors handled the
same way: C{_doReadOrWrite} already catches what a read or write raises
(logs it and disconnects the socket); anything else is logged, as
C{callWithLogger} did, with the socket's log prefix.

It also drops cancelled timers from the reactor's heap sooner.  A
cancelled C{DelayedCall} stays in the heap until its time comes, or until
cancelled ones are half of the heap (Twisted's C{runUntilCurrent}): each
stream's first-byte and commit timeouts, cancelled when its answer
starts, stayed there for as long as the timeout (minutes), about 330 B
each (the call, its dictionary, its two bound methods): a thousand
streams held a thousand of them.  Here they go once they are an eighth
of the heap (L{CANCELLED_SHARE}; a copy of the heap, the live calls kept,
in their order), in the same way.

It applies only to the exact C{EPollReactor} class whose C{doPoll} it
copies (a Twisted release that changes it keeps its own: see
L{DOPOLL_DIGEST} and C{tests/test_dispatch.py}); any other reactor is
left as it is, and a Twisted whose timers' bookkeeping changed keeps its
cancelled timers as it does (L{TIMERS_DIGEST}).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
from heapq import heapify
from typing import Any

from twisted.python import log

__all__ = ["CANCELLED_SHARE", "DOPOLL_DIGEST", "TIMERS_DIGEST", "lean_dispatch"]

#: The SHA-256 of the sources of the C{ReactorBase} methods that keep the
#: timers' heap (C{runUntilCurrent}, C{_insertNewDelayedCalls},
#: C{_cancelCallLater}): the bookkeeping L{_drop_cancelled} keeps alike.
TIMERS_DIGEST = "41b3305bb9d77f6f45d65866d647b1070b132320276e0864ea818961edea9113"

#: Cancelled timers are dropped from the reactor's heap once they are more
#: than 50 and more than this share of it (Twisted's own: a half).
CANCELLED_SHARE = 8

#: The SHA-256 of the source of the C{EPollReactor.doPoll} this module copies.
DOPOLL_DIGEST = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"


def _dopoll_digest(reactor_class: type) -> str:
    return hashlib.sha256(inspect.getsource(reactor_class.doPoll).encode()).hexdigest()


def _timers_digest(reactor_class: type) -> str:
    methods = (reactor_class.runUntilCurrent, reactor_class._insertNewDelayedCalls, reactor_class._cancelCallLater)
    return hashlib.sha256("".join(inspect.getsource(method) for method in methods).encode()).hexdigest()


def lean_dispatch(reactor: Any) -> bool:
    """
    Give C{reactor} the lean C{doPoll} when it is Twisted's epoll reactor
    with the C{doPoll} this module copies; returns whether it did.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    try:
        if _dopoll_digest(EPollReactor) != DOPOLL_DIGEST:
            return False
        drops_cancelled = _timers_digest(EPollReactor) == TIMERS_DIGEST
    except (OSError, TypeError):  # no source to compare: keep Twisted's own
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite
    poll = poller.poll
    get = selectables.get

    def doPoll(timeout: float | None) -> None:
        if drops_cancelled:
            cancelled = reactor._cancellations
            if cancelled > 50 and cancelled * CANCELLED_SHARE > len(reactor._pendingTimedCalls):
                _drop_cancelled(reactor)
        if timeout is None:
            timeout = -1
        try:
            ready = poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = get(fd)
            if selectable is None:
                continue
            try:
                do_read_or_write(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=_prefix(selectable))

    reactor.doPoll = doPoll
    reactor.doIteration = doPoll
    return True


def _drop_cancelled(reactor: Any) -> None:
    """
    Drop the cancelled timers from C{reactor}'s heap, as Twisted's
    C{runUntilCurrent} does past its half; the count of those cancelled
    goes on with the ones not in the heap yet (made in this iteration).
    """
    pending = [call for call in reactor._pendingTimedCalls if not call.cancelled]
    heapify(pending)
    reactor._pendingTimedCalls = pending
    reactor._cancellations = sum(1 for call in reactor._newTimedCalls if call.cancelled)


def _prefix(selectable: Any) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return "(buggy logPrefix method)"
