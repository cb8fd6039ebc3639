"""
One request's journey to a backend: the rate limit, the breaker, the
attempts with their timeouts, the backoff between them on the injected
clock, and the relay of the answer.
"""

from __future__ import annotations

import functools
import math
import random
from typing import TYPE_CHECKING, AbstractSet, Awaitable, Callable, Mapping, NoReturn

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from txgateway import errors
from txgateway.routing.balance import Balancer, decayed
from txgateway.resilience.breaker import OPEN, Admission, CircuitBreaker

if TYPE_CHECKING:
    from txgateway.cache.responses import ResponseCache
    from txgateway.routing.deployments import ModelTable
from txgateway.dataplane.client import IUpstream, UpstreamResponse
from txgateway.config.gateway import ServiceConfig
from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.errors import GatewayError, error_body
from txgateway.observability.metrics import GatewayMetrics
from txgateway.openai.relays import EventStreamRelay, JsonAnswerRelay, Transcript
from txgateway.openai.wire import (
    NEXT_TARGET,
    REFUSAL_BODY_LIMIT,
    BadCall,
    OpenAICall,
    Usage,
    after_refusal,
    error_codes,
)
from txgateway.routing.paths import UnsafePath, checked_rest, join_target
from txgateway.ratelimit.bucket import Decision
from txgateway.ratelimit.limiter import RateLimiter
from txgateway.resilience.retry import (
    RETRY_AFTER_STATUSES,
    RETRYABLE_STATUSES,
    RetryPolicy,
    is_breaker_failure,
    may_resend_after_silence,
    parse_retry_after,
    retry_budget_allows,
)
from txgateway.dataplane.server import IncomingRequest
from txgateway.dataplane.headers import request_headers_for_upstream, response_headers_for_client
from txgateway.dataplane.relay import BodyRelay, StreamBroken, StreamIdle

from txgateway.routing.model import Endpoint, ServiceRoute, Target

__all__ = ["AnswerCutShort", "ServiceBroker"]

class AnswerCutShort(Exception):
    """
    The answer was partly sent and then ended without its end; the client
    connection is closing.  Nothing more may be written to the request.
    """


@attrs.frozen
class _Failed:
    """An attempt that got no usable answer."""

    kind: errors.ErrorKind
    reason: str


@attrs.frozen
class _Outcome:
    """
    What one attempt came to: a committed answer (C{response} and the
    C{relay} holding its first bytes), a retryable answer (C{response}
    alone: 5xx or 429, kept in case it is the last), or a C{failure}.
    """

    response: UpstreamResponse | None = None
    relay: BodyRelay | None = None
    failure: _Failed | None = None

    @property
    def committed(self) -> bool:
        """The answer is final: it goes to the client."""
        return self.relay is not None

    @property
    def reason(self) -> str:
        """Why it is not final, for the attempt's log line."""
        return self.failure.reason if self.failure is not None else f"status {self.response.code}"


#: Why a failed attempt is not retried: retries, time or the backend's
#: Retry-After say so; only silent endpoints are left; the retry budget is
#: spent; every breaker is open.
_FINAL, _SILENT_LEFT, _BUDGET_SPENT, _ALL_OPEN = "final", "silent", "budget", "circuit_open"


def _rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    return [
        (b"RateLimit-Limit", b"%d" % decision.limit),
        (b"RateLimit-Remaining", b"%d" % decision.remaining),
        (b"RateLimit-Reset", b"%d" % decision.reset),
    ]


