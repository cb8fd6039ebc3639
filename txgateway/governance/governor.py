"""
L{Governor}: the governance of one call, between the broker and the
store.  Before a call goes anywhere it checks the models (or services)
the caller's key may call, builds the call's L{Ask} (its worst case, in
tokens and dollars, against its key's and its team's limits) and
reserves it, or refuses the call in the one error shape with OpenAI's
headers.  When the call ends, its L{Reservation} settles once, with what
every attempt's backend reported (priced by the model each was sent).
"""

from __future__ import annotations

import itertools
import math
import secrets
from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from txgateway import errors
from txgateway.config.keys import NANO_PER_USD, ApiKey, ModelPrice, TeamLimits, usd_to_nano
from txgateway.errors import GatewayError
from txgateway.governance.estimate import IMAGE_TOKENS, Prices, completion_cap, estimate_prompt_tokens, relayed_tokens, worst_cost
from txgateway.governance.interface import IGovernanceStore, ModelUse, Settled
from txgateway.governance.ledger import (
    NANO_BOUND,
    PASSING_SCOPE,
    TOKENS_BOUND,
    BUDGET_EXCEEDED,
    RATE_LIMITED,
    TOKENS_EXCEEDED,
    TOO_MANY_PARALLEL,
    Ask,
    Quota,
    ScopeLimits,
    Verdict,
    bounded,
    end_user_scope,
    whole_seconds,
)
from txgateway.observability.context import RequestContext, SpendFacts

__all__ = ["EXPIRY_MARGIN", "Governor", "Reservation", "duration_text", "end_user_of_scope", "user_limits"]

#: Seconds past a call's deadline its reservation lapses when never settled (C{[budgets] reservation_margin}).
EXPIRY_MARGIN = 5.0
#: The most (key, model) plans kept before they are made anew.
_MAX_PLANS = 10_000
#: The fewest completion tokens C{[budgets] when_short = cap} lets a call
#: have; a budget that pays for fewer refuses it.
MIN_CAPPED_COMPLETION = 16

_PER = {"day": "a day", "week": "a week", "month": "a month", "total": "in all"}


def _usd(nano: int) -> str:
    """Nano-dollars as dollars (C{$0.0010225}, C{$5.00}): to the nano-dollar, trailing zeros cut but two."""
    text = f"{nano / NANO_PER_USD:.9f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"

_REFUSALS = {
    BUDGET_EXCEEDED: errors.BUDGET_EXCEEDED,
    TOO_MANY_PARALLEL: errors.TOO_MANY_PARALLEL,
    RATE_LIMITED: errors.RATE_LIMITED,
    TOKENS_EXCEEDED: errors.TOKENS_EXCEEDED,
}


def duration_text(seconds: float) -> str:
    """A duration the way OpenAI's C{x-ratelimit-reset-*} headers write it: C{20ms}, C{1.5s}, C{6m0s}."""
    if seconds == 60.0:
        return "1m0s"  # a window whose newest entry is now: most answers
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest = math.ceil(rest * 1000) / 1000
    text = f"{rest:g}s"
    return f"{int(minutes)}m{text}" if minutes else text


def quota_headers(verdict: Verdict) -> list[tuple[bytes, bytes]]:
    """OpenAI's C{x-ratelimit-*} headers for the tightest quotas of C{verdict}."""
    headers = []
    for kind, quota in ((b"requests", verdict.requests), (b"tokens", verdict.tokens)):
        if quota is not None:
            headers += _quota_headers(kind, quota)
    return headers


def _quota_headers(kind: bytes, quota: Quota) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + kind, b"%d" % quota.limit),
        (b"x-ratelimit-remaining-" + kind, b"%d" % quota.remaining),
        (b"x-ratelimit-reset-" + kind, duration_text(quota.reset).encode("ascii")),
    ]


