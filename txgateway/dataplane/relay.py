"""
The relay that streams a backend's answer to the client as it arrives,
with backpressure and an idle timer, and holds its first bytes until the
commit point.
"""

from __future__ import annotations

import functools
import weakref

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import Attribute, Interface, implementer

from txgateway.dataplane.client import BodyControl, IBodyConsumer
from txgateway.dataplane.idle import IdleTimer
from txgateway.dataplane.server import IncomingRequest

__all__ = ["BodyRelay", "IAnswerRelay", "StreamBroken", "StreamIdle"]

class StreamIdle(Exception):
    """The backend's body went silent for longer than C{idle_timeout}."""


class StreamBroken(Exception):
    """The backend's body ended before it was complete."""


class IAnswerRelay(Interface):
    """
    What the gateway does with a backend's answer body: hold it until the
    commit point, then relay it to the client.  Every relay provides it.
    """

    first_data = Attribute("A Deferred firing once the first bytes (or the end) came, before the commit.")
    has_first_data = Attribute("first_data fired with success.")
    done = Attribute("A Deferred firing once the body is complete (see L{BodyRelay}).")
    complete = Attribute("The body ended whole.")
    bytes_relayed = Attribute("Body bytes written to the client.")
    resumable = Attribute("A broken answer may be continued by another attempt (a completion stream).")
    content_type = Attribute("The Content-Type the client gets in place of the backend's (L{None}: the backend's).")

    def client_length(backend_length):
        """The body length the client is told, given the backend's (L{None}: unknown, chunked)."""

    def commit(request):
        """Start relaying to C{request}: what was held first."""

    def watch_idle():
        """Become the client's producer and start the idle timer."""

    def held_body(limit):
        """Before the commit: a Deferred firing with the whole body, or L{None}."""

    def cancel():
        """Stop the backend's delivery."""


