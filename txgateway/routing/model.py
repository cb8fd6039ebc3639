"""
The routing model: a service's endpoints (each a backend instance with its
connections, breaker and balancing figures), a service's route (its
endpoints, retry policy and balancer), and a target (a route with the
model name sent to it).
"""

from __future__ import annotations

import math
from typing import AbstractSet

import attrs

from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.client import IUpstream
from txgateway.resilience.breaker import OPEN, Admission, CircuitBreaker
from txgateway.resilience.retry import RetryPolicy
from txgateway.routing.balance import Balancer
from txgateway.routing.lease import InFlight, Retrying

__all__ = ["Admitted", "Backend", "ServiceRoute", "Target"]


def _policy_of(route: "ServiceRoute") -> RetryPolicy:
    c = route.config
    return RetryPolicy(c.retries, c.retry_delay, c.retry_multiplier, c.retry_max_delay, c.retry_jitter)


@attrs.define(eq=False)
class Backend:
    """
    One backend instance of a service: its URL, its connections, its
    breaker, and what balancing reads (requests in flight, the decayed time
    to headers).
    """

    url: str
    upstream: IUpstream
    breaker: CircuitBreaker
    #: Attempts in flight; changed only by L{lease}'s leases.
    in_flight: int = 0
    ttfb: float | None = None

    def may_admit(self) -> bool:
        """Whether the breaker may let an attempt through (closed, or a trial may be free)."""
        return self.breaker.may_admit()

    def lease(self) -> InFlight:
        """One attempt's slot in L{in_flight}, given back exactly once."""
        return InFlight(self)

    def trial_in(self) -> float:
        """Seconds until the breaker allows a trial (0 when it may admit now)."""
        status = self.breaker.status()
        return (status.trial_in or 0.0) if status.state == OPEN else 0.0


@attrs.define  # not frozen: made per attempt, and a frozen class's init costs twice as much
class Admitted:
    """An endpoint an attempt may go to, and its breaker's admission (settled exactly once)."""

    endpoint: Backend
    admission: Admission


def _balancer_of(route: "ServiceRoute") -> Balancer:
    return Balancer(route.config.balance)


@attrs.define
class ServiceRoute:
    """
    Everything the broker needs about one service: its endpoints in config
    order; the retry policy and the balancer are made once, from the config.
    """

    config: ServiceConfig
    endpoints: list[Backend]
    policy: RetryPolicy = attrs.field(default=attrs.Factory(_policy_of, takes_self=True))
    balancer: Balancer = attrs.field(default=attrs.Factory(_balancer_of, takes_self=True))
    #: Requests of the service in flight, and those of them that are retrying (the
    #: retry budget's inputs); changed only by leases (L{lease}, L{retrying_lease}).
    in_flight: int = 0
    retrying: int = 0

    def lease(self) -> InFlight:
        """A request's slot in L{in_flight} while it is on this service."""
        return InFlight(self)

    def retrying_lease(self) -> Retrying:
        """A request's slot in L{retrying} once it retries."""
        return Retrying(self)

    @property
    def breaker(self) -> CircuitBreaker:
        """The first endpoint's breaker (a service's only one, when it has one URL)."""
        return self.endpoints[0].breaker

    def choose(
        self, request_id: str, avoid: Backend | None, excluded: AbstractSet[Backend] = frozenset()
    ) -> Admitted | None:
        """
        The endpoint an attempt goes to, with its breaker's admission; not
        C{avoid} (the one that just failed) while another admits, never one
        of C{excluded}.  L{None} when no endpoint admits.
        """
        endpoints = self.endpoints
        if excluded:
            endpoints = [endpoint for endpoint in endpoints if endpoint not in excluded]
        candidates = endpoints if len(endpoints) < 2 else self.balancer.order(endpoints, avoid)
        for endpoint in candidates:
            admission = endpoint.breaker.admit(request_id)
            if admission.allowed:
                return Admitted(endpoint, admission)
        return None

    def retry_after(self) -> int:
        """Whole seconds until the soonest trial of any endpoint (at least 1)."""
        return max(1, math.ceil(min(endpoint.trial_in() for endpoint in self.endpoints)))

    def any_may_admit(self, excluded: AbstractSet[Backend] = frozenset()) -> bool:
        """Whether some endpoint (not one of C{excluded}) may let an attempt through."""
        return any(endpoint.may_admit() for endpoint in self.endpoints if endpoint not in excluded)


@attrs.frozen
class Target:
    """
    One place a request may be served: a service's route (for a model, a
    deployment's: its own breakers) and the C{model} sent to it (L{None}:
    the body goes as the client sent it).
    """

    route: ServiceRoute
    model: str | None = None

    @property
    def label(self) -> str:
        """How logs and headers name it: C{service}, or C{service:model}."""
        name = self.route.config.name
        return name if self.model is None else f"{name}:{self.model}"
