"""
The attempts of one call on one target: each one sent to an endpoint its
breaker admits, bounded by its timeout and the call's deadline, its
verdict counted on the breaker, then held at the commit point (the first
body byte, or an OpenAI stream's first token) so that until then it may
still fail and be retried; the backoff between attempts on the injected
clock, the retry budget, and the endpoints a silent one rules out.
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from txgateway import errors
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.client import UpstreamResponse, out_of_files
from txgateway.dataplane.headers import is_event_stream
from txgateway.dataplane.relay import BodyRelay, IAnswerRelay, StreamBroken
from txgateway.errors import GatewayError, describe_failure
from txgateway.observability.context import RequestContext
from txgateway.observability.metrics import GatewayMetrics
from txgateway.observability.tracing import SpanNotes
from txgateway.resilience.breaker import Admission
from txgateway.resilience.retry import (
    RETRY_AFTER_STATUSES,
    RETRYABLE_STATUSES,
    is_breaker_failure,
    may_resend_after_silence,
    parse_retry_after,
    retry_budget_allows,
)
from txgateway.routing.balance import decayed
from txgateway.routing.call import Call
from txgateway.routing.lease import InFlight
from txgateway.routing.model import Admitted, Backend, ServiceRoute, Target
from txgateway.routing.paths import join_target
from txgateway.speaking import FIRST_BYTE, FIRST_TOKEN, AnswerReading

__all__ = ["Answer", "Attempts", "circuit_open"]


@attrs.define(eq=False)
class Answer:
    """
    A backend's answer to a call, from the endpoint whose in-flight slot
    C{lease} holds (given back once the answer is relayed or dropped).

    @ivar relay: holds the body's first bytes, to be committed; L{None} for
        a retryable answer (5xx, 429) passed on as the last one.
    """

    response: UpstreamResponse
    endpoint: Backend
    admission: Admission
    lease: InFlight
    relay: IAnswerRelay | None = None

    def drop(self) -> None:
        """The client will not see this answer: stop its body and give the slot back."""
        self.lease.release()
        if self.relay is not None:
            self.relay.cancel()
        self.response.discard()


@attrs.frozen
class _Failed:
    """An attempt that got no usable answer."""

    kind: errors.ErrorKind
    reason: str


@attrs.define  # not frozen: made per attempt, and a frozen class's init costs twice as much
class _Outcome:
    """
    What one attempt came to: an C{answer} (committed when it has a relay;
    else a retryable 5xx or 429, kept in case it is the last), or a C{failure}.
    """

    answer: Answer | None = None
    failure: _Failed | None = None

    @property
    def committed(self) -> bool:
        """The answer is final: it goes to the client."""
        return self.answer is not None and self.answer.relay is not None

    @property
    def reason(self) -> str:
        """Why it is not final, for the attempt's log line."""
        return self.failure.reason if self.failure is not None else f"status {self.answer.response.code}"


@attrs.define  # not frozen: made per attempt
class _CommitPoint:
    """Where an answer becomes final: the relay holding what comes first, how long to wait, and for what."""

    relay: IAnswerRelay
    timeout: float
    waits_for: str


@attrs.define(eq=False)
class _TargetAttempts:
    """The state of one call's attempts on one target."""

    call: Call
    target: Target
    resendable: bool
    resumed: bool = False
    #: The attempts made on this target so far (its retries are its own:
    #: a fallback's are not spent by the targets before it).
    made: int = 0
    #: Endpoints this request must not be sent to again (they stayed silent).
    silent: set[Backend] = attrs.Factory(set)

    @property
    def route(self) -> ServiceRoute:
        return self.target.route

    @property
    def config(self) -> ServiceConfig:
        return self.target.route.config


#: Why a failed attempt is not retried: retries, time or the backend's
#: Retry-After say so; only silent endpoints are left; the retry budget is
#: spent; every breaker is open.
_FINAL, _SILENT_LEFT, _BUDGET_SPENT, _ALL_OPEN = "final", "silent", "budget", "circuit_open"