class ServiceBroker:
    """
    Sends requests to the services' backends and relays their answers.

    @param clock: the time source for timeouts, backoff and idle timers.
    @param routes: the services by name.
    @param limiter: the rate limiter, or L{None} for none.
    @param metrics: where attempts, retries and limits are counted.
    @param rng: the randomness behind retry jitter.
    @param models: the models' deployments.
    @param cache: the response cache, when a service caches.
    """

    def __init__(
        self,
        clock: IReactorTime,
        routes: Mapping[str, ServiceRoute],
        limiter: RateLimiter | None,
        metrics: GatewayMetrics,
        rng: random.Random | None,
        models: "ModelTable",
        cache: "ResponseCache | None",
    ) -> None:
        self._clock = clock
        self.routes = dict(routes)
        #: Each service's targets: itself, then its fallbacks (made once, not per request).
        self._chains = {
            name: [Target(serving) for serving in (route, *(self.routes[f] for f in route.config.fallback if f in self.routes))]
            for name, route in self.routes.items()
        }
        #: The C{[model:NAME]} sections' targets.
        self.models = models
        self.cache = cache
        self._limiter = limiter
        self._metrics = metrics
        self._rng = rng or random.Random()

    async def proxy(self, request: IncomingRequest, ctx: RequestContext, route: ServiceRoute, rest: bytes, query: bytes) -> None:
        """
        Answer C{request} from its service's backend (or its fallbacks'):
        write the status, headers and streamed body, or raise
        L{GatewayError} (nothing was written yet) or L{AnswerCutShort} (the
        answer broke midway).
        """
        checked = _checked(rest, query)
        await self._admit(request, ctx, route.config)
        call = None
        if route.config.speaks_openai and request.method == b"POST":
            try:
                call = OpenAICall.parse(request.body, rest)
            except BadCall:
                pass  # not a body the gateway reads: relayed as it is
            else:
                ctx.completion = CompletionFacts(requested_model=call.model)
        await self._served(request, ctx, checked, checked, self._chains[route.config.name], call)

    async def proxy_model(
        self, request: IncomingRequest, ctx: RequestContext, call: OpenAICall, targets: list["Target"], rest: bytes, query: bytes
    ) -> None:
        """
        Answer an OpenAI request from its model's targets in order (the
        first is the primary), each sent the body with its own model name.
        """
        checked = _checked(rest, query)
        await self._admit(request, ctx, targets[0].route.config)
        await self._served(request, ctx, checked, b"/v1" + checked, targets, call)

    def _served(
        self,
        request: IncomingRequest,
        ctx: RequestContext,
        checked: bytes,
        cached_as: bytes,
        targets: list["Target"],
        call: OpenAICall | None,
    ) -> Awaitable[None]:
        """
        Serving through the targets, or through the response cache when the
        first target's service caches (C{cached_as}: the target path its key
        names).  Not a coroutine of its own: no extra frame per request.
        """
        config = targets[0].route.config
        if self.cache is None or config.cache == "off":
            return self._serve(request, ctx, checked, targets, call)
        # The cache answers, or sends the request on through _serve.
        served = functools.partial(self._serve, request, ctx, checked, targets, call)
        return self.cache.serve(request, ctx, config, cached_as, served)

    async def _admit(self, request: IncomingRequest, ctx: RequestContext, config: ServiceConfig) -> None:
        """The rate limit: its headers on the answer, or L{GatewayError} when it says no."""
        if self._limiter is None:
            return
        caller = ctx.caller.name if ctx.caller is not None else None
        decision = await self._limiter.take(request, ctx.client, config, caller)
        for name, value in _rate_limit_headers(decision):
            request.set_header(name, value)
        if not decision.allowed:
            self._metrics.rate_limited.labels(config.name).inc()
            ctx.log.info("rate_limited", service=config.name, retry_after=decision.retry_after)
            raise GatewayError(
                errors.RATE_LIMITED,
                f"too many requests; retry in {decision.retry_after} s",
                headers=((b"Retry-After", b"%d" % decision.retry_after),),
            )

    def _headers_for(self, request: IncomingRequest, ctx: RequestContext, config: ServiceConfig) -> list:
        """The headers a request carries to C{config}'s service."""
        extra = list(ctx.trace.headers()) if ctx.trace is not None else []
        # The gateway's own API key stays here unless the service asks for it.
        withheld = (ctx.caller.header,) if ctx.caller is not None and not config.forward_api_key else ()
        if config.api_key:
            # The backend's key, in place of whatever the client sent.
            extra.append((b"Authorization", b"Bearer " + config.api_key.encode("ascii")))
        if config.speaks_openai:
            # The gateway reads these answers as they pass: no compression.
            extra.append((b"Accept-Encoding", b"identity"))
        return request_headers_for_upstream(request, ctx.request_id, ctx.client, extra=extra, withheld=withheld)

    async def _serve(
        self, request: IncomingRequest, ctx: RequestContext, checked: bytes, targets: list["Target"], call: OpenAICall | None
    ) -> None:
        """
        Try C{targets} in turn, each with its retries, until one answers in
        a way the client should see: a target gives up on a gateway error
        (no endpoint answered, all circuits open, timeouts), a final 429 or
        5xx, and for OpenAI requests on a 401, 403, 404 or a context length
        exceeded.  The whole chain shares the first target's deadline.
        """
        idempotency_key = request.header(b"idempotency-key") is not None
        deadline_at = self._clock.seconds() + targets[0].route.config.deadline
        transcript = Transcript(call.resumable_kind) if call is not None and call.stream else None
        for position, target in enumerate(targets):
            serving = target.route
            config = serving.config
            last = position == len(targets) - 1
            ctx.served_by = config.name
            headers = self._headers_for(request, ctx, config)
            body = call.body_for(target.model) if call is not None else request.body
            commit_point = self._openai_commit_point(call, transcript, ctx, config) if call is not None else None
            serving.in_flight += 1
            try:
                try:
                    response, admission, endpoint, held = await self._attempts(
                        request.method, checked, headers, body, serving, ctx, deadline_at, idempotency_key, commit_point
                    )
                except GatewayError as error:
                    if last or error.kind not in _GIVING_UP or self._clock.seconds() >= deadline_at:
                        self._name_the_chain(request, ctx, target)
                        raise
                    self._fall_over(ctx, target, targets[position + 1], error.message)
                    continue
                if not last and self._clock.seconds() < deadline_at:
                    moved_on = None
                    if response.code in FALLOVER_STATUSES:
                        moved_on = f"status {response.code}"
                    elif call is not None and 400 <= response.code < 500 and held is not None:
                        try:
                            moved_on = await self._refusal_moves_on(response, held, config)
                        except BaseException:  # the client left while the refusal was read
                            endpoint.in_flight -= 1
                            held.cancel()
                            raise
                    if moved_on is not None:
                        endpoint.in_flight -= 1
                        if held is not None:
                            held.cancel()
                        response.discard()
                        self._fall_over(ctx, target, targets[position + 1], moved_on)
                        continue
                self._name_the_chain(request, ctx, target)
                try:
                    if isinstance(held, EventStreamRelay):
                        await self._relay_stream(request, response, held, admission, endpoint, target, targets, ctx, call, transcript, checked)
                    else:
                        await self._relay(request, response, held, admission, endpoint, serving, ctx)
                finally:
                    endpoint.in_flight -= 1
                return
            finally:
                serving.in_flight -= 1

    async def _refusal_moves_on(self, response: UpstreamResponse, held: BodyRelay, config: ServiceConfig) -> str | None:
        """Why an OpenAI backend's 4xx sends the request to the next target, or L{None} (the client sees it)."""
        body = None
        if response.code == 400:
            read = held.held_body(REFUSAL_BODY_LIMIT)
            if not read.called:
                read.addTimeout(config.first_byte_timeout, self._clock)
            try:
                body = await read
            except TimeoutError:
                body = None
        if after_refusal(response.code, body) == NEXT_TARGET:
            codes = f" ({_error_code_of(body)})" if body else ""
            return f"status {response.code}{codes}"
        return None

    def _openai_commit_point(
        self,
        call: OpenAICall,
        transcript: Transcript | None,
        ctx: RequestContext,
        config: ServiceConfig,
        resumed: bool = False,
    ) -> Callable[[UpstreamResponse], Awaitable[tuple[BodyRelay, Exception | None, str]]]:
        """
        The commit point of an OpenAI answer: a completion stream's first
        token (within C{first_token_timeout}), else the first byte; a
        successful JSON answer has its usage read as it passes.  C{resumed}:
        the stream continues one that broke.
        """
        on_usage = functools.partial(self._count_usage, ctx, config.name)

        def commit_point(response: UpstreamResponse):
            if response.code == 200 and transcript is not None and _is_event_stream(response):
                relay = EventStreamRelay(
                    self._clock, config.idle_timeout, transcript, on_usage, call.client_wants_usage, resumed
                )
                return self._first_bytes(response, config, relay, config.token_timeout, "first token")
            relay = JsonAnswerRelay(self._clock, config.idle_timeout, on_usage) if response.code == 200 else None
            return self._first_bytes(response, config, relay)

        return commit_point

    def _count_usage(self, ctx: RequestContext, service: str, usage: Usage) -> None:
        """One backend answer's usage: on the access line and in the token counts."""
        facts = ctx.completion
        if facts is None:
            facts = ctx.completion = CompletionFacts()
        model = usage.model or facts.model or facts.requested_model or "unknown"
        facts.model = model
        facts.prompt_tokens = (facts.prompt_tokens or 0) + usage.prompt_tokens
        facts.completion_tokens = (facts.completion_tokens or 0) + usage.completion_tokens
        if usage.prompt_tokens:
            self._metrics.count_tokens(service, model, "prompt", usage.prompt_tokens)
        if usage.completion_tokens:
            self._metrics.count_tokens(service, model, "completion", usage.completion_tokens)

    def _fall_over(self, ctx: RequestContext, gave_up: "Target", to: "Target", reason: str) -> None:
        """C{gave_up} gave up before any byte reached the client: C{to} is tried next."""
        ctx.fallback_from.append(gave_up.label)
        service = ctx.service or gave_up.route.config.name
        self._metrics.fallback(service, to.route.config.name, gave_up.label, to.label, reason, ctx.request_id)
        ctx.log.warning("service_fallback", service=gave_up.label, to=to.label, reason=reason)

    def _name_the_chain(self, request: IncomingRequest, ctx: RequestContext, serving: "Target") -> None:
        if serving.model is not None:
            # A model's request: the model that answers it (its headers are written by ctx.stamp).
            ctx.served_model = serving.model
            if ctx.completion is not None and ctx.completion.model is None:
                ctx.completion.model = serving.model

    async def _attempts(
        self,
        method: bytes,
        checked: bytes,
        headers: list,
        body: bytes,
        route: ServiceRoute,
        ctx: RequestContext,
        deadline_at: float,
        idempotency_key: bool = False,
        commit_point: Callable[[UpstreamResponse], Awaitable[tuple[BodyRelay, Exception | None, str]]] | None = None,
    ) -> tuple[UpstreamResponse, Admission, Endpoint, BodyRelay | None]:
        """
        Try the service's endpoints until an answer is final, the retries
        are spent, the deadline passes, the retry budget says no, or no
        endpoint's breaker admits.  A retry goes to another endpoint than
        the one that just failed while another admits; a request that may
        not be sent again to a silent endpoint (C{retry_timeouts}) never is.
        The endpoint returned counts the request in flight until the caller
        is done with it; the relay returned (for an answer that is not a
        retryable failure) holds the body's first bytes, to be committed.
        """
        config = route.config
        failed_on: Endpoint | None = None
        silent: set[Endpoint] = set()  # endpoints this request must not be sent to again
        resendable = may_resend_after_silence(config.retry_timeouts, method, idempotency_key)
        retrying = False
        try:
            while True:
                endpoint, admission = route.choose(ctx.request_id, failed_on, silent)
                if endpoint is None:
                    raise _circuit_open(config.name, route.retry_after(admission))
                outcome = await self._attempt(
                    method, checked, headers, body, config, endpoint, admission, ctx, deadline_at, resendable, silent,
                    commit_point,
                )
                if outcome.committed:
                    return outcome.response, admission, endpoint, outcome.relay
                failed_on = endpoint
                delay, stop = self._after_failed_attempt(outcome, route, ctx, deadline_at, retrying, silent)
                if stop in (_FINAL, _SILENT_LEFT, _BUDGET_SPENT):
                    if outcome.failure is not None:
                        raise GatewayError(outcome.failure.kind, f"service {config.name!r}: {outcome.failure.reason}")
                    return outcome.response, admission, endpoint, None  # the last answer, as it is
                if outcome.response is not None:
                    endpoint.in_flight -= 1
                    outcome.response.discard()
                if stop == _ALL_OPEN:
                    raise _circuit_open(config.name, route.retry_after(None))
                if not retrying:
                    retrying = True
                    route.retrying += 1
                self._metrics.retries.labels(config.name).inc()
                await deferLater(self._clock, delay)
        finally:
            if retrying:
                route.retrying -= 1

    async def _attempt(
        self,
        method: bytes,
        checked: bytes,
        headers: list,
        body: bytes,
        config: ServiceConfig,
        endpoint: Endpoint,
        admission: Admission,
        ctx: RequestContext,
        deadline_at: float,
        resendable: bool,
        silent: set[Endpoint],
        commit_point: Callable[[UpstreamResponse], Awaitable[tuple[BodyRelay, Exception | None, str]]] | None,
    ) -> "_Outcome":
        """
        One attempt on C{endpoint}: send, wait for the headers (within the
        attempt's timeout and the deadline), count the verdict on its
        breaker, then wait for the commit point.  Raises L{CancelledError}
        when the client left and L{GatewayError} when the deadline passed.
        """
        breaker = endpoint.breaker
        ctx.attempts += 1
        timeout = min(config.timeout, deadline_at - self._clock.seconds())
        attempt = endpoint.upstream.request(method, join_target(endpoint.upstream.base_path, checked), headers, body)
        attempt.addTimeout(timeout, self._clock, onTimeoutCancel=_timed_out)
        sent_at = self._clock.seconds()
        endpoint.in_flight += 1
        try:
            response = await attempt
        except Exception as error:
            endpoint.in_flight -= 1
            if ctx.client_gone or isinstance(error, CancelledError):
                self._count_attempt(config.name, endpoint, "abandoned")
                # The client left: whatever the upstream reports of its
                # cancellation, it is no failure of the backend and nothing
                # to retry.
                breaker.abandoned(admission)
                raise CancelledError() from None
            if isinstance(error, TimeoutError) and timeout < config.timeout:
                breaker.failed(admission, "the deadline passed")
                self._count_attempt(config.name, endpoint, "timeout")
                self._log_attempt(ctx, config.name, "the deadline passed", final=True)
                raise GatewayError(errors.UPSTREAM_TIMEOUT, f"service {config.name!r}: the deadline passed") from None
            failure = self._attempt_failed(config, endpoint, admission, error, f"no answer within {timeout:g} s", resendable, silent)
            return _Outcome(failure=failure)
        took = self._clock.seconds() - sent_at
        endpoint.ttfb = decayed(endpoint.ttfb, took)
        self._metrics.observe_upstream_time(config.name, endpoint.url, took)
        if is_breaker_failure(response.code):
            breaker.failed(admission, f"status {response.code}")
            self._count_attempt(config.name, endpoint, "http_5xx")
        else:
            # 429 included: the backend's limit is no failure of it.
            breaker.succeeded(admission)
            self._count_attempt(config.name, endpoint, "answered")
        if response.code in RETRYABLE_STATUSES:
            return _Outcome(response=response)
        if commit_point is None:
            relay, error, waited = await self._first_bytes(response, config)
        else:
            relay, error, waited = await commit_point(response)
        if error is None:
            return _Outcome(response=response, relay=relay)
        endpoint.in_flight -= 1
        if ctx.client_gone or isinstance(error, CancelledError):
            raise CancelledError() from None
        # Its headers were a success for the breaker; the missing body is a
        # failure all the same.
        return _Outcome(failure=self._attempt_failed(config, endpoint, admission, error, waited, resendable, silent))

    def _after_failed_attempt(
        self,
        outcome: "_Outcome",
        route: ServiceRoute,
        ctx: RequestContext,
        deadline_at: float,
        retrying: bool,
        silent: AbstractSet[Endpoint],
    ) -> tuple[float | None, str | None]:
        """
        Whether a failed attempt (or a retryable answer) is followed by
        another: the backoff delay, and why not (L{None}: retry).  Logs the
        attempt, announcing a retry only when one will happen.
        """
        config, policy = route.config, route.policy
        delay = self._delay_before_retry(outcome, policy, ctx.attempts)
        stop = None
        if delay is None or not policy.attempts_left(ctx.attempts) or self._clock.seconds() + delay >= deadline_at:
            stop = _FINAL
        elif not route.any_may_admit(silent):
            # Nowhere left to go: every breaker is open, or the only endpoints
            # left are silent ones this request must not be sent to again
            # (then it ends with its 504 at once).
            stop = _SILENT_LEFT if route.any_may_admit() else _ALL_OPEN
        elif not retry_budget_allows(route.retrying - retrying, route.in_flight, config.retry_budget, config.retry_budget_min):
            stop = _BUDGET_SPENT
            self._metrics.retry_budget_exhausted.labels(config.name).inc()
            ctx.log.warning("retry_budget_exhausted", service=config.name, retrying=route.retrying, in_flight=route.in_flight)
        self._log_attempt(ctx, config.name, outcome.reason, final=stop is not None, delay=delay)
        return delay, stop

    async def _first_bytes(
        self,
        response: UpstreamResponse,
        config: ServiceConfig,
        relay: BodyRelay | None = None,
        timeout: float | None = None,
        waits_for: str = "first byte",
    ) -> tuple[BodyRelay, Exception | None, str]:
        """
        The commit point: nothing reaches the client before the answer's
        first body byte (or its end; C{relay} may wait for more, such as a
        first token), so that until then the attempt may still fail and be
        retried or fall over.  Returns the relay holding what came, why it
        failed (or L{None}), and what a silence means.
        """
        timeout = config.first_byte_timeout if timeout is None else timeout
        waited = f"no {waits_for} within {timeout:g} s"
        if relay is None:
            relay = BodyRelay(None, self._clock, config.idle_timeout)
        response.deliver_body(relay)
        if relay.has_first_data:
            return relay, None, waited  # it came with the headers: most answers, no waiting
        if not relay.first_data.called:
            relay.first_data.addTimeout(timeout, self._clock)
        try:
            await relay.first_data
        except Exception as error:
            relay.cancel()
            return relay, error, waited
        return relay, None, waited

    def _attempt_failed(
        self,
        config: ServiceConfig,
        endpoint: Endpoint,
        admission: Admission,
        error: Exception,
        silence: str,
        resendable: bool,
        silent: set[Endpoint],
    ) -> "_Failed":
        """
        An attempt that got no usable answer: a silent backend (C{silence}
        says for how long), a connection failure, or an answer that broke
        before its first byte.  Counts it against the endpoint's breaker,
        and keeps a silent endpoint from getting the request again unless it
        is C{resendable}.
        """
        if isinstance(error, TimeoutError):
            failed, counted = _Failed(errors.UPSTREAM_TIMEOUT, silence), "timeout"
            if not resendable:
                silent.add(endpoint)
        elif isinstance(error, StreamBroken):
            failed = _Failed(errors.UPSTREAM_UNAVAILABLE, f"the answer broke before its first byte: {error}")
            counted = "connection_error"
        else:
            failed, counted = _Failed(errors.UPSTREAM_UNAVAILABLE, _describe(error)), "connection_error"
        endpoint.breaker.failed(admission, failed.reason)
        self._count_attempt(config.name, endpoint, counted)
        return failed

    def _count_attempt(self, service: str, endpoint: Endpoint, outcome: str) -> None:
        self._metrics.observe_attempt(service, endpoint.url, outcome)

    def _delay_before_retry(self, outcome: "_Outcome", policy: RetryPolicy, attempts: int) -> float | None:
        """
        The backoff before the next attempt, or L{None} when the backend's own
        C{Retry-After} asks for longer than C{retry_max_delay}.
        """
        answer = outcome.response
        if answer is not None and answer.code in RETRY_AFTER_STATUSES:
            asked = parse_retry_after(answer.header(b"retry-after"), self._clock.seconds())
            if asked is not None:
                return asked if asked <= policy.max_delay else None
        return policy.delay_before_retry(attempts - 1, self._rng)

    def _log_attempt(self, ctx: RequestContext, service: str, reason: str, final: bool, delay=None) -> None:
        retry = {} if final else {"retry_in_s": round(delay, 3)}
        ctx.log.warning("attempt_failed", service=service, attempt=ctx.attempts, reason=reason, retry=not final, **retry)

    async def _relay(
        self,
        request: IncomingRequest,
        response: UpstreamResponse,
        held: BodyRelay | None,
        admission: Admission,
        endpoint: Endpoint,
        route: ServiceRoute,
        ctx: RequestContext,
    ) -> None:
        """Stream the backend's answer to the client as it arrives (the held part first)."""
        ctx.stamp(request, self._clock.seconds())
        request.start(response.code, response.reason, response_headers_for_client(response), response.length)
        if held is None:
            relay = BodyRelay(request, self._clock, route.config.idle_timeout)
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
            endpoint.breaker.failed(admission, f"stream: {error}")
            self._cut_short(request, response, ctx, route.config.name, error, relay.bytes_relayed)

    def _cut_short(
        self, request: IncomingRequest, response: UpstreamResponse, ctx: RequestContext, service: str, error: Exception, relayed: int
    ) -> NoReturn:
        """
        End an answer that broke after its first bytes went out: the
        connection is closed without the end of the answer, so the client
        sees a truncated body, never a complete-looking one.
        """
        kind = errors.STREAM_IDLE if isinstance(error, StreamIdle) else errors.STREAM_BROKEN
        ctx.outcome = kind.type
        ctx.log.warning("stream_failed", service=service, reason=str(error), bytes_relayed=relayed)
        if _is_event_stream(response):
            # One complete SSE event that says what happened (an SDK raises
            # it as an error), then the connection closes without the end.
            request.write(b"event: error\ndata: " + error_body(kind, str(error), ctx.request_id) + b"\n\n")
        request.abort()
        raise AnswerCutShort(ctx.outcome)

    async def _relay_stream(
        self,
        request: IncomingRequest,
        response: UpstreamResponse,
        relay: EventStreamRelay,
        admission: Admission,
        endpoint: Endpoint,
        target: "Target",
        targets: list["Target"],
        ctx: RequestContext,
        call: OpenAICall,
        transcript: Transcript,
        checked: bytes,
    ) -> None:
        """
        Relay a completion stream committed at its first token.  When it
        breaks or stalls before its end, ask the targets with C{resume =
        prefill} (the same deployment first) to go on from the text sent so
        far, and relay that as more of the same answer; when none can, end
        with the SSE error event of the I{original} break.
        """
        ctx.stamp(request, self._clock.seconds())
        # Chunked whatever the backend said: events may be left out or renamed.
        request.start(response.code, response.reason, response_headers_for_client(response), None)
        relay.commit(request)
        if relay.done.called and relay.complete:
            return
        request.send_head()
        original: Exception | None = None
        resumed_endpoint: Endpoint | None = None  # in flight for this request, besides the first
        try:
            while True:
                relay.watch_idle()
                try:
                    await relay.done
                    return
                except (StreamIdle, StreamBroken) as error:
                    endpoint.breaker.failed(admission, f"stream: {error}")
                    if original is None:
                        original = error
                    ctx.log.warning(
                        "stream_broke", service=target.route.config.name, model=target.model, reason=str(error),
                        text_chars=len(transcript.text),
                    )
                    resumed = None
                    if transcript.resumable and ctx.completion is not None and ctx.completion.resumed < MAX_RESUMES:
                        resumed = await self._resume(request, ctx, call, transcript, targets, target, endpoint, checked)
                    if resumed is None:
                        self._cut_short(request, response, ctx, target.route.config.name, original, request.bytes_sent)
                    if resumed_endpoint is not None:
                        resumed_endpoint.in_flight -= 1
                    target, endpoint, admission, relay = resumed
                    resumed_endpoint = endpoint
                    ctx.completion.resumed += 1
                    ctx.completion.resumed_on.append(target.label)
                    relay.commit(request)
        finally:
            if resumed_endpoint is not None:
                resumed_endpoint.in_flight -= 1

    async def _resume(
        self,
        request: IncomingRequest,
        ctx: RequestContext,
        call: OpenAICall,
        transcript: Transcript,
        targets: list["Target"],
        broke_on: "Target",
        broke_endpoint: Endpoint,
        checked: bytes,
    ) -> "tuple[Target, Endpoint, Admission, EventStreamRelay] | None":
        """
        Ask, in turn, the targets that may resume (the one that broke first,
        its same endpoint if its breaker admits) for the rest of the answer;
        the first whose stream gives a token wins.  L{None} when none does.
        """
        candidates = [broke_on, *(target for target in targets if target is not broke_on)]
        for target in candidates:
            route, config = target.route, target.route.config
            if config.resume != "prefill":
                continue
            endpoint, admission = None, None
            if target is broke_on:
                admission = broke_endpoint.breaker.admit(ctx.request_id)
                endpoint = broke_endpoint if admission.allowed else None
            if endpoint is None:
                endpoint, admission = route.choose(ctx.request_id, broke_endpoint)
            if endpoint is None:
                continue
            body = call.body_for(target.model, prefill=transcript.text)
            headers = self._headers_for(request, ctx, config)
            commit_point = self._openai_commit_point(call, transcript, ctx, config, resumed=True)
            relay, refused = await self._resume_attempt(endpoint, admission, headers, body, checked, config, ctx, commit_point)
            self._metrics.stream_resumes.labels(config.name, "failed" if refused else "resumed").inc()
            if relay is not None:
                ctx.log.info("stream_resumed", service=config.name, model=target.model, endpoint=endpoint.url)
                return target, endpoint, admission, relay
            ctx.log.warning("resume_failed", service=config.name, model=target.model, reason=refused)
        return None

    async def _resume_attempt(
        self,
        endpoint: Endpoint,
        admission: Admission,
        headers: list,
        body: bytes,
        checked: bytes,
        config: ServiceConfig,
        ctx: RequestContext,
        commit_point: Callable[[UpstreamResponse], Awaitable[tuple[BodyRelay, Exception | None, str]]],
    ) -> tuple[EventStreamRelay | None, str | None]:
        """
        One attempt (no retry, no deadline but its own timeouts) for the
        rest of a broken stream: the relay holding its first token (the
        endpoint then counts it in flight), or why it failed or was refused.
        """
        outcome = await self._attempt(
            b"POST", checked, headers, body, config, endpoint, admission, ctx, math.inf, False, set(), commit_point
        )
        if outcome.failure is not None:
            return None, outcome.failure.reason
        if not isinstance(outcome.relay, EventStreamRelay):
            # A refusal (a backend that takes no assistant prefill says 400),
            # or an answer that is no stream.
            endpoint.in_flight -= 1
            if outcome.relay is not None:
                outcome.relay.cancel()
            outcome.response.discard()
            return None, f"status {outcome.response.code}"
        return outcome.relay, None


