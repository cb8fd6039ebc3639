"""
L{ServiceBroker}: where a proxied request enters routing.  It checks the
path, takes the rate limit, reads a model call's body where the service
speaks a model API (through that API's L{IApi}), makes the L{Call}, and serves it through the response cache (when
the first target's service caches) or straight through the fallback
chain, whose parts (the attempts, the relay of the answer, the resume of
a stream) it assembles once.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING, Any, Awaitable, Coroutine, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from txgateway import errors
from txgateway.bodies import FAST, BodyReading
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import GatewayError
from txgateway.observability.context import RequestContext
from txgateway.observability.metrics import GatewayMetrics
from txgateway.ratelimit.bucket import Decision
from txgateway.ratelimit.limiter import RateLimiter
from txgateway.routing.answer import AnswerCutShort, AnswerRelay
from txgateway.routing.attempt import Attempts
from txgateway.routing.call import Call
from txgateway.routing.chain import FallbackChain
from txgateway.routing.model import ServiceRoute, Target
from txgateway.routing.paths import UnsafePath, checked_rest
from txgateway.routing.resume import StreamResume
from txgateway.speaking import BadCall, IModelCall, Speakers

if TYPE_CHECKING:
    from txgateway.cache.responses import ResponseCache
    from txgateway.governance.governor import Governor
    from txgateway.routing.deployments import ModelTable

__all__ = ["AnswerCutShort", "ServiceBroker", "refuse_unless_json"]

#: How a call ends when no backend made anything for it (refused connections, open circuits).
_NOTHING_MADE = (errors.UPSTREAM_UNAVAILABLE, errors.CIRCUIT_OPEN)


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
    @param speakers: every API the gateway speaks, and a speaker per pair of them.
    @param governor: governs API keys' calls (limits, budgets, models), or L{None}.
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
        speakers: Speakers,
        governor: "Governor | None" = None,
    ) -> None:
        if not isinstance(speakers, Speakers):
            raise TypeError(f"speakers must be Speakers, not {speakers!r}")
        self._clock = clock
        self.speakers = speakers
        self.routes = dict(routes)
        #: Each service's targets: itself, then its fallbacks (made once, not per request).
        self._chains = {
            name: [Target(serving) for serving in (route, *(self.routes[f] for f in route.config.fallback if f in self.routes))]
            for name, route in self.routes.items()
        }
        self.models = models
        self.cache = cache
        self.limiter = limiter
        self.governor = governor
        self._metrics = metrics
        attempts = Attempts(clock, metrics, rng or random.Random())
        self._chain = FallbackChain(clock, attempts, AnswerRelay(clock, StreamResume(clock, attempts, metrics)), metrics)

    def proxy(
        self,
        request: IncomingRequest,
        ctx: RequestContext,
        route: ServiceRoute,
        rest: bytes,
        query: bytes,
        reading: BodyReading = FAST,
    ) -> Coroutine[Any, Any, None]:
        """
        Answer C{request} from C{route}'s backends (or its fallbacks'):
        write the status, headers and streamed body, or raise
        L{GatewayError} (nothing was written yet) or L{AnswerCutShort} (the
        answer broke midway).  A model call of the service's API is read
        as C{reading} says: strictly for a governed key, whose requests the
        gateway cannot read are refused or priced (see L{_unread_price}).

        What decides is done at once (a refusal is raised from this call),
        and the rest is the coroutine returned: the one frame of the
        broker's a stream keeps waiting (see L{_admitted}, L{_governed}).
        """
        path = _checked(rest, query)
        config = route.config
        governor = self.governor
        if governor is not None:
            governor.check_service(ctx, config.name)
        model_call = _model_call(request, rest, config.api, self.speakers, reading)
        price = None
        if reading.strict:
            if model_call is not None:
                if model_call.model is None:
                    raise GatewayError(errors.BAD_REQUEST, "the body has no model: a string naming the model is needed")
                governor.check_model(ctx, model_call.model)
                _refuse_unbounded(model_call)
            else:
                price = _unread_price(request, rest, config)
        call = Call.of(request, ctx, path, self._chains[config.name], self.speakers, model_call, as_sent=True)
        if governor is None:
            return self._admitted(call, path)
        return self._governed(call, path, price)

    def proxy_model(
        self,
        request: IncomingRequest,
        ctx: RequestContext,
        model_call: IModelCall,
        targets: list[Target],
        rest: bytes,
        query: bytes,
        reading: BodyReading = FAST,
        uncharged: bool = False,
    ) -> Coroutine[Any, Any, None]:
        """
        Answer an OpenAI or Messages request from its model's targets in
        order (the first is the primary), each sent the body with its own
        model name, translated for a target of the other API.  A target the
        request cannot be translated for is left out (logged); when none is
        left, the client gets a 400 that says why.  A governed key's call
        (C{reading} strict) to an endpoint that is no model call the
        gateway reads (images, speech, moderations...) is priced or refused
        as under C{/api/} (see L{_unread_price}), unless C{uncharged} (a
        count of tokens: its key and model were checked, and it costs
        nothing: it is held to its key's requests a minute and in flight
        only, as a request that is no model call).  As L{proxy}: what
        decides is done at once, the rest is the coroutine returned.
        """
        path = _checked(rest, query)
        price = None
        if reading.strict and not uncharged:
            _refuse_unbounded(model_call)
        if reading.strict and not uncharged and not self.speakers.api(model_call.api).model_call_path(rest):
            price = _unread_price(request, rest, targets[0].route.config)
        call = Call.of(request, ctx, path, targets, self.speakers, model_call)
        refused = call.untranslatable()
        if refused:
            call.targets = self._translatable(call, refused)
        if self.governor is None:
            return self._admitted(call, b"/v1" + path)
        return self._governed(call, b"/v1" + path, price, charged=not uncharged)

    def _admitted(self, call: Call, cached_as: bytes) -> Awaitable[None]:
        """
        C{call} through the rate limit of its first target, then served.  A
        limit decided at once (its store is in this process's memory) is
        applied here, a refusal raised, and what serves the call returned:
        no frame of this waits above it for as long as a stream lasts.
        """
        if self.limiter is None:
            return self._serve_call(call, cached_as)
        taking = self._take(call.request, call.ctx, call.targets[0].route)
        decided: list = []
        taking.addCallback(_kept_in, decided)  # at once from a store in this process
        if decided:
            self._apply_limit(call.request, call.ctx, call.targets[0].route, decided[0])
            return self._serve_call(call, cached_as)
        return self._admitted_later(call, cached_as, taking)

    async def _admitted_later(self, call: Call, cached_as: bytes, taking: Deferred) -> None:
        """L{_admitted} with a limit its store decides later (Redis, the workers' supervisor)."""
        self._apply_limit(call.request, call.ctx, call.targets[0].route, await taking)
        await self._serve_call(call, cached_as)

    def _translatable(self, call: Call, refused: list[tuple[Target, str]]) -> list[Target]:
        """C{call}'s targets less those it cannot be translated for; L{GatewayError} when none is left."""
        left_out = {id(target) for target, _ in refused}
        kept = [target for target in call.targets if id(target) not in left_out]
        if not kept:
            target, reason = refused[0]
            api = self.speakers.api(target.route.config.api).title
            raise GatewayError(errors.BAD_REQUEST, f"cannot be translated to {api} (target {target.label}): {reason}")
        for target, reason in refused:
            call.ctx.log.warning("target_skipped", target=target.label, reason=f"untranslatable: {reason}")
        return kept

    async def _governed(
        self, call: Call, cached_as: bytes, request_price: tuple[str, float] | None = None, charged: bool = True,
    ) -> None:
        """
        C{call} through the rate limit of its first target, then served
        within its caller's reservation, settled however the call ends
        (answered, refused, broken, the client gone).  A call not
        C{charged} (a count of tokens) is reserved as a request that is no
        model call: its requests counted, no tokens, no cost.
        """
        await self._admit(call.request, call.ctx, call.targets[0].route)
        model_call = call.model_call if charged else None
        # The models and the deadline are arguments, not locals: a stream keeps this frame for minutes.
        reservation = await self.governor.reserve(
            call.request, call.ctx, model_call,
            [target.model or (model_call.model if model_call is not None else None) for target in call.targets],
            call.targets[0].route.config.deadline, call.completion_floor(), request_price,
        )
        if reservation is None:
            await self._serve_call(call, cached_as)
            return
        if reservation.model_call is not model_call:
            # Its key's budget pays for less than it asked ([budgets] when_short = cap): the capped call goes.
            model_call = reservation.model_call
            call.capped(model_call)
        if model_call is not None and model_call.stream and reservation.completion_cap:
            call.completion_reserved = reservation.completion_cap
        if model_call is not None and model_call.generates and not model_call.stream:
            await self._outliving_client(call, cached_as, reservation)
            return
        try:
            await self._serve_call(call, cached_as)
        finally:
            reservation.settle(call.ctx, call.request.code, call.transcript, call.served_model)

    async def _outliving_client(self, call: Call, cached_as: bytes, reservation: Any) -> None:
        """
        Serve a governed JSON call so that its client leaving does not stop
        it: the backend goes on making the answer (and its provider bills
        it), so the gateway goes on reading it, the bytes dropped, within
        the call's own timeouts, and settles what the answer reports.  No
        retry and no other target is tried for a client that left.  Its
        request's context says so, and the door does not cancel its
        handler.  Apart from L{_governed}, whose frame a stream keeps for
        minutes: these locals are not in it.
        """
        ctx = call.ctx
        ctx.outlives_client = True
        answered, ended = 0, "answered"
        try:
            await self._serve_call(call, cached_as)
        except Exception as error:  # a CancelledError too
            if isinstance(error, GatewayError):
                ended = error.kind.type
                if error.kind in _NOTHING_MADE:
                    answered = error.kind.status  # no backend made anything: nothing to pay
            else:
                ended = "stopped" if isinstance(error, CancelledError) else type(error).__name__
            if not ctx.client_gone:
                raise
        finally:
            reservation.settle(ctx, answered or call.request.code, call.transcript, call.served_model)
        if ctx.client_gone:
            # How the call ended is said on the log, not raised to anyone: its client left.
            ctx.log.info(
                "settled_after_client_left", ended=ended, cost_usd=ctx.spend.cost_usd if ctx.spend is not None else None,
                completion_tokens=ctx.completion.completion_tokens if ctx.completion is not None else None,
            )

    def _serve_call(self, call: Call, cached_as: bytes) -> Awaitable[None]:
        """
        Serve C{call} through its targets, or through the response cache
        when the first target's service caches (C{cached_as}: the target
        path its key names).  Not a coroutine of its own: no extra frame
        per request.
        """
        config = call.targets[0].route.config
        if (
            self.cache is None or config.cache == "off" or call.capped_by_budget
            or (call.model_call is not None and not call.model_call.cacheable)
        ):
            return self._chain.serve(call)
        return self.cache.serve(call.request, call.ctx, config, cached_as, functools.partial(self._chain.serve, call))

    async def _admit(self, request: IncomingRequest, ctx: RequestContext, route: ServiceRoute) -> None:
        """The rate limit: its headers on the answer, or L{GatewayError} when it says no."""
        if self.limiter is None:
            return
        self._apply_limit(request, ctx, route, await self._take(request, ctx, route))

    def _take(self, request: IncomingRequest, ctx: RequestContext, route: ServiceRoute) -> Deferred[Decision]:
        """Take a token of the rate limit of C{route} for C{request}'s client."""
        caller = ctx.caller.name if ctx.caller is not None else None
        return self.limiter.take(request, ctx.client, route.config, caller)

    def _apply_limit(self, request: IncomingRequest, ctx: RequestContext, route: ServiceRoute, decision: Decision) -> None:
        """The rate limit's C{decision}: its headers on the answer, or L{GatewayError} when it says no."""
        config = route.config
        request.set_header(b"RateLimit-Limit", b"%d" % decision.limit)
        request.set_header(b"RateLimit-Remaining", b"%d" % decision.remaining)
        request.set_header(b"RateLimit-Reset", b"%d" % decision.reset)
        if not decision.allowed:
            self._metrics.rate_limited.labels(config.name).inc()
            ctx.log.info("rate_limited", service=config.name, retry_after=decision.retry_after)
            raise GatewayError(
                errors.RATE_LIMITED,
                f"too many requests; retry in {decision.retry_after} s",
                headers=((b"Retry-After", b"%d" % decision.retry_after),),
            )


def _kept_in(value: Any, kept: list) -> Any:
    """A callback that keeps what its Deferred fired with in C{kept}, and passes it on."""
    kept.append(value)
    return value


def refuse_unless_json(request: IncomingRequest) -> None:
    """
    @raise GatewayError: C{unsupported_media_type} (415), for a governed
        key's model call whose body is declared other than JSON (a form, a
        file upload): the gateway cannot read, so cannot account for, it.
    """
    declared = request.header(b"content-type")
    if declared is None:
        return
    media = declared.split(b";", 1)[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json"):
        return
    raise GatewayError(
        errors.UNSUPPORTED_MEDIA_TYPE,
        f"a governed key's model call must be a JSON body (Content-Type: application/json), got "
        f"{declared.decode('latin-1')[:60]!r}",
    )


def _refuse_unbounded(model_call: IModelCall) -> None:
    """A governed key's call whose cost the gateway cannot bound is refused: 403 C{not_governable}, saying why."""
    reason = model_call.unbounded
    if reason is not None:
        raise GatewayError(errors.NOT_GOVERNABLE, f"a governed key's call cannot be bounded: {reason}")


def _model_call(request: IncomingRequest, rest: bytes, service_api: str, speakers: Speakers, reading: BodyReading) -> IModelCall | None:
    """
    The model call a C{/api/} request makes, read from its body: a C{POST}
    to one of the model calls of the service's API (chat or text
    completions, embeddings, the Responses API; Anthropic's messages).
    L{None}: not a model call, or (for a caller read fast) a body that is
    not JSON or is over the reading's bounds, relayed as it is.

    @raise GatewayError: a governed caller's body (C{reading} strict) that
        the gateway cannot read: 415 when it is not JSON at all, else 400 naming why.
    """
    strict = reading.strict
    api = speakers.reader(service_api, rest) if request.method == b"POST" else None
    if api is None:
        return None
    if strict:
        refuse_unless_json(request)
    try:
        return api.read_call(rest, request.body, reading)
    except BadCall as error:
        if not strict:
            return None  # not a body the gateway reads: relayed as it is
        raise GatewayError(errors.BAD_REQUEST, str(error)) from None


def _unread_price(request: IncomingRequest, rest: bytes, config: ServiceConfig) -> tuple[str, float] | None:
    """
    What a governed caller's request that is not a model call is charged:
    C{request_price_usd} when the service sets one; nothing for a read
    (C{GET} or C{HEAD} without a body) or on a service that is no model
    API.

    @raise GatewayError: C{not_governable}, for any other request to a
        model API's service without a price: its cost cannot be known.
    """
    if config.request_price_usd is not None:
        return ("service:" + config.name, config.request_price_usd)
    if config.api == "http" or (request.method in (b"GET", b"HEAD") and not request.body):
        return None
    method = request.method.decode("ascii", "replace")
    where = rest.split(b"?", 1)[0].decode("latin-1")
    raise GatewayError(
        errors.NOT_GOVERNABLE,
        f"{method} {where} on the service {config.name!r} is not a model call the gateway can account for, "
        f"and the key is governed; the operator may price such requests with [service:{config.name}] request_price_usd",
    )


def _checked(rest: bytes, query: bytes) -> bytes:
    """The path and query sent on, refused here, before any limit or attempt."""
    try:
        return checked_rest(rest, query)
    except UnsafePath as error:
        raise GatewayError(errors.BAD_REQUEST, f"refused path: {error}") from None