class Attempts:
    """
    Makes the attempts of calls on their targets.

    @param clock: the time source for timeouts and backoff.
    @param metrics: where attempts, retries and tokens are counted.
    @param rng: the randomness behind retry jitter.
    """

    def __init__(self, clock: IReactorTime, metrics: GatewayMetrics, rng: random.Random) -> None:
        self._clock = clock
        self._metrics = metrics
        self._rng = rng

    async def until_final(self, call: Call, target: Target) -> Answer:
        """
        Try C{target}'s endpoints until an answer is final, the retries are
        spent, the deadline passes, the retry budget says no, or no
        endpoint's breaker admits (then L{GatewayError}).  A retry goes to
        another endpoint than the one that just failed while another
        admits; a request that may not be sent again to a silent endpoint
        (C{retry_timeouts}) never is.
        """
        config = target.route.config
        method = call.request.method
        state = _TargetAttempts(call, target, may_resend_after_silence(config.retry_timeouts, method, call.idempotency_key))
        failed_on: Backend | None = None
        retrying: InFlight | None = None
        try:
            notes = call.ctx.span_notes
            while True:
                admitted = target.route.choose(call.ctx.request_id, failed_on, state.silent)
                if admitted is None:
                    raise self._circuit_open(call.ctx, config.name, target.route.retry_after())
                if notes is None:
                    outcome = await self.once(state, admitted, call.deadline_at)
                else:
                    outcome = await self._traced_once(state, admitted, call.deadline_at, notes)
                if outcome.committed:
                    return outcome.answer
                failed_on = admitted.endpoint
                delay = self._delay_before_retry(outcome, target.route, state.made)
                stop = self._why_no_retry(state, delay, retrying is not None)
                if call.client_gone:
                    stop = _FINAL  # a call carried on for its usage after its client left: no retry
                self._log_attempt(call.ctx, config.name, outcome.reason, final=stop is not None, delay=delay)
                if stop in (_FINAL, _SILENT_LEFT, _BUDGET_SPENT):
                    if outcome.failure is not None:
                        raise GatewayError(outcome.failure.kind, f"service {config.name!r}: {outcome.failure.reason}")
                    return outcome.answer  # the last answer, as it is
                if outcome.answer is not None:
                    outcome.answer.drop()
                if stop == _ALL_OPEN:
                    raise self._circuit_open(call.ctx, config.name, target.route.retry_after())
                if notes is not None:
                    notes.attempts[-1].retry_delay = delay
                if retrying is None:
                    retrying = target.route.retrying_lease()
                self._metrics.retries.labels(config.name).inc()
                await deferLater(self._clock, delay)
        finally:
            if retrying is not None:
                retrying.release()

    async def commit_last(self, call: Call, target: Target, answer: Answer) -> None:
        """
        Take a last retryable answer (a 5xx or 429 kept without a relay)
        through its commit point after all, as the client gets it
        translated: its body whole, within C{first_byte_timeout}.  When the
        body fails, the answer is dropped and L{GatewayError} says so
        (nothing reached the client yet).
        """
        state = _TargetAttempts(call, target, resendable=False)
        commit = self._commit_point(state, answer.response)
        error = await self._first_bytes(answer.response, commit)
        if error is None:
            answer.relay = commit.relay
            return
        answer.drop()
        if call.client_gone or isinstance(error, CancelledError):
            raise CancelledError() from None
        code, name = answer.response.code, target.route.config.name
        raise GatewayError(errors.UPSTREAM_UNAVAILABLE, f"service {name!r}: answered {code}, then its body failed: {error}")

    async def resume_once(self, call: Call, target: Target, admitted: Admitted) -> _Outcome:
        """One attempt for the rest of a broken stream: no retry, no deadline but its own timeouts."""
        state = _TargetAttempts(call, target, resendable=False, resumed=True)
        notes = call.ctx.span_notes
        if notes is None:
            return await self.once(state, admitted, math.inf)
        return await self._traced_once(state, admitted, math.inf, notes)

    async def _traced_once(self, state: _TargetAttempts, admitted: Admitted, deadline_at: float, notes: SpanNotes) -> _Outcome:
        """L{once}, as a span of its own: the backend is sent that span as its parent."""
        endpoint = admitted.endpoint
        span = notes.attempt(
            self._clock.seconds(), state.config.name, endpoint.url, state.target.model, state.resumed, state.config.api
        )
        try:
            outcome = await self.once(state, admitted, deadline_at, span.span_id)
        except CancelledError:
            span.end(self._clock.seconds(), "abandoned")
            raise
        except GatewayError as error:
            span.end(self._clock.seconds(), error.kind.type)
            raise
        now = self._clock.seconds()
        code = outcome.answer.response.code if outcome.answer is not None else None
        if outcome.committed:
            span.status_code = code  # it ends with the answer's relay
            notes.committed(now, span, "first token" if outcome.answer.relay.resumable else "first byte")
        elif outcome.failure is not None:
            span.end(now, outcome.failure.kind.type)
        else:
            span.end(now, "answered", code)
        return outcome

    async def once(self, state: _TargetAttempts, admitted: Admitted, deadline_at: float, span_id: str | None = None) -> _Outcome:
        """
        One attempt on the admitted endpoint: send, wait for the headers (within the
        attempt's timeout and the deadline), count the verdict on its
        breaker, then wait for the commit point.  Raises L{CancelledError}
        when the client left and L{GatewayError} when the deadline passed.
        C{span_id} is the attempt's span, when it has one of its own.
        """
        call, config = state.call, state.config
        endpoint, admission = admitted.endpoint, admitted.admission
        ctx = call.ctx
        ctx.attempts += 1  # the request's report: X-Gateway-Attempts, the access line
        state.made += 1
        timeout = min(config.timeout, deadline_at - self._clock.seconds())
        upstream = endpoint.upstream
        target = join_target(upstream.base_path, call.path_for(state.target, upstream.base_path))
        body = call.body_for(state.target, prefill=call.transcript.text if state.resumed else None)
        sending = upstream.request(call.request.method, target, call.headers_for(config, state.target, span_id), body)
        sending.addTimeout(timeout, self._clock, onTimeoutCancel=_timed_out)
        sent_at = self._clock.seconds()
        lease = endpoint.lease()
        try:
            response = await sending
        except Exception as error:
            lease.release()
            return self._not_answered(state, endpoint, admission, error, timeout)
        took = self._clock.seconds() - sent_at
        endpoint.ttfb = decayed(endpoint.ttfb, took)
        self._metrics.observe_upstream_time(config.name, endpoint.url, took)
        if is_breaker_failure(response.code):
            endpoint.breaker.failed(admission, f"status {response.code}")
            self._count_attempt(config.name, endpoint, "http_5xx")
        else:
            # 429 included: the backend's limit is no failure of it.
            endpoint.breaker.succeeded(admission)
            self._count_attempt(config.name, endpoint, "answered")
        answer = Answer(response, endpoint, admission, lease)
        if response.code in RETRYABLE_STATUSES:
            return _Outcome(answer=answer)
        commit = self._commit_point(state, response)
        error = await self._first_bytes(response, commit)
        if error is None:
            answer.relay = commit.relay
            return _Outcome(answer=answer)
        lease.release()
        if state.call.client_gone or isinstance(error, CancelledError):
            raise CancelledError() from None
        # Its headers were a success for the breaker; the missing body is a
        # failure all the same.
        waited = f"no {commit.waits_for} within {commit.timeout:g} s"
        return _Outcome(failure=self._attempt_failed(state, endpoint, admission, error, waited))

    def _not_answered(
        self, state: _TargetAttempts, endpoint: Backend, admission: Admission, error: Exception, timeout: float
    ) -> _Outcome:
        """An attempt that got no headers: the client left, the deadline passed, or a failure of the backend."""
        config, ctx = state.config, state.call.ctx
        if state.call.client_gone or isinstance(error, CancelledError):
            self._count_attempt(config.name, endpoint, "abandoned")
            # The client left: whatever the upstream reports of its
            # cancellation, it is no failure of the backend and nothing to retry.
            endpoint.breaker.abandoned(admission)
            raise CancelledError() from None
        if out_of_files(error):
            # The gateway's own open files are all taken: no failure of the backend (its breaker
            # does not count it), and nothing a retry on another backend would mend.
            endpoint.breaker.abandoned(admission)
            self._count_attempt(config.name, endpoint, "abandoned")
            self._log_attempt(ctx, config.name, "no file descriptor left for a backend connection", final=True)
            raise GatewayError(
                errors.GATEWAY_BUSY, "the gateway has no file descriptor left for a backend connection; retry shortly",
            ) from None
        if isinstance(error, TimeoutError) and timeout < config.timeout:
            endpoint.breaker.failed(admission, "the deadline passed")
            self._count_attempt(config.name, endpoint, "timeout")
            self._log_attempt(ctx, config.name, "the deadline passed", final=True)
            raise GatewayError(errors.UPSTREAM_TIMEOUT, f"service {config.name!r}: the deadline passed") from None
        return _Outcome(failure=self._attempt_failed(state, endpoint, admission, error, f"no answer within {timeout:g} s"))

    def _commit_point(self, state: _TargetAttempts, response: UpstreamResponse) -> _CommitPoint:
        """
        The commit point of C{response}: a completion stream's first token
        (within C{first_token_timeout}), else the first byte; a successful
        OpenAI JSON answer has its usage read as it passes.
        """
        config, call = state.config, state.call
        if call.model_call is not None:
            sent_as = state.target.model or call.model_call.model
            transcript = call.transcript
            counted = _AnswerCount(self._metrics, call.ctx, config.name, sent_as)
            reading = AnswerReading(
                self._clock, config.idle_timeout, transcript, state.resumed, call.completion_reserved,
                # A stream reports usage as it goes (one answer's reports merged); a JSON answer once, read whole.
                counted.reported if transcript is not None else _no_usage,
                counted.answered,
            )
            event_stream = transcript is not None and is_event_stream(response)  # only a streamed call's answer streams
            made = call.speaker(state.target).answer_relay(response.code, event_stream, reading)
            if made is not None:
                relay, waits_for = made
                timeout = config.token_timeout if waits_for == FIRST_TOKEN else config.first_byte_timeout
                return _CommitPoint(relay, timeout, waits_for)
        return _CommitPoint(BodyRelay(None, self._clock, config.idle_timeout), config.first_byte_timeout, FIRST_BYTE)

    async def _first_bytes(self, response: UpstreamResponse, commit: _CommitPoint) -> Exception | None:
        """
        Wait at the commit point: nothing reaches the client before the
        answer's first body byte (or its end; the relay may wait for more,
        such as a first token).  Returns why it failed, or L{None}.
        """
        relay = commit.relay
        response.deliver_body(relay)
        if relay.has_first_data:
            return None  # it came with the headers: most answers, no waiting
        if not relay.first_data.called:
            relay.first_data.addTimeout(commit.timeout, self._clock)
        try:
            await relay.first_data
        except Exception as error:
            relay.cancel()
            return error
        return None

    def _attempt_failed(
        self, state: _TargetAttempts, endpoint: Backend, admission: Admission, error: Exception, silence: str
    ) -> _Failed:
        """
        An attempt that got no usable answer: a silent backend (C{silence}
        says for how long), a connection failure, or an answer that broke
        before its first byte.  Counts it against the endpoint's breaker,
        and keeps a silent endpoint from getting the request again unless
        it may be resent.
        """
        if isinstance(error, TimeoutError):
            failed, counted = _Failed(errors.UPSTREAM_TIMEOUT, silence), "timeout"
            if not state.resendable:
                state.silent.add(endpoint)
        elif isinstance(error, StreamBroken):
            failed = _Failed(errors.UPSTREAM_UNAVAILABLE, f"the answer broke before its first byte: {error}")
            counted = "connection_error"
        else:
            failed, counted = _Failed(errors.UPSTREAM_UNAVAILABLE, describe_failure(error)), "connection_error"
        endpoint.breaker.failed(admission, failed.reason)
        self._count_attempt(state.config.name, endpoint, counted)
        return failed

    def _why_no_retry(self, state: _TargetAttempts, delay: float | None, retrying: bool) -> str | None:
        """
        Why a failed attempt (or a retryable answer) is not followed by
        another after C{delay}, or L{None}: it is.
        """
        route, config, ctx = state.route, state.config, state.call.ctx
        stop = None
        if delay is None or not route.policy.attempts_left(state.made) or self._clock.seconds() + delay >= state.call.deadline_at:
            stop = _FINAL
        elif not route.any_may_admit(state.silent):
            # Nowhere left to go: every breaker is open, or the only endpoints
            # left are silent ones this request must not be sent to again
            # (then it ends with its 504 at once).
            stop = _SILENT_LEFT if route.any_may_admit() else _ALL_OPEN
        elif not retry_budget_allows(route.retrying - retrying, route.in_flight, config.retry_budget, config.retry_budget_min):
            stop = _BUDGET_SPENT
            self._metrics.retry_budget_exhausted.labels(config.name).inc()
            ctx.log.warning("retry_budget_exhausted", service=config.name, retrying=route.retrying, in_flight=route.in_flight)
        return stop

    def _delay_before_retry(self, outcome: _Outcome, route: ServiceRoute, attempts: int) -> float | None:
        """
        The backoff before the next attempt, or L{None} when the backend's own
        C{Retry-After} asks for longer than C{retry_max_delay}.
        """
        answer = outcome.answer
        policy = route.policy
        if answer is not None and answer.response.code in RETRY_AFTER_STATUSES:
            asked = parse_retry_after(answer.response.header(b"retry-after"), self._clock.seconds())
            if asked is not None:
                return asked if asked <= policy.max_delay else None
        return policy.delay_before_retry(attempts - 1, self._rng)

    def _count_attempt(self, service: str, endpoint: Backend, outcome: str) -> None:
        self._metrics.observe_attempt(service, endpoint.url, outcome)

    def _log_attempt(self, ctx: RequestContext, service: str, reason: str, final: bool, delay: float | None = None) -> None:
        retry = {} if final else {"retry_in_s": round(delay, 3)}
        ctx.log.warning("attempt_failed", service=service, attempt=ctx.attempts, reason=reason, retry=not final, **retry)

    def _circuit_open(self, ctx: RequestContext, service: str, retry_after: int) -> GatewayError:
        """The refusal when no endpoint of C{service} admits an attempt, noted on the request's span."""
        if ctx.span_notes is not None:
            ctx.span_notes.event(self._clock.seconds(), "circuit_open", **{"txgateway.service": service})
        return circuit_open(service, retry_after)