@implementer(IPushProducer, IBodyConsumer, IAnswerRelay)
class BodyRelay:
    """
    Streams a backend's body to the client chunk by chunk, registered as the
    client's push producer (a slow client pauses the backend read), with an
    idle timer between chunks that stands still while the client is the
    slow one.

    Until L{commit} it is not yet relaying: it holds what arrives and fires
    C{first_data} once the first bytes (or the end) came, or fails it with
    L{StreamBroken}: the gateway's commit point, before which an attempt
    may still be retried.

    C{done} fires with L{None} when the body is complete (C{complete} is
    then set), or fails with
    L{StreamIdle} or L{StreamBroken} (the backend's doing) or
    L{CancelledError} (the client went away); cancelling it stops the
    backend's delivery.
    """

    # Slots: a relay lives as long as its answer (a stream's minutes), and a
    # fixed layout holds it in about 0.2 KB whatever its subclass sets (an
    # instance with a dictionary, as CPython makes one past 29 attributes or
    # in another order than the first instance's, was 1.6 to 2.4 KB).
    __slots__ = (
        "_request", "_first_data", "has_first_data", "_held", "_held_end", "_held_size", "_whole", "_whole_limit",
        "_clock", "_idle_timeout", "_idle", "_control", "_watching", "_idled", "_client_left", "complete",
        "bytes_relayed", "done", "__weakref__",
    )

    #: A plain body cannot be continued by another attempt.
    resumable = False

    def __init__(self, request: IncomingRequest | None, clock: IReactorTime, idle_timeout: float) -> None:
        self._request = request
        #: Made when the commit point asks before the first data came, let go once it fired with
        #: success (a stream lasts minutes); kept once failed, for whoever asks.
        self._first_data: Deferred[None] | None = None
        self.has_first_data = False  # first_data fired with success
        self._held: list[bytes] | tuple[()] = []
        self._held_end: tuple[Exception | None] | None = None
        self._held_size = 0
        self._whole: Deferred[bytes | None] | None = None
        self._whole_limit = 0
        self._clock = clock
        self._idle_timeout = idle_timeout
        #: Made when the relay starts watching, dropped when it stops (no reference cycle left).
        self._idle: IdleTimer | None = None
        self._control: BodyControl | None = None
        self._watching = False
        self._idled = False
        self._client_left = False
        self.complete = False
        self.bytes_relayed = 0
        # Held weakly by the canceller: no reference cycle per request.
        self.done: Deferred[None] = Deferred(functools.partial(_cancel_relay, weakref.ref(self)))

    @property
    def first_data(self) -> Deferred[None]:
        """A L{Deferred} firing once the first bytes (or the end) came, or failing with L{StreamBroken}."""
        if self.has_first_data:
            return succeed(None)
        if self._first_data is None:
            self._first_data = Deferred()
        return self._first_data

    def _first_came(self, error: Exception | None) -> None:
        """The first bytes (or the end, or a break: C{error}) came: C{first_data} fires, once."""
        if self.has_first_data or (self._first_data is not None and self._first_data.called):
            return
        if error is None:
            self.has_first_data = True
            waiting, self._first_data = self._first_data, None
            if waiting is not None:
                waiting.callback(None)
            return
        self.first_data.errback(StreamBroken(str(error)))

    #: The C{Content-Type} the client is sent in place of the backend's (L{None}: the backend's).
    content_type: bytes | None = None

    def client_length(self, backend_length: int | None) -> int | None:
        """The C{Content-Length} the client is sent: the backend's (a translated answer has its own)."""
        return backend_length

    def watch_idle(self) -> None:
        """
        Become the client's producer and start the idle timer, unless the
        body is already complete: a small answer usually arrives with its
        headers and needs neither.
        """
        if not self.done.called:
            self._watching = True
            self._request.register_producer(self)
            self._arm_idle_timer()

    # IBodyConsumer, from the backend

    def body_started(self, control: BodyControl) -> None:
        self._control = control

    def commit(self, request: IncomingRequest) -> None:
        """Start relaying to C{request}: what was held first, then the rest as it comes."""
        self._request = request
        held, self._held = self._held, ()  # nothing is held after the commit (an empty list is 56 bytes a stream)
        for data in held:
            self._pass(data)
        if self._held_end is not None:
            (error,) = self._held_end
            self._held_end = None
            self.body_ended(error)

    def body_received(self, data: bytes) -> None:
        if self._request is None:
            self._hold(data, first=True)
            return
        self._pass(data)

    def _hold(self, data: bytes, first: bool) -> None:
        """Keep C{data} until the commit; C{first}: it is the first data the commit point waits for."""
        self._held.append(data)
        self._held_size += len(data)
        if first:
            self._first_came(None)
        if self._whole is not None and self._held_size > self._whole_limit:
            whole, self._whole = self._whole, None
            whole.callback(None)

    def _pass(self, data: bytes) -> None:
        """Relay C{data} to the client."""
        self.bytes_relayed += len(data)
        self._request.write(data)
        if self._watching and self._idle is not None:
            self._idle.seen()

    def held_body(self, limit: int) -> Deferred[bytes | None]:
        """
        Before the commit: the whole body once it has ended, or L{None} when
        it is longer than C{limit} bytes or broke.  It stays held, to be
        committed or discarded.
        """
        if self._held_end is not None:
            return succeed(b"".join(self._held) if self._held_end[0] is None else None)
        if self._held_size > limit:
            return succeed(None)
        self._whole_limit = limit
        self._whole = Deferred()
        return self._whole

    def body_ended(self, error: Exception | None) -> None:
        if self._request is None:
            self._held_end = (error,)
            self._first_came(error)
            if self._whole is not None:
                whole, self._whole = self._whole, None
                whole.callback(b"".join(self._held) if error is None else None)
            return
        self._disarm_idle_timer()
        if self._watching:
            self._watching = False
            self._request.unregister_producer()
        if self.done.called:
            return
        if error is None:
            self.complete = True
            self.done.callback(None)
        elif self._client_left:
            # Not the backend's fault: the client went away mid-answer.
            self.done.errback(CancelledError())
        elif self._idled:
            self.done.errback(StreamIdle(f"no data for {self._idle_timeout:g} s"))
        else:
            self.done.errback(StreamBroken(str(error)))

    # IPushProducer, toward the client: pass flow control to the backend

    def pauseProducing(self) -> None:
        self._disarm_idle_timer()
        self._control.pauseProducing()

    def resumeProducing(self) -> None:
        self._control.resumeProducing()
        if self._watching:
            self._arm_idle_timer()

    def stopProducing(self) -> None:
        # Only the client side calls this: its connection is gone.
        self._client_left = True
        self._disarm_idle_timer()
        self._control.stopProducing()

    def _arm_idle_timer(self) -> None:
        """The idle timeout counts from now."""
        if self._idle is None:
            self._idle = IdleTimer(self._clock, self._idle_timeout, self._went_idle)
        self._idle.start()

    def _disarm_idle_timer(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.stop()

    def _went_idle(self) -> None:
        self._idle = None
        self._idled = True
        self._control.stopProducing()

    def cancel(self) -> None:
        """Stop the backend's delivery (the relay's C{done} was cancelled)."""
        self._disarm_idle_timer()
        if self._control is not None:
            self._control.stopProducing()


def _cancel_relay(relay: "weakref.ref[BodyRelay]", done: Deferred[None]) -> None:
    alive = relay()
    if alive is not None:
        alive.cancel()
