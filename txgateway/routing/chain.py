"""
The fallback chain: a call's targets tried in turn (a service, then its
C{fallback} services; or a model's targets, primary first), each with its
retries, until one answers in a way the client should see.  Before any
byte reached the client a target gives up on a gateway error (no endpoint
answered, all circuits open, timeouts), a final 429 or 5xx, and for
model calls on a refusal its speaker says another target may serve (a
401, 403, 404 or a context length exceeded); the next target is tried
while the call's deadline allows.
"""

from __future__ import annotations

from typing import Awaitable

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime

from txgateway import errors
from txgateway.errors import GatewayError
from txgateway.observability.metrics import GatewayMetrics
from txgateway.resilience.retry import RETRYABLE_STATUSES
from txgateway.routing.answer import AnswerRelay
from txgateway.routing.attempt import Answer, Attempts
from txgateway.routing.call import Call
from txgateway.routing.model import Target
from txgateway.speaking import ISpeaker

__all__ = ["FallbackChain"]

#: The most of a refusal's body read to tell what it means.
_REFUSAL_BODY_LIMIT = 64 * 1024
#: Gateway errors after which a target gives up and the next is tried.
_GIVING_UP = frozenset({errors.UPSTREAM_UNAVAILABLE, errors.CIRCUIT_OPEN, errors.UPSTREAM_TIMEOUT})


class FallbackChain:
    """
    Serves calls through their targets.

    @param clock: the time source for the deadline and the refusal's read.
    @param attempts: makes each target's attempts.
    @param answers: relays the final answer.
    @param metrics: counts fallbacks.
    """

    def __init__(self, clock: IReactorTime, attempts: Attempts, answers: AnswerRelay, metrics: GatewayMetrics) -> None:
        self._clock = clock
        self._attempts = attempts
        self._answers = answers
        self._metrics = metrics

    async def serve(self, call: Call) -> None:
        """
        Answer C{call} from the first target that answers, or raise the last
        target's L{GatewayError}.  The whole chain shares the call's deadline.
        """
        targets = call.targets
        call.deadline_at = self._clock.seconds() + targets[0].route.config.deadline
        last = len(targets) - 1
        for position, target in enumerate(targets):
            following = targets[position + 1] if position < last else None
            call.ctx.served_by = target.route.config.name
            with target.route.lease():
                try:
                    answer = await self._attempts.until_final(call, target)
                except GatewayError as error:
                    if following is None or error.kind not in _GIVING_UP or self._stops_here(call):
                        self._answering(call, target)
                        raise
                    moved_on = error.message
                else:
                    moved_on = None
                    if following is not None and not self._stops_here(call):
                        moved_on = await self._moves_on(call, target, answer)
                    if moved_on is None:
                        self._answering(call, target)
                        if answer.relay is None and call.translates_for(target):
                            # A last 5xx or 429 of the other API: translated, through the commit point.
                            await self._attempts.commit_last(call, target, answer)
                        await self._answers.relay(call, target, answer)
                        return
                    answer.drop()
            self._fall_over(call, target, following, moved_on)

    def _stops_here(self, call: Call) -> bool:
        """
        No next target: the deadline passed, or the client left (a call
        carried on for its usage after its client left tries nothing more).
        """
        return self._clock.seconds() >= call.deadline_at or call.client_gone

    def _moves_on(self, call: Call, target: Target, answer: Answer) -> Awaitable[str | None]:
        """
        Why C{answer} sends the call to the next target, or L{None} (the
        client sees it).  Not a coroutine of its own: only an OpenAI
        refusal has a body to read first.
        """
        code = answer.response.code
        if code in RETRYABLE_STATUSES:  # a final 429 or 5xx: the next target may do better
            return succeed(f"status {code}")
        if call.model_call is None or not 400 <= code < 500 or answer.relay is None:
            return succeed(None)
        speaker = call.speaker(target)
        if not speaker.refusal_body_needed(code):
            return succeed(speaker.refusal_moves_on(code, None))
        return Deferred.fromCoroutine(self._refusal_moves_on(target, speaker, answer))

    async def _refusal_moves_on(self, target: Target, speaker: ISpeaker, answer: Answer) -> str | None:
        """Whether a model backend's refusal, its body read (within C{first_byte_timeout}), sends the call on."""
        code = answer.response.code
        body = None
        try:
            read = answer.relay.held_body(_REFUSAL_BODY_LIMIT)
            if not read.called:
                read.addTimeout(target.route.config.first_byte_timeout, self._clock)
            try:
                body = await read
            except TimeoutError:
                body = None
        except BaseException:  # the client left while the refusal was read
            answer.drop()
            raise
        return speaker.refusal_moves_on(code, body)

    def _fall_over(self, call: Call, gave_up: Target, to: Target, reason: str) -> None:
        """C{gave_up} gave up before any byte reached the client: C{to} is tried next."""
        ctx = call.ctx
        ctx.fallback_from += (gave_up.label,)
        service = ctx.service or gave_up.route.config.name
        self._metrics.fallback(service, to.route.config.name, gave_up.label, to.label, reason, ctx.request_id)
        ctx.log.warning("service_fallback", service=gave_up.label, to=to.label, reason=reason)
        if ctx.span_notes is not None:
            attributes = {"txgateway.gave_up": gave_up.label, "txgateway.to": to.label, "txgateway.reason": reason}
            ctx.span_notes.event(self._clock.seconds(), "fallback", **attributes)

    def _answering(self, call: Call, target: Target) -> None:
        """C{target} gives the client its answer (or its error): the model it was sent, for the stamp and the access line."""
        ctx = call.ctx
        call.answering = target
        if ctx.completion is not None:
            ctx.completion.target_api = target.route.config.api
        if target.model is not None:
            ctx.served_model = target.model
            if ctx.completion is not None and ctx.completion.model is None:
                ctx.completion.model = target.model

