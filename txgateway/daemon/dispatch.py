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

It applies only to the exact C{EPollReactor} class whose C{doPoll} it
copies (a Twisted release that changes it keeps its own: see
L{DOPOLL_DIGEST} and C{tests/test_dispatch.py}); any other reactor is
left as it is.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
from typing import Any

from twisted.python import log

__all__ = ["DOPOLL_DIGEST", "lean_dispatch"]

#: The SHA-256 of the source of the C{EPollReactor.doPoll} this module copies.
DOPOLL_DIGEST = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"


def _dopoll_digest(reactor_class: type) -> str:
    return hashlib.sha256(inspect.getsource(reactor_class.doPoll).encode()).hexdigest()


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
    except (OSError, TypeError):  # no source to compare: keep Twisted's own
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite
    poll = poller.poll
    get = selectables.get

    def doPoll(timeout: float | None) -> None:
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


def _prefix(selectable: Any) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return "(buggy logPrefix method)"
