"""
The relay of a final answer to the client: its status and headers (with
the gateway's own, stamped once), then its body as it arrives, the part
held at the commit point first.  An answer that breaks after bytes went
out ends the connection without its end (and, for an event stream, with
one C{event: error}); a completion stream that breaks is first offered to
L{txgateway.routing.resume}.
"""

from __future__ import annotations

from typing import Awaitable, NoReturn

from twisted.internet.interfaces import IReactorTime

from txgateway import errors
from txgateway.dataplane.client import UpstreamResponse
from txgateway.dataplane.headers import is_event_stream, response_headers_for_client
from txgateway.dataplane.relay import BodyRelay, IAnswerRelay, StreamBroken, StreamIdle
from txgateway.errors import error_body
from txgateway.routing.attempt import Answer
from txgateway.routing.call import Call
from txgateway.routing.model import Target
from txgateway.routing.resume import StreamResume

__all__ = ["AnswerCutShort", "AnswerRelay"]


class AnswerCutShort(Exception):
    """
    The answer was partly sent and then ended without its end; the client
    connection is closing.  Nothing more may be written to the request.
    """


class AnswerRelay:
    """
    Relays final answers to their clients.

    @param clock: the time source for the stamp and the idle timers.
    @param resume: continues completion streams that break.
    """

    def __init__(self, clock: IReactorTime, resume: StreamResume) -> None:
        self._clock = clock
        self._resume = resume

    def relay(self, call: Call, target: Target, answer: Answer) -> Awaitable[None]:
        """
        Relay C{answer} to C{call}'s client; its in-flight slot is given
        back at the end, whatever happens.  (Not a coroutine of its own: it
        picks the relay by what the held relay says it is.)
        """
        relay = answer.relay
        if relay is not None and relay.resumable:
            return self._relay_stream(call, target, answer, relay)
        return self._relay(call, target, answer, relay)

    def _start(
        self, call: Call, target: Target, response: UpstreamResponse, relay: IAnswerRelay | None, chunked: bool = False
    ) -> None:
        call.ctx.stamp(call.request, self._clock.seconds())
        headers = response_headers_for_client(response)
        if call.model_call is not None:
            told = call.speaker(target).answer_headers
            if told:
                headers.extend(told)
        length = None if chunked else response.length
        if relay is not None:
            length = None if chunked else relay.client_length(length)
            if relay.content_type is not None:
                headers = [(name, value) for name, value in headers if name.lower() != b"content-type"]
                headers.append((b"Content-Type", relay.content_type))
        call.request.start(response.code, response.reason, headers, length)
        response.head_relayed()
        call.answer_started()

    async def _relay(self, call: Call, target: Target, answer: Answer, held: IAnswerRelay | None) -> None:
        """Stream the backend's answer to the client as it arrives (the held part first)."""
        request, response = call.request, answer.response
        with answer.lease:
            self._start(call, target, response, held)
            if held is None:
                relay = BodyRelay(request, self._clock, target.route.config.idle_timeout)
                response.deliver_body(relay)
            else:
                relay = held
                relay.commit(request)
            if relay.done.called and relay.complete:
                return  # the whole body came with the headers (most small answers)
            if response.length is None:
                # A stream: send the status and headers now, so that a client
                # waiting on a slow first token knows the backend answered.
                request.send_head()
            relay.watch_idle()
            try:
                await relay.done
            except (StreamIdle, StreamBroken) as error:
                # Bytes already reached the client: no retry, no error body.
                answer.endpoint.breaker.failed(answer.admission, f"stream: {error}")
                self.cut_short(call, target, response, error, relay.bytes_relayed)

    async def _relay_stream(self, call: Call, target: Target, first: Answer, relay: IAnswerRelay) -> None:
        """
        Relay a completion stream committed at its first token.  When it
        breaks or stalls before its end, the resume is asked to go on from
        the text sent so far, and its stream is relayed as more of the same
        answer; when none can, the stream ends with the SSE error event of
        the I{original} break.
        """
        request = call.request
        answer = first
        try:
            # Chunked whatever the backend said: events may be left out or renamed.
            self._start(call, target, first.response, None, chunked=True)
            relay.commit(request)
            if relay.done.called and relay.complete:
                return
            request.send_head()
            original: Exception | None = None
            while True:
                relay.watch_idle()
                try:
                    await relay.done
                    return
                except (StreamIdle, StreamBroken) as error:
                    answer.endpoint.breaker.failed(answer.admission, f"stream: {error}")
                    answer.lease.release()  # that endpoint's stream is over
                    original = original or error
                    if call.ctx.span_notes is not None:
                        call.ctx.span_notes.broke(self._clock.seconds(), str(error))
                    call.ctx.log.warning(
                        "stream_broke", service=target.route.config.name, model=target.model, reason=str(error),
                        text_chars=call.transcript.text_chars,
                    )
                    resumed = await self._resume.resumed(call, target, answer.endpoint)
                    if resumed is None:
                        self.cut_short(call, target, first.response, original, request.bytes_sent)
                    target, answer = resumed.target, resumed.answer
                    relay = answer.relay
                    relay.commit(request)
        finally:
            answer.lease.release()
            facts = call.ctx.completion
            if facts is not None:
                facts.response_id = call.transcript.chunk_id
                facts.finish_reasons = call.transcript.finish_reasons

    def cut_short(
        self, call: Call, target: Target, response: UpstreamResponse, error: Exception, relayed: int
    ) -> NoReturn:
        """
        End an answer that broke after its first bytes went out: the
        connection is closed without the end of the answer, so the client
        sees a truncated body, never a complete-looking one.
        """
        ctx, request = call.ctx, call.request
        kind = errors.STREAM_IDLE if isinstance(error, StreamIdle) else errors.STREAM_BROKEN
        ctx.outcome = kind.type
        ctx.log.warning("stream_failed", service=target.route.config.name, reason=str(error), bytes_relayed=relayed)
        if is_event_stream(response):
            # One complete SSE event that says what happened (an SDK raises
            # it as an error), then the connection closes without the end.
            if call.model_call is not None:
                request.write(call.speaker(target).broken_event(kind, str(error), ctx.request_id))
            else:
                request.write(b"event: error\ndata: " + error_body(kind, str(error), ctx.request_id) + b"\n\n")
        request.abort()
        raise AnswerCutShort(ctx.outcome)