def scope_limits(key: ApiKey, team: TeamLimits | None, counts_tokens: bool) -> tuple[ScopeLimits, ...]:
    """
    The scopes a call of C{key} must fit: the key's, then its team's.
    Tokens and budgets count only where C{counts_tokens} (OpenAI calls).
    """
    scopes = [
        ScopeLimits(
            "key:" + key.name,
            key.tokens_per_minute if counts_tokens else None,
            key.requests_per_minute,
            usd_to_nano(key.budget_usd) if counts_tokens and key.budget_usd is not None else None,
            key.budget_period,
            key.max_parallel,
        )
    ]
    if team is not None:
        scopes.append(
            ScopeLimits(
                "team:" + team.name,
                team.tokens_per_minute if counts_tokens else None,
                team.requests_per_minute,
                usd_to_nano(team.budget_usd) if counts_tokens and team.budget_usd is not None else None,
                team.budget_period,
            )
        )
    return tuple(scopes)


def user_limits(key: ApiKey, end_user: str) -> ScopeLimits:
    """The scope of C{end_user}'s own allowance within C{key} (its budget renews with the key's)."""
    return ScopeLimits(
        end_user_scope(key.name, end_user),
        key.user_tokens_per_minute,
        key.user_requests_per_minute,
        usd_to_nano(key.user_budget_usd) if key.user_budget_usd is not None else None,
        key.budget_period,
    )


def end_user_of_scope(scope: str) -> tuple[str, str] | None:
    """The key and the end user of an end user's scope, or L{None} for a key's or team's."""
    if not scope.startswith(PASSING_SCOPE):
        return None
    key, _, end_user = scope[len(PASSING_SCOPE):].partition(":")
    return key, end_user


@attrs.frozen
class _Plan:
    """
    What every call of one key to one model (sent as the same models)
    reserves alike, made once: what its completion reserves when the
    request names no maximum, what each image counts, and the prices that
    price its worst case (the dearest of them).
    """

    default_completion: int
    image_tokens: int
    #: The distinct prices of the models sent (free ones left out).
    prices: tuple[ModelPrice, ...]

    def worst_cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """What C{prompt_tokens} and C{completion_tokens} cost at the dearest of the models, in nano-dollars."""
        return worst_cost(self.prices, prompt_tokens, completion_tokens)


