"""
The resume of a completion stream that broke after its commit point:
the targets with C{resume = prefill} (the one that broke first, on the
same endpoint when its breaker admits) are asked in turn to go on from
the text the client has been sent, and the first whose stream gives a
token continues the answer.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from txgateway.observability.context import RequestContext
from txgateway.observability.metrics import GatewayMetrics
from txgateway.routing.attempt import Answer, Attempts
from txgateway.routing.call import Call
from txgateway.routing.model import Admitted, Backend, Target

__all__ = ["MAX_RESUMES", "Resumed", "StreamResume"]

#: The most times one answer's stream is resumed.
MAX_RESUMES = 5


@attrs.frozen
class Resumed:
    """A stream that goes on: the target it came from and its answer (holding its first token)."""

    target: Target
    answer: Answer


class StreamResume:
    """
    Continues broken completion streams.

    @param clock: the time of the events it notes on a traced request.
    @param attempts: makes the one attempt each candidate gets.
    @param metrics: counts resumes (resumed, failed).
    """

    def __init__(self, clock: IReactorTime, attempts: Attempts, metrics: GatewayMetrics) -> None:
        self._clock = clock
        self._attempts = attempts
        self._metrics = metrics

    async def resumed(self, call: Call, broke_on: Target, broke_endpoint: Backend) -> Resumed | None:
        """
        The stream that continues C{call}'s answer, or L{None} when it may
        not be continued (a tool call, too many resumes) or no target can.
        """
        facts = call.ctx.completion
        if not call.transcript.resumable or facts is None or call.resumes >= MAX_RESUMES:
            return None
        candidates = [broke_on, *(target for target in call.targets if target is not broke_on)]
        broken_api = call.speaker(broke_on).target_api
        for target in candidates:
            # Only a target spoken to in the API that broke continues its
            # stream (the client's events so far were written from that
            # API's), and only one whose API goes on from a prefill.
            speaker = call.speaker(target)
            if target.route.config.resume != "prefill" or speaker.target_api != broken_api or not speaker.takes_prefill:
                continue
            answer = await self._try(call, target, broke_on, broke_endpoint)
            if answer is not None:
                call.resumes += 1
                facts.resumed = call.resumes  # the report
                facts.resumed_on += (target.label,)
                return Resumed(target, answer)
        return None

    async def _try(self, call: Call, target: Target, broke_on: Target, broke_endpoint: Backend) -> Answer | None:
        """One candidate: its stream holding a first token, or L{None} (refused, failed, nowhere admitted)."""
        ctx, route, config = call.ctx, target.route, target.route.config
        admitted = None
        if target is broke_on:
            admission = broke_endpoint.breaker.admit(ctx.request_id)
            admitted = Admitted(broke_endpoint, admission) if admission.allowed else None
        if admitted is None:
            admitted = route.choose(ctx.request_id, broke_endpoint)
        if admitted is None:
            self._note(ctx, "circuit_open", **{"txgateway.service": config.name})
            return None
        outcome = await self._attempts.resume_once(call, target, admitted)
        refused = None
        if outcome.failure is not None:
            refused = outcome.failure.reason
        elif outcome.answer.relay is None or not outcome.answer.relay.resumable:
            # A refusal (a backend that takes no assistant prefill says 400),
            # or an answer that is no stream.
            refused = f"status {outcome.answer.response.code}"
            outcome.answer.drop()
        self._metrics.stream_resumes.labels(config.name, "failed" if refused else "resumed").inc()
        if refused is not None:
            ctx.log.warning("resume_failed", service=config.name, model=target.model, reason=refused)
            self._note(ctx, "resume_failed", **{"txgateway.service": config.name, "txgateway.reason": refused})
            return None
        ctx.log.info("stream_resumed", service=config.name, model=target.model, endpoint=admitted.endpoint.url)
        self._note(ctx, "stream_resumed", **{"txgateway.service": config.name, "txgateway.text_chars": call.transcript.text_chars})
        return outcome.answer

    def _note(self, ctx: RequestContext, name: str, **attributes: object) -> None:
        """An event of the request's span, when it has one."""
        if ctx.span_notes is not None:
            ctx.span_notes.event(self._clock.seconds(), name, **attributes)
