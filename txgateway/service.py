"""
Putting a gateway together: L{build_gateway} from parts (what tests use,
with a L{Clock} and in-memory agents), and L{GatewayService}, the twistd
service that builds those parts from a real reactor, drains on stop and
reloads gateway.ini on SIGHUP.
"""

from __future__ import annotations

import random
import signal
import sys
from typing import IO, Any, Callable, Mapping

import structlog
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent

from txgateway.app import Gateway, GatewayRoot
from txgateway.breaker import CircuitBreaker
from txgateway.broker import ServiceBroker, ServiceRoute
from txgateway.config import ConfigError, GatewayConfig, ServiceConfig, load_config
from txgateway.logs import TwistedJsonObserver, configure_logging, open_sink
from txgateway.metrics import GatewayMetrics
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.limiter import RateLimiter
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.site import GatewaySite
from txgateway.upstream import pooled_agent

__all__ = ["GatewayService", "build_gateway", "build_routes", "build_site"]

#: Idle keep-alive connections kept per backend host (not a concurrency cap).
POOL_IDLE_CONNECTIONS = 64
#: Seconds an idle pooled connection is kept before it is closed.
POOL_IDLE_SECONDS = 60


def build_routes(
    config: GatewayConfig,
    clock: IReactorTime,
    agent_for: Callable[[ServiceConfig], IAgent],
    log: Any,
    metrics: GatewayMetrics,
    previous: Mapping[str, ServiceRoute] | None = None,
) -> dict[str, ServiceRoute]:
    """
    One route (breaker and agent) per service.  A service whose URL is the
    same as in C{previous} keeps its breaker, with its state, and its agent.
    """

    def transitioned(service: str, from_state: str, to_state: str) -> None:
        metrics.circuit_transitions.labels(service, from_state, to_state).inc()

    routes = {}
    for name, service in config.services.items():
        kept = (previous or {}).get(name)
        if kept is not None and kept.config.url == service.url:
            kept.breaker.retune(service.breaker_threshold, service.breaker_cooldown)
            routes[name] = ServiceRoute(config=service, agent=kept.agent, breaker=kept.breaker)
        else:
            breaker = CircuitBreaker(
                name, clock, service.breaker_threshold, service.breaker_cooldown, log, transitioned
            )
            routes[name] = ServiceRoute(config=service, agent=agent_for(service), breaker=breaker)
    return routes