class _AnswerCount:
    """
    One backend answer's usage (of the model sent as C{sent_as}), counted
    as the answer tells it: on the access line, in the token counts,
    billed.  One object per answer, whose two bound methods its relay
    holds (not two partials of the attempts' methods: a stream holds them
    as long as it lasts).
    """

    __slots__ = ("_metrics", "_ctx", "_service", "_sent_as", "_place", "_usage")

    def __init__(self, metrics: GatewayMetrics, ctx: RequestContext, service: str, sent_as: str | None) -> None:
        self._metrics = metrics
        self._ctx = ctx
        self._service = service
        self._sent_as = sent_as
        #: Its place on the call's bill, and its usage so far (L{None}: none reported yet).
        self._place = 0
        self._usage: Any = None

    def reported(self, usage: Any) -> None:
        """
        A usage report of the answer.  A later report replaces an earlier
        one, each count the most either says, so that an answer reporting
        its running total on every chunk is counted once.
        """
        facts = self._ctx.completion  # made with the call: usage is read of model calls only
        before = self._usage
        if before is None:
            self._place = len(facts.billed)
            facts.billed += ((self._sent_as, usage),)
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        else:
            usage = before.merged(usage)
            place = self._place
            facts.billed = (*facts.billed[:place], (self._sent_as, usage), *facts.billed[place + 1:])
            prompt = usage.prompt_tokens - before.prompt_tokens
            completion = usage.completion_tokens - before.completion_tokens
        self._usage = usage
        model = usage.model or facts.model or facts.requested_model or "unknown"
        facts.model = model
        facts.prompt_tokens = (facts.prompt_tokens or 0) + prompt
        facts.completion_tokens = (facts.completion_tokens or 0) + completion
        if prompt:
            self._metrics.count_tokens(self._service, model, "prompt", prompt)
        if completion:
            self._metrics.count_tokens(self._service, model, "completion", completion)

    def answered(self, facts: Any) -> None:
        """What a JSON answer said of itself: its usage counted, its id and finish reasons kept."""
        if facts.usage is not None:
            self.reported(facts.usage)
        completion = self._ctx.completion
        completion.response_id = facts.response_id
        completion.finish_reasons = facts.finish_reasons


def _no_usage(usage: Any) -> None:
    """A JSON answer's usage is read with its other facts (L{_AnswerCount.answered}), not reported alone."""


def circuit_open(service: str, retry_after: int) -> GatewayError:
    """The refusal when no endpoint of C{service} admits an attempt."""
    return GatewayError(
        errors.CIRCUIT_OPEN,
        f"service {service!r} is failing; the circuit is open, retry in {retry_after} s",
        headers=((b"Retry-After", b"%d" % retry_after),),
    )


def _timed_out(result: object, timeout: float) -> None:
    # Whatever the agent's cancellation failed with, the cause was the timeout.
    raise TimeoutError(timeout, "attempt")