@attrs.define(eq=False)
class Reservation:
    """
    One call's reservation, settled exactly once.

    @ivar prompt_estimate: the prompt tokens reserved (used again when no
        backend reported its usage).
    @ivar completion_cap: the completion tokens reserved.
    """

    governor: "Governor"
    ask: Ask
    key: ApiKey
    #: The OpenAI (or Messages) request; L{None}: a call whose tokens are not counted.
    model_call: Any
    prompt_estimate: int
    completion_cap: int
    #: A request the gateway does not read as a model call: what it is charged when
    #: answered (C{[service:NAME] request_price_usd}), and the name its spend is kept under.
    request_price: tuple[str, int] | None = None
    #: Until when the store holds it (its ask's expiry, moved on by each renewal).
    held_until: float = 0.0
    #: The end user the call is for (its spend is counted under them too), or L{None}.
    end_user: str | None = None
    settled: bool = False

    def settle(self, ctx: RequestContext, answered: int, relayed: Any, fallback_model: str | None) -> None:
        """
        Settle with the best evidence of what the call used: every
        backend's reported usage (a stream that did not end whole counted
        at least by the text it relayed); without any, a stream's relayed
        text plus the prompt estimate, or the whole reservation for an
        answer that was made but not read (a successful one whose usage
        could not be read, one whose client left while the backend worked
        on it); nothing when no backend was asked (or the answer came from
        the response cache).

        @param answered: the status the client was sent (0: none).
        @param relayed: what a stream relayed to the client (a
            L{txgateway.openai.relays.Transcript}: C{text_bytes},
            C{content_chunks}, C{finished}), or L{None}.
        @param fallback_model: the model to price an answer with no usage at.
        """
        if self.settled:
            return
        self.settled = True
        if relayed is not None and relayed.cut and ctx.completion is not None:
            ctx.completion.stream_cut = True
        self.governor.settle(self, ctx, self._uses(ctx, answered, relayed, fallback_model))

    def _uses(self, ctx: RequestContext, answered: int, relayed: Any, fallback_model: str | None) -> list[ModelUse]:
        if ctx.cache in ("hit", "coalesced"):
            return []  # no backend was asked for this answer: it costs nothing
        if self.request_price is not None:
            if not 200 <= answered < 300:
                return []
            name, price = self.request_price
            return [ModelUse(name, 0, 0, price)]
        if self.model_call is None:
            return []
        prices = self.governor.prices
        billed = ctx.completion.billed if ctx.completion is not None else []
        streamed = relayed_tokens(relayed.text_bytes, relayed.content_chunks) if relayed is not None else 0
        if billed:
            uses = [
                ModelUse(
                    model or "unknown", usage.prompt_tokens, usage.completion_tokens,
                    prices.of(model).cost_nano(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
                )
                for model, usage in billed
            ]
            if relayed is not None and relayed.cut:
                # Cut at the bound: the completion reserved, whatever the backend said of it.
                model, last = billed[-1]
                others = sum(use.completion_tokens for use in uses[:-1])
                completion = max(0, self.completion_cap - others)
                uses[-1] = ModelUse(
                    model or "unknown", last.prompt_tokens, completion,
                    prices.of(model).cost_nano(last.prompt_tokens, completion, last.cached_tokens),
                )
                return uses
            # Whole: the last answer said its usage and the client had all of it, in one
            # attempt (a resumed call's broken attempts said nothing of what they made).
            whole = billed[-1][1].final and (relayed is None or relayed.finished) and not ctx.completion.resumed
            if not whole:
                missing = streamed - sum(use.completion_tokens for use in uses)
                if missing > 0:
                    # The stream was cut before its usage said all: what the client had counts.
                    model = billed[-1][0] or "unknown"
                    uses.append(ModelUse(model, 0, missing, prices.of(model).cost_nano(0, missing)))
            return uses
        model = fallback_model or self.model_call.model or "unknown"
        if relayed is not None and relayed.cut:
            completion = self.completion_cap
        elif streamed:
            completion = streamed
        elif 200 <= answered < 300:
            completion = self.completion_cap  # answered, its usage unread
        elif answered == 0 and ctx.client_gone and ctx.attempts:
            # Its client left and no answer was read: a JSON answer the backend may have gone on
            # making (its whole reservation); a stream the backend stopped with its client.
            completion = 0 if self.model_call.stream else self.completion_cap
        else:
            return []
        return [ModelUse(model, self.prompt_estimate, completion, prices.of(model).cost_nano(self.prompt_estimate, completion))]


class Governor:
    """
    Governs the calls of API keys: what they may call, what they reserve,
    what they settle.

    @param keys: every key, by name.
    @param teams: every team, by name.
    @param reserve_completion_tokens: the completion tokens reserved for
        a model when a request names no maximum.
    @param expiry_margin: seconds past the call's deadline a reservation lapses.
    @param when_short: C{refuse} a call whose worst case is more than its
        budget has left, or C{cap} its completion to what is left.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: IGovernanceStore,
        keys: Sequence[ApiKey],
        teams: Mapping[str, TeamLimits],
        prices: Prices,
        reserve_completion_tokens: Callable[[str], int],
        metrics: Any,
        log: Any,
        expiry_margin: float = EXPIRY_MARGIN,
        image_tokens: Callable[[str], int] = lambda model: IMAGE_TOKENS,
        when_short: str = "refuse",
    ) -> None:
        if not IGovernanceStore.providedBy(store):
            raise TypeError(f"the governance store must provide IGovernanceStore, got {store!r}")
        self._clock = clock
        self.store = store
        self.keys = {key.name: key for key in keys}
        self.teams = dict(teams)
        self.prices = prices
        self._reserve_completion_tokens = reserve_completion_tokens
        self._image_tokens = image_tokens
        self._metrics = metrics
        self._log = log
        self._expiry_margin = expiry_margin
        #: C{[budgets] when_short}: C{refuse} a call whose worst case its budget cannot pay for, or C{cap} its completion.
        self._when_short = when_short
        #: How close to lapsing a running call's reservation is renewed, and for how long.
        self._renew_window = max(expiry_margin, 1.0)
        #: The reservations of calls still running, by id (renewed while they run).
        self._live: dict[str, Reservation] = {}
        self._renewal: Any = None
        #: The keys whose requests are read strictly and never relayed unaccounted:
        #: those with a limit or a model or service list, or in a team with a limit.
        self._governed = {
            key.name for key in keys if key.governed or (key.team is not None and key.team in self.teams and self.teams[key.team].governed)
        }
        self._unpriced: set[str] = set()
        #: The worst case of the last request asked of each key's and team's budget (the status page's
        #: bar says when what is left does not pay for another such request), in nano-dollars.
        self.worst_cases: dict[str, int] = {}
        #: (key, model, models sent) -> what such a call reserves alike: see L{_plan}.
        self._plans: dict[tuple, _Plan] = {}
        #: Reservation ids: this gateway's random prefix and a count (unique across gateways, cheap).
        self._ids = map(f"{secrets.token_hex(8)}-%d".__mod__, itertools.count())
        #: Each key's scopes, with tokens counted and without, and the names of those with a budget (made once, not per request).
        self._scopes = {}
        for key in keys:
            for counts in (True, False):
                scopes = scope_limits(key, self.teams.get(key.team) if key.team else None, counts)
                self._scopes[key.name, counts] = (scopes, tuple(limits.scope for limits in scopes if limits.budget_nano is not None))

    def key_of(self, ctx: RequestContext) -> ApiKey | None:
        """The key the request's caller presented, or L{None}."""
        return self.keys.get(ctx.caller.name) if ctx.caller is not None else None

    def governs(self, ctx: RequestContext) -> bool:
        """
        Whether the caller's key is governed (a limit, a model or service
        list, a team with a limit): its requests are read strictly and
        never relayed unaccounted.
        """
        caller = ctx.caller
        return caller is not None and caller.name in self._governed

    def check_model(self, ctx: RequestContext, model: str) -> None:
        """
        @raise GatewayError: C{model_not_allowed}, when the caller's key may not call C{model}.
        """
        key = self.key_of(ctx)
        if key is not None and not key.may_call_model(model):
            raise self._not_allowed(key, errors.MODEL_NOT_ALLOWED, f"the model {model!r}")

    def check_service(self, ctx: RequestContext, service: str) -> None:
        """
        @raise GatewayError: C{service_not_allowed}, when the caller's key may not call C{service}.
        """
        key = self.key_of(ctx)
        if key is not None and not key.may_call_service(service):
            raise self._not_allowed(key, errors.SERVICE_NOT_ALLOWED, f"the service {service!r}")

    def _not_allowed(self, key: ApiKey, kind: errors.ErrorKind, what: str) -> GatewayError:
        """The refusal of a call C{key} may not make (counted)."""
        self._refused(key, kind.type)
        return GatewayError(kind, f"the key {key.name!r} may not call {what}")

    async def reserve(
        self,
        request: Any,
        ctx: RequestContext,
        model_call: Any,
        models: list[str | None],
        deadline: float,
        completion_floor: int = 0,
        request_price: tuple[str, float] | None = None,
    ) -> Reservation | None:
        """
        Reserve the call's worst case for its caller's key (L{None}: the
        caller has no key), with OpenAI's C{x-ratelimit-*} headers on the
        answer.

        @param model_call: the OpenAI request, or a Messages request, which
            reads alike (L{None}: a call whose tokens are not counted).
        @param models: the model each target would be sent (the dearest prices the reservation).
        @param completion_floor: the most completion tokens a target is sent when the
            request names none (a translated call's C{max_tokens}): reserved at least.
        @param request_price: for a request that is not read as a model call, the name
            its spend is kept under and its price in US dollars (C{request_price_usd}).
        @raise GatewayError: a limit refuses the call; nothing was taken.
        """
        caller = ctx.caller
        key = self.keys.get(caller.name) if caller is not None else None
        if key is None:
            return None
        prompt = completion = cost = 0
        price = None
        if request_price is not None:  # its model (if any) was checked by the caller
            price = (request_price[0], usd_to_nano(request_price[1]))
            cost = price[1]
        elif model_call is not None:
            model = model_call.model
            plan = self._plans.get((key.name, model, *models))
            if plan is None:
                plan = self._plan(ctx, key, model, models)
            body = model_call.body
            prompt = estimate_prompt_tokens(body, plan.image_tokens)
            completion = completion_cap(body, model_call.generates, max(plan.default_completion, completion_floor))
            cost = plan.worst_cost(prompt, completion)
        now = self._clock.seconds()
        counted = model_call is not None or price is not None
        scopes, budget_scopes = self._scopes[key.name, counted]
        completion_facts = ctx.completion
        end_user = completion_facts.end_user if completion_facts is not None else None
        if end_user is not None and key.limits_users:
            # The end user's own allowance, taken together with the key's and the team's (all or none).
            scopes = (scopes[0], user_limits(key, end_user), *scopes[1:])
        ask = Ask(next(self._ids), scopes, prompt + completion, cost, now + deadline + self._expiry_margin)
        if cost:
            worst_cases = self.worst_cases
            for scope in budget_scopes:
                worst_cases[scope] = cost
        verdict = await self.store.reserve(ask)
        priced = models or [model_call.model if model_call is not None else None]
        if not verdict.allowed and verdict.reason == BUDGET_EXCEEDED and self._when_short == "cap" and price is None:
            capped = await self._capped(ask, verdict, model_call, priced, prompt, completion)
            if capped is not None:
                ask, verdict, model_call, completion = capped
                request.set_header(b"X-Gateway-Capped-Max-Tokens", b"%d" % completion)
        headers = quota_headers(verdict)
        if not verdict.allowed:
            raise self._refusal(key, verdict, ask, headers, priced, prompt, completion)
        for name, value in headers:
            request.set_header(name, value)
        ctx.spend = SpendFacts(key.name, key.team, ask.tokens)
        reservation = Reservation(self, ask, key, model_call, prompt, completion, price, ask.expires_at, end_user)
        self._live[ask.reservation_id] = reservation
        if self._renewal is None:
            self._renewal = self._clock.callLater(self._renew_window / 2, self._renew)
        return reservation

    async def _capped(
        self, ask: Ask, verdict: Verdict, model_call: Any, priced: list, prompt: int, completion: int,
    ) -> tuple[Ask, Verdict, Any, int] | None:
        """
        C{[budgets] when_short = cap}: the call let complete what its budget
        still pays for (at least L{MIN_CAPPED_COMPLETION} tokens), reserved
        anew; L{None} when that is too little, or does not fit either.
        """
        if model_call is None or not model_call.generates or verdict.left_nano is None:
            return None
        fits = self.affordable_completion(priced, prompt, completion, verdict.left_nano)
        if fits < MIN_CAPPED_COMPLETION or fits >= completion:
            return None
        capped = Ask(next(self._ids), ask.scopes, prompt + fits, self.prices.dearest(priced, prompt, fits), ask.expires_at)
        again = await self.store.reserve(capped)
        if not again.allowed:
            return None
        return capped, again, model_call.capped(fits), fits

    def affordable_completion(self, priced: list, prompt: int, completion: int, left_nano: int) -> int:
        """The most completion tokens (up to C{completion}) that, with the prompt, cost at most C{left_nano} at the dearest of C{priced}."""
        dearest = self.prices.dearest
        if dearest(priced, prompt, 0) > left_nano:
            return 0
        low, high = 0, completion
        while low < high:
            middle = (low + high + 1) // 2
            if dearest(priced, prompt, middle) <= left_nano:
                low = middle
            else:
                high = middle - 1
        return low

    def _renew(self) -> None:
        """
        Keep the reservations of calls still running from lapsing: those
        within the renewal window of their expiry get another two windows
        (a stream longer than its deadline keeps what it holds; a gateway
        that died stops renewing, and its reservations lapse within two
        windows).  Runs every half window while any call runs.
        """
        self._renewal = None
        if not self._live:
            return
        now = self._clock.seconds()
        due = [reservation for reservation in self._live.values() if reservation.held_until - now <= self._renew_window]
        if due:
            expires_at = now + 2 * self._renew_window
            for reservation in due:
                reservation.held_until = expires_at
            renewing = self.store.renew([reservation.ask.reservation_id for reservation in due], expires_at)
            if not renewing.called:
                renewing.addErrback(lambda failure: self._log.error("budgets_renew_failed", reason=failure.getErrorMessage()))
        self._renewal = self._clock.callLater(self._renew_window / 2, self._renew)

    def _plan(self, ctx: RequestContext, key: ApiKey, model: str | None, models: list[str | None]) -> _Plan:
        """
        What a call of C{key} to C{model} (sent as C{models}) reserves alike
        (L{_Plan}), once the key was found allowed to call it (made once per
        key and models; a model it may not call is refused each time).
        """
        if model is not None:
            self.check_model(ctx, model)
        self._say_unpriced(models or [model])
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()  # client-chosen model names ([model:*]) must not grow it without bound
        plan = self._plans[(key.name, model, *models)] = _Plan(
            self._reserve_completion_tokens(model or ""), self._image_tokens(model or ""),
            self.prices.distinct(models or [model]),
        )
        return plan

    def _refusal(
        self, key: ApiKey, verdict: Verdict, ask: Ask, headers: list[tuple[bytes, bytes]],
        priced: list, prompt: int, completion: int,
    ) -> GatewayError:
        """
        The refusal of C{ask} as C{verdict} says, telling the truth: what
        the request may cost or use, what is left, and what helps (a wait
        only where waiting does: a short one while requests in flight hold
        what it needs; a lower C{max_tokens} where that fits now).
        """
        reason = verdict.reason
        self._refused(key, reason)
        retry_after = whole_seconds(verdict.retry_after)
        if retry_after is not None:
            headers.insert(0, (b"Retry-After", b"%d" % retry_after))
        scope = verdict.scope or ""
        user = end_user_of_scope(scope)
        if user is not None:
            whose = f"the end user {user[1]!r} of the key {key.name!r}"
        else:
            whose = f"the team {scope[5:]!r}" if scope.startswith("team:") else f"the key {key.name!r}"
        if reason == BUDGET_EXCEEDED:
            message = self._budget_refusal(verdict, ask, whose, retry_after, priced, prompt, completion)
            if not verdict.in_flight:
                # The official OpenAI SDKs honour it: a budget that only a renewal (or nothing) helps is not retried.
                headers.append((b"x-should-retry", b"false"))
        elif reason == TOO_MANY_PARALLEL:
            message = f"{whose} has as many requests in flight as it may"
        elif reason == RATE_LIMITED:
            message = f"{whose} has made as many requests this minute as it may; retry in {retry_after} s"
        elif retry_after is None:
            message = f"the request may use {ask.tokens} tokens, more than {whose} may use in a minute; lower max_tokens"
        elif verdict.in_flight:
            message = (f"the request may use {ask.tokens} tokens, more than {whose} has left this minute while its"
                       f" requests in flight hold the rest; retry in {retry_after} s, when they have settled")
        else:
            message = f"the request may use {ask.tokens} tokens, more than {whose} has left this minute; retry in {retry_after} s"
        return GatewayError(_REFUSALS[reason], message, headers=tuple(headers))

    def _budget_refusal(
        self, verdict: Verdict, ask: Ask, whose: str, retry_after: int | None, priced: list, prompt: int, completion: int,
    ) -> str:
        limits = next((limits for limits in ask.scopes if limits.scope == verdict.scope), None)
        budget = limits.budget_nano if limits is not None else None
        left = verdict.left_nano if verdict.left_nano is not None else 0
        worst = f"the request may cost up to {_usd(ask.cost_nano)}"
        if completion:
            worst += f" ({prompt} prompt tokens and up to {completion} completion tokens, at the dearest price of its models)"
        if budget is not None and ask.cost_nano > budget:
            said = f"{worst}, more than the whole budget of {whose} ({_usd(budget)} {_PER[limits.budget_period]})"
        elif verdict.in_flight:
            said = (f"{worst}, more than {whose} has left of its budget now ({_usd(left)}): its requests in flight"
                    f" hold the rest until they settle; retry in {retry_after} s")
        else:
            renews = f"; it renews in {retry_after} s" if retry_after is not None else ""
            said = f"{worst}, more than {whose} has left of its budget ({_usd(left)}){renews}"
        if completion:
            fits = self.affordable_completion(priced, prompt, completion, left)
            if fits > 0:
                return f"{said}; or set max_tokens to at most {fits}, which it can pay for now"
            return f"{said}; even its prompt costs more than is left"
        return said

    def _refused(self, key: ApiKey, reason: str) -> None:
        self._metrics.count_refusal(key.name, reason)

    def _say_unpriced(self, models: list[str | None]) -> None:
        for model in models:
            if model is not None and model not in self._unpriced and not self.prices.priced(model):
                self._unpriced.add(model)
                self._log.warning("model_unpriced", model=model, cost="0: no [price:MODEL] or [price:*] section")

    def settle(self, reservation: Reservation, ctx: RequestContext, uses: list[ModelUse]) -> None:
        """Hand C{reservation}'s settlement to the store; count it on the access line and in the metrics."""
        # The renewal's timer is left to run out when nothing is live (it then stops by itself):
        # cancelled here and made again by the next reserve, it cost a timer a request or so.
        self._live.pop(reservation.ask.reservation_id, None)
        key = reservation.key
        team = key.team or ""
        count_spend = self._metrics.count_spend
        counted = []
        tokens = cost = 0
        for use in uses:
            # Whatever a backend reported, what is counted is within the ledgers' bounds.
            prompt = bounded(use.prompt_tokens, TOKENS_BOUND)
            completion = bounded(use.completion_tokens, TOKENS_BOUND)
            nano = bounded(use.cost_nano, NANO_BOUND)
            # bounded() gives back an int within bounds itself: any other value (a float, one out of bounds) is made anew.
            if prompt is not use.prompt_tokens or completion is not use.completion_tokens or nano is not use.cost_nano:
                use = ModelUse(use.model, prompt, completion, nano)
            counted.append(use)
            tokens += prompt + completion
            cost += nano
            count_spend(key.name, team, use.model, nano / NANO_PER_USD, prompt, completion)
        if reservation.request_price is None and reservation.model_call is not None and reservation.model_call.generates:
            over = self._over_bound(reservation, ctx)
            if over is not None:
                self._metrics.count_over_bound(key.name, over)
                self._log.warning("completion_over_bound", key=key.name, how=over, reserved=reservation.completion_cap)
        billed = ctx.completion.billed if ctx.completion is not None else ()
        for _, usage in billed:
            if usage.clamped:
                reported = [(model, usage.prompt_tokens, usage.completion_tokens) for model, usage in billed]
                self._log.warning("usage_clamped", key=key.name, reason="a backend reported a token count out of bounds", used=reported)
                self._metrics.count_clamped_usage(key.name)
                break
        if ctx.spend is not None:
            ctx.spend.cost_usd = cost / NANO_PER_USD
        if reservation.end_user is not None and counted:
            self._metrics.count_end_user_spend(key.name, reservation.end_user, cost, tokens)
        settling = self.store.settle(
            reservation.ask, Settled(key.name, key.team, tokens, cost, tuple(counted), reservation.end_user),
        )
        if not settling.called:  # a store in this process has settled already
            settling.addErrback(lambda failure: self._log.error("budgets_settle_failed", key=key.name, reason=failure.getErrorMessage()))

    @staticmethod
    def _over_bound(reservation: Reservation, ctx: RequestContext) -> str | None:
        """
        How a call went past the completion it reserved (a backend that
        ignores C{max_tokens}): C{stream_cut} (the gateway cut its stream at
        the bound), C{json_over} (a JSON answer reported more; it is
        settled at what it reported), or L{None}.
        """
        completion = ctx.completion
        if completion is None:
            return None
        if completion.stream_cut:
            return "stream_cut"
        reported = sum(usage.completion_tokens for _, usage in completion.billed)
        return "json_over" if not completion.stream and reported > reservation.completion_cap else None

    def scopes(self) -> list[ScopeLimits]:
        """Every key's and team's scope, for the operator's view."""
        scopes = [scope_limits(key, None, True)[0] for key in self.keys.values()]
        scopes += [
            ScopeLimits("team:" + team.name, team.tokens_per_minute, team.requests_per_minute,
                        usd_to_nano(team.budget_usd) if team.budget_usd is not None else None, team.budget_period)
            for team in self.teams.values()
        ]
        return scopes