def build_gateway(
    config: GatewayConfig,
    clock: IReactorTime,
    agent_for: Callable[[ServiceConfig], IAgent],
    store: IRateLimitStore | None,
    log: Any,
    rng: random.Random | None = None,
    metrics: GatewayMetrics | None = None,
    previous: Gateway | None = None,
) -> Gateway:
    """
    Assemble a gateway from its parts: the routes, the broker, and the rate
    limiter on C{store}.  With C{previous} (a reload), unchanged services
    keep their breakers and connections, and the uptime goes on.
    """
    metrics = metrics or (previous.metrics if previous is not None else GatewayMetrics())
    routes = build_routes(config, clock, agent_for, log, metrics, previous.broker.routes if previous else None)
    limiter = RateLimiter.from_config(config.ratelimit, store) if store is not None else None
    broker = ServiceBroker(clock, routes, limiter, rng, metrics)
    started_at = previous.started_at if previous is not None else None
    return Gateway(config, clock, broker, store, log, metrics, started_at)


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
    The daemon: listens on C{[gateway] listen} and proxies to the services.

    On stop it turns not-ready, stops listening, lets the requests in flight
    finish for up to C{drain_timeout}, then closes its upstream connections
    and timers.  L{reload} (SIGHUP) swaps in a new configuration.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        stdout: IO[str] | None = None,
        clock: IReactorTime | None = None,
        config_path: str | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        # The gateway's own timers (timeouts, backoff, breakers, buckets) run
        # on clock; connections and the site's timers on the reactor.
        self._clock = reactor if clock is None else clock
        self._stdout = sys.stdout if stdout is None else stdout
        self._config_path = config_path
        self.sink = open_sink(config.logging.file, self._stdout)
        configure_logging(self.sink, config.logging.level)
        self.log = structlog.get_logger("txgateway").bind()  # concrete: binding per request is cheap
        self._pools: dict[str, HTTPConnectionPool] = {}
        self._stopping = False
        store = self._rate_limit_store(config)
        self.gateway = build_gateway(config, self._clock, self._agent_for, store, self.log)
        self.site = build_site(self.gateway, reactor)
        self.root: GatewayRoot = self.site.resource
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
        self._pools[service.url] = pool
        return pooled_agent(self._reactor, pool)

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
        if self._config_path is not None and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.reload))
        self.log.info(
            "gateway_started",
            listen=config.gateway.listen,
            config=config.source,
            services={name: service.url for name, service in config.services.items()},
        )

    # -- reload

    def reload(self) -> bool:
        """
        Re-read gateway.ini; a valid configuration replaces the running one
        for new requests (requests in flight finish on the old), an invalid
        one is logged and ignored.  Returns whether it was applied.
        """
        if self._stopping:
            return False
        try:
            config = load_config(self._config_path)
        except ConfigError as error:
            self.log.error("config_reload_rejected", reason=str(error), config=self._config_path)
            return False
        return self.apply(config)

    def apply(self, config: GatewayConfig) -> bool:
        """Swap in C{config} (see L{reload})."""
        old = self.gateway
        if config.gateway.listen != old.config.gateway.listen:
            self.log.warning(
                "config_reload_listen_unchanged",
                reason="a new listen endpoint needs a restart; still listening as before",
                listen=old.config.gateway.listen,
            )
        if config.logging != old.config.logging:
            try:
                sink = open_sink(config.logging.file, self._stdout)
            except OSError as error:
                self.log.error("config_reload_rejected", reason=f"[logging] file: {error}")
                return False
            old_sink, self.sink = self.sink, sink
            configure_logging(self.sink, config.logging.level)
            self.log = structlog.get_logger("txgateway").bind()  # concrete: binding per request is cheap
            old_sink.close()
        store = old.store
        if config.ratelimit != old.config.ratelimit:
            store = self._rate_limit_store(config)
        gateway = build_gateway(config, self._clock, self._agent_for, store, self.log, previous=old)
        gateway.accepting = old.accepting
        self.site.max_body_size = config.gateway.max_body_size
        self.site.header_timeout = config.gateway.header_timeout
        self.site.timeOut = config.gateway.client_idle_timeout
        self.root.use(gateway)
        self.gateway = gateway
        self._retire(old, gateway)
        changed = sorted(
            name
            for name in set(config.services) | set(old.config.services)
            if config.services.get(name) != old.config.services.get(name)
        )
        self.log.info("config_reloaded", config=config.source, services_changed=changed)
        return True

    def _retire(self, old: Gateway, new: Gateway) -> None:
        """Release what the old configuration had and the new one does not use."""
        kept_breakers = {id(route.breaker) for route in new.broker.routes.values()}
        for route in old.broker.routes.values():
            if id(route.breaker) not in kept_breakers:
                route.breaker.stop()
        used_urls = {route.config.url for route in new.broker.routes.values()}
        for url in [url for url in self._pools if url not in used_urls]:
            # Only idle connections close; requests in flight finish first.
            self._pools.pop(url).closeCachedConnections()
        if old.store is not None and old.store is not new.store:
            old.store.close()

    # -- stop

    def stopService(self) -> Deferred:
        self._stopping = True
        self.gateway.accepting = False
        self.log.info("gateway_stopping", in_flight=self.root.in_flight)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()  # the listener stops accepting
        await self._drain(self.gateway.config.gateway.drain_timeout)
        for route in self.gateway.broker.routes.values():
            route.breaker.stop()
        await DeferredList([pool.closeCachedConnections() for pool in self._pools.values()])
        if self.gateway.store is not None:
            await self.gateway.store.close()
        self.log.info("gateway_stopped")

    async def _drain(self, timeout: float) -> None:
        """Wait for the requests in flight, for C{timeout} seconds at most."""
        if self.root.in_flight == 0:
            return
        self.log.info("gateway_draining", in_flight=self.root.in_flight, drain_timeout=timeout)
        idle = self.root.wait_until_idle()
        idle.addTimeout(timeout, self._clock)
        try:
            await idle
        except Exception:
            self.log.warning("gateway_drain_timeout", cut=self.root.in_flight, drain_timeout=timeout)
        else:
            self.log.info("gateway_drained")