#: The most times one answer's stream is resumed.
MAX_RESUMES = 5


def _checked(rest: bytes, query: bytes) -> bytes:
    """The path and query sent on, refused here, before any limit or attempt."""
    try:
        return checked_rest(rest, query)
    except UnsafePath as error:
        raise GatewayError(errors.BAD_REQUEST, f"refused path: {error}") from None


def _error_code_of(body: bytes | None) -> str:
    codes, _ = error_codes(body)
    return ", ".join(sorted(codes)) or "no code"


def _is_event_stream(response: UpstreamResponse) -> bool:
    content_type = response.header(b"content-type") or b""
    return content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"


#: Gateway errors after which a service gives up and its fallback is tried.
_GIVING_UP = frozenset({errors.UPSTREAM_UNAVAILABLE, errors.CIRCUIT_OPEN, errors.UPSTREAM_TIMEOUT})
#: A backend's final statuses after which its service gives up (a 4xx but 429 passes through).
FALLOVER_STATUSES = frozenset({429, 500, 502, 503, 504})


def _timed_out(result: object, timeout: float) -> None:
    # Whatever the agent's cancellation failed with, the cause was the timeout.
    raise TimeoutError(timeout, "attempt")


def _circuit_open(service: str, retry_after: int) -> GatewayError:
    return GatewayError(
        errors.CIRCUIT_OPEN,
        f"service {service!r} is failing; the circuit is open, retry in {retry_after} s",
        headers=((b"Retry-After", b"%d" % retry_after),),
    )


def _describe(error: Exception) -> str:
    """A short reason for a failed connection, without a traceback."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
