"""
Putting a gateway together: L{build_gateway} from parts (what tests use,
with a L{Clock} and in-memory agents), and L{GatewayService}, the twistd
service that builds those parts from a real reactor.
"""

from __future__ import annotations

import random
import sys
from typing import IO, Any, Callable

import structlog
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from txgateway.app import Gateway, GatewayRoot
from txgateway.breaker import CircuitBreaker
from txgateway.broker import ServiceBroker, ServiceRoute
from txgateway.config import GatewayConfig, ServiceConfig
from txgateway.logs import TwistedJsonObserver, configure_logging, open_sink
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.limiter import RateLimiter
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.site import GatewaySite

__all__ = ["GatewayService", "build_gateway", "build_site"]

#: Idle keep-alive connections kept per backend host (not a concurrency cap).
POOL_IDLE_CONNECTIONS = 64
#: Seconds an idle pooled connection is kept before it is closed.
POOL_IDLE_SECONDS = 60


def build_gateway(
    config: GatewayConfig,
    clock: IReactorTime,
    agent_for: Callable[[ServiceConfig], IAgent],
    store: IRateLimitStore | None,
    log: Any,
    rng: random.Random | None = None,
) -> Gateway:
    """
    Assemble a gateway from its parts: one breaker and one agent per
    service, the broker, and the rate limiter on C{store}.
    """
    routes = {
        name: ServiceRoute(
            config=service,
            agent=agent_for(service),
            breaker=CircuitBreaker(name, clock, service.breaker_threshold, service.breaker_cooldown, log),
        )
        for name, service in config.services.items()
    }
    limiter = RateLimiter.from_config(config.ratelimit, store) if store is not None else None
    broker = ServiceBroker(clock, routes, limiter, rng)
    return Gateway(config, clock, broker, store, log)


def build_site(gateway: Gateway, reactor: Any = None) -> GatewaySite:
    """The HTTP site serving C{gateway}; its connection timers run on C{reactor}."""
    settings = gateway.config.gateway
    return GatewaySite(
        GatewayRoot(gateway),
        max_body_size=settings.max_body_size,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.client_idle_timeout,
        log=gateway.log,
        reactor=reactor,
    )


class GatewayService(MultiService):
    """
    The daemon: listens on C{[gateway] listen}, proxies to the services,
    and on stop turns not-ready, stops listening and closes its upstream
    connections and timers.
    """

    def __init__(
        self, config: GatewayConfig, reactor: Any, stdout: IO[str] | None = None, clock: IReactorTime | None = None
    ) -> None:
        super().__init__()
        self._reactor = reactor
        # The gateway's own timers (timeouts, backoff, breakers, buckets) run
        # on clock; connections and the site's timers on the reactor.
        self._clock = reactor if clock is None else clock
        self.sink = open_sink(config.logging.file, sys.stdout if stdout is None else stdout)
        configure_logging(self.sink, config.logging.level)
        self.log = structlog.get_logger("txgateway")
        self._pools: list[HTTPConnectionPool] = []
        store = self._rate_limit_store(config)
        self.gateway = build_gateway(config, self._clock, self._agent_for, store, self.log)
        self.site = build_site(self.gateway, reactor)
        strports.service(config.gateway.listen, self.site, reactor=reactor).setServiceParent(self)

    def _rate_limit_store(self, config: GatewayConfig) -> IRateLimitStore:
        settings = config.ratelimit
        if settings.backend == "redis":
            from txgateway.ratelimit.redis import connect_redis

            return connect_redis(
                settings.redis_url, self._clock, settings.redis_timeout, settings.redis_retry_interval, self.log
            )
        return MemoryRateLimitStore(self._clock)

    def _agent_for(self, service: ServiceConfig) -> IAgent:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = POOL_IDLE_CONNECTIONS
        pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
        self._pools.append(pool)
        return Agent(self._reactor, pool=pool)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd asks its application for a log observer before it starts
        # logging: offering ours keeps every line of output JSON.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(
                ILogObserver, TwistedJsonObserver(self.sink, self.gateway.config.logging.level)
            )

    def startService(self) -> None:
        super().startService()
        config = self.gateway.config
        self.log.info(
            "gateway_started",
            listen=config.gateway.listen,
            config=config.source,
            services={name: service.url for name, service in config.services.items()},
        )

    def stopService(self) -> Deferred:
        self.gateway.accepting = False
        self.log.info("gateway_stopping")
        stopped = Deferred.fromCoroutine(self._stop())
        return stopped

    async def _stop(self) -> None:
        await super().stopService()
        for route in self.gateway.broker.routes.values():
            route.breaker.stop()
        await DeferredList([pool.closeCachedConnections() for pool in self._pools])
        if self.gateway.store is not None:
            await self.gateway.store.close()
        self.log.info("gateway_stopped")
