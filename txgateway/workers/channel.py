"""
The supervisor's and the workers' one conversation: calls and notices as
JSON messages in length-prefixed frames over a UNIX socket.

Either side may call the other: C{call(name, args)} returns a L{Deferred}
of the answer; C{notify(name, args)} expects none.  A call the other side
cannot answer fails with L{RemoteCallError}; every call in flight fails
with L{ChannelClosed} when the connection goes.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

__all__ = ["CallChannel", "ChannelClosed", "RemoteCallError"]

#: The largest message either side accepts (a status document of many services fits easily).
MAX_MESSAGE = 64 * 1024 * 1024


class RemoteCallError(Exception):
    """The other side could not answer a call: its handler failed, or it has none of that name."""


class ChannelClosed(Exception):
    """The connection went while a call waited for its answer."""


class CallChannel(Int32StringReceiver):
    """
    One end of the conversation.

    @param handlers: name -> callable(args) returning an answer or a
        L{Deferred} of one (JSON-able), for the other side's calls and notices.
    @param on_made: called with this channel once its connection is made.
    @param on_lost: called with this channel once its connection is gone.
    """

    MAX_LENGTH = MAX_MESSAGE

    def __init__(
        self,
        handlers: dict[str, Callable[[Any], Any]],
        on_made: Callable[["CallChannel"], None] | None = None,
        on_lost: Callable[["CallChannel"], None] | None = None,
    ) -> None:
        self.handlers = handlers
        self._on_made = on_made
        self._on_lost = on_lost
        self._next_id = 0
        self._waiting: dict[int, Deferred] = {}
        self.closed = False

    def connectionMade(self) -> None:
        if self._on_made is not None:
            self._on_made(self)

    def call(self, name: str, args: Any = None) -> Deferred:
        """Ask the other side; a L{Deferred} of its answer."""
        if self.closed:
            return fail(ChannelClosed("the channel is closed"))
        self._next_id += 1
        answer: Deferred = Deferred()
        self._waiting[self._next_id] = answer
        self._send({"id": self._next_id, "call": name, "args": args})
        return answer

    def notify(self, name: str, args: Any = None) -> None:
        """Tell the other side, expecting no answer (dropped if the connection is gone)."""
        if not self.closed:
            self._send({"call": name, "args": args})

    def _send(self, message: dict) -> None:
        self.sendString(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def stringReceived(self, data: bytes) -> None:
        message = json.loads(data)
        if "call" in message:
            self._answer(message)
            return
        waiting = self._waiting.pop(message["id"], None)
        if waiting is None or waiting.called:
            return  # the caller gave up waiting (a timeout)
        if "error" in message:
            waiting.errback(RemoteCallError(message["error"]))
        else:
            waiting.callback(message.get("result"))

    def _answer(self, message: dict) -> None:
        call_id = message.get("id")
        handler = self.handlers.get(message["call"])
        if handler is None:
            answered: Deferred = Deferred()
            answered.errback(RemoteCallError(f"no such call: {message['call']}"))
        else:
            answered = maybeDeferred(handler, message.get("args"))
        if call_id is None:
            answered.addErrback(lambda failure: None)
            return

        def reply(result: Any) -> None:
            if not self.closed:
                self._send({"id": call_id, "result": result})

        def refuse(failure: Failure) -> None:
            if not self.closed:
                self._send({"id": call_id, "error": f"{failure.type.__name__}: {failure.getErrorMessage()}"})

        answered.addCallbacks(reply, refuse)

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            answer.errback(ChannelClosed("the channel closed before the answer came"))
        if self._on_lost is not None:
            self._on_lost(self)
