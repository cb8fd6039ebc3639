"""
L{SharedCallbacks}: the callbacks every llhttp parser of one kind calls,
one object for all connections.

httptools takes a parser's callbacks from the object it parses for, with
C{getattr}: given each connection, that is six bound methods a parser, and
given one shared object, six new bound methods a parser all the same.  A
stream holds two parsers for as long as it lasts, so the callbacks are
bound once, here, and the object is told whose bytes are parsed: the
connection sets L{SharedCallbacks.connection} around C{feed_data} and puts
back the one before (a request dispatched from a callback may set another
connection parsing).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SharedCallbacks"]


class SharedCallbacks:
    """
    Subclasses define the parser's callbacks (reading the connection from
    L{connection}) and name them in L{CALLBACKS}.
    """

    #: The callbacks the parser is to find, bound once.
    CALLBACKS: tuple[str, ...] = ()

    def __init__(self) -> None:
        #: The connection whose bytes are being parsed (L{None} between reads).
        self.connection: Any = None
        for callback in self.CALLBACKS:
            setattr(self, callback, getattr(self, callback))
