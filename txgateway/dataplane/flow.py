"""
Flow control as one object (as uvicorn's C{flow_control.py}): reading a
connection paused and resumed, each idempotent, so that the reasons to
pause (a queue of pipelined requests full, a connection closing after its
answer, a slow client of a relayed body) never pause or resume twice.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer

__all__ = ["ReadingControl"]


class ReadingControl:
    """Whether a transport's reading is paused, and the one place that pauses and resumes it."""

    __slots__ = ("_transport", "paused")

    def __init__(self, transport: IPushProducer) -> None:
        self._transport = transport
        self.paused = False

    def pause_reading(self) -> None:
        """Stop reading the transport (nothing happens when it is already paused)."""
        if not self.paused:
            self.paused = True
            self._transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read the transport again (nothing happens when it is not paused)."""
        if self.paused:
            self.paused = False
            self._transport.resumeProducing()
