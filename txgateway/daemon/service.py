"""
Putting a gateway together: L{build_gateway} from parts (what tests use,
with a L{Clock} and in-memory upstreams), L{build_server_factory} (the data
plane's listener), and L{GatewayService}, the twistd service that builds
those parts from a real reactor, drains on stop and reloads gateway.ini on
SIGHUP.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import random
import signal
import sys
from typing import IO, Any, Callable, Iterator, Mapping

import structlog
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from txgateway.admin.api import AdminListener
from txgateway.admin.control import AdminControl
from txgateway.admin.registry import Registry, overlaid
from txgateway.admin.store import IAdminStore, SqliteAdminStore, connect_admin_store

from txgateway.anthropic import speakers as anthropic_speakers
from txgateway.cache.responses import ResponseCache
from txgateway.cache.stores import ICacheStore, MemoryCacheStore, connect_cache
from txgateway.config.gateway import ConfigError, GatewayConfig, ServiceConfig, load_config
from txgateway.daemon.openfiles import connections_for
from txgateway.dataplane.client import IUpstream, UpstreamPool
from txgateway.dataplane.server import HTTPServerFactory
from txgateway.front.door import OPERATOR_READS, GatewayFront
from txgateway.front.gateway import Gateway
from txgateway.governance.estimate import Prices
from txgateway.governance.governor import Governor
from txgateway.governance.interface import IGovernanceStore
from txgateway.governance.local import LocalLedgerStore
from txgateway.governance.spendfile import SpendFile
from txgateway.responses.conversations import Conversations
from txgateway.responses.store import IResponseStore, MemoryResponseStore, SqliteResponseStore, connect_response_store
from txgateway.observability.export import OTLPHttpPost, SpanExport
from txgateway.observability.logs import AccessLog, LogDestination, TwistedJsonObserver, open_sink
from txgateway.observability.metrics import GatewayMetrics
from txgateway.openai import speaker as openai_speaker
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.ratelimit.limiter import RateLimiter
from txgateway.ratelimit.memory import MemoryRateLimitStore
from txgateway.resilience.breaker import CircuitBreaker
from txgateway.routing.broker import ServiceBroker
from txgateway.routing.deployments import ModelTable
from txgateway.routing.model import Backend, ServiceRoute
from txgateway.responses import speakers as responses_speakers
from txgateway.speaking import PlainHttp, Speakers
from txgateway.workers.listen import ReusePortListener, listen_address
from txgateway.workers.shared import BatchedCalls, SharedLedgerStore, SharedRateLimitStore

__all__ = ["GatewayService", "build_gateway", "build_routes", "build_server_factory"]

#: Idle keep-alive connections kept per backend host (not a concurrency cap).
POOL_IDLE_CONNECTIONS = 64
#: Seconds an idle pooled connection is kept before it is closed.
POOL_IDLE_SECONDS = 60
#: Seconds a worker waits for the supervisor's answer before deciding alone.
SUPERVISOR_TIMEOUT = 1.0


def build_routes(
    config: GatewayConfig,
    clock: IReactorTime,
    upstream_for: Callable[[ServiceConfig, str], IUpstream],
    log: Any,
    metrics: GatewayMetrics,
    previous: Mapping[str, ServiceRoute] | None = None,
    circuits: Any = None,
) -> dict[str, ServiceRoute]:
    """
    One route per service, with an endpoint (breaker and upstream) per URL
    of its C{url}.  An endpoint whose service and URL were in C{previous}
    keeps its breaker, with its state, and its upstream with its
    connections.  With C{circuits} (a worker's
    L{txgateway.workers.shared.CircuitShare}), each breaker is registered
    there and its transitions told to it.
    """
    routes = {}
    for name, service in config.services.items():
        before = (previous or {}).get(name)
        kept = {endpoint.url: endpoint for endpoint in before.endpoints} if before is not None else {}
        endpoints = []
        for url in service.endpoint_urls:
            endpoint = kept.get(url)
            if endpoint is not None:
                endpoint.breaker.retune(service.breaker_threshold, service.breaker_cooldown)
            else:
                breaker = CircuitBreaker(
                    name,
                    clock,
                    service.breaker_threshold,
                    service.breaker_cooldown,
                    log,
                    functools.partial(_transitioned, metrics, circuits, url),
                    endpoint=url if len(service.endpoint_urls) > 1 else None,
                    on_count=functools.partial(circuits.counted, name, url) if circuits is not None else None,
                )
                if circuits is not None:
                    circuits.register(name, url, breaker)
                endpoint = Backend(url, upstream_for(service, url), breaker)
            endpoints.append(endpoint)
        routes[name] = ServiceRoute(config=service, endpoints=endpoints)
    return routes


@contextlib.contextmanager
def _one_line_when_the_port_is_taken(config: GatewayConfig) -> Iterator[None]:
    """
    A listener that cannot listen (the port is taken, or not ours) ends the
    daemon with one line naming the endpoint and the error, and exit
    status 1, like a configuration error (not twistd's 41-line traceback).
    """
    try:
        yield
    except CannotListenError as error:
        reason = error.socketError.strerror if getattr(error.socketError, "strerror", None) else error.socketError
        raise SystemExit(
            f"txgateway: cannot listen: {config.source}: [gateway] listen = {config.gateway.listen}: {reason}"
        ) from None


def _every_endpoint(gateway: Gateway) -> list[Backend]:
    """The endpoints of every service and of every model's deployment, each with its breaker."""
    routes = [*gateway.broker.routes.values(), *gateway.broker.models.deployments()]
    return [endpoint for route in routes for endpoint in route.endpoints]


def _transitioned(
    metrics: GatewayMetrics,
    circuits: Any,
    endpoint: str,
    service: str,
    from_state: str,
    to_state: str,
    reason: str,
    request_id: str | None,
) -> None:
    metrics.circuit_transition(endpoint, service, from_state, to_state, reason, request_id)
    if circuits is not None:
        circuits.transitioned(service, endpoint, to_state, reason)



def every_speaker() -> Speakers:
    """Every API the gateway speaks (a service's C{api}) and the speakers of each pair of them the API packages provide."""
    # In the order an /api/ path is read: the Responses API before OpenAI's others.
    apis = [PlainHttp(), responses_speakers.RESPONSES_API, openai_speaker.OPENAI, anthropic_speakers.MESSAGES_API]
    return Speakers(
        {api.name: api for api in apis},
        {**openai_speaker.PAIRS, **anthropic_speakers.PAIRS, **responses_speakers.PAIRS},
    )


def build_gateway(
    config: GatewayConfig,
    clock: IReactorTime,
    upstream_for: Callable[[ServiceConfig, str], IUpstream],
    store: IRateLimitStore | None,
    log: Any,
    metrics: GatewayMetrics,
    access_log: AccessLog,
    rng: random.Random | None = None,
    previous: Gateway | None = None,
    cache_stores: Mapping[str, ICacheStore] | None = None,
    governance_store: IGovernanceStore | None = None,
    spans: Any = None,
    peers: Any = None,
    response_store: IResponseStore | None = None,
    admin: Any = None,
) -> Gateway:
    """
    Assemble a gateway from its parts: the routes, the broker, the rate
    limiter on C{store}, and the governor of API keys on
    C{governance_store} (a ledger in memory when the configuration governs
    keys and none is given).  With C{previous} (a reload), unchanged
    services keep their breakers and connections, and the uptime goes on.
    With C{peers} (a worker's L{txgateway.workers.link.SupervisorLink}),
    circuits open across workers and the operator's documents are the daemon's.
    With C{response_store}, the gateway holds Responses conversations in it.
    With C{admin} (an L{AdminControl}), it serves the admin API.
    """
    circuits = peers.circuits if peers is not None else None
    routes = build_routes(
        config, clock, upstream_for, log, metrics, previous.broker.routes if previous else None, circuits
    )
    limiter = RateLimiter.from_config(config.ratelimit, store) if store is not None else None

    def deployment_breaker(service: ServiceConfig, url: str, model: str) -> CircuitBreaker:
        where = f"{url} model={model}"
        breaker = CircuitBreaker(
            service.name, clock, service.breaker_threshold, service.breaker_cooldown, log,
            functools.partial(_transitioned, metrics, circuits, where), endpoint=where,
        )
        if circuits is not None:
            circuits.register(service.name, where, breaker)
        return breaker

    models = ModelTable(config.models, routes, deployment_breaker, previous.broker.models if previous else None)
    if cache_stores is None:
        cache_stores = memory_cache_store(config, clock, metrics)
    cache = None
    if any(service.cache != "off" for service in config.services.values()):
        cache = ResponseCache(clock, dict(cache_stores), metrics, config.cache.max_entry_bytes)
    governor = None
    if config.governed:
        if governance_store is None:
            governance_store = LocalLedgerStore(clock, None, maybeDeferred, log)
        governor = Governor(
            clock, governance_store, config.auth.keys, config.teams, Prices(config.prices),
            config.reserve_completion_tokens, metrics, log, config.budgets.reservation_margin,
            image_tokens=config.image_tokens, when_short=config.budgets.when_short,
        )
    broker = ServiceBroker(clock, routes, limiter, metrics, rng, models, cache, every_speaker(), governor)
    started_at = previous.started_at if previous is not None else None
    gateway = Gateway(
        config, clock, broker, store, log, metrics, access_log, started_at, spans, config.tracing.sample_ratio, rng,
    )
    gateway.peers = peers
    gateway.admin = admin
    if response_store is not None:
        settings = config.responses
        gateway.conversations = Conversations(response_store, clock, settings.ttl, settings.max_response_bytes, log)
    return gateway


def state_file_of(config: GatewayConfig) -> str:
    """The SQLite file of C{[budgets]}: C{state_file}, else C{state/txgateway.db} beside the log directory."""
    if config.budgets.state_file:
        return config.budgets.state_file
    log_directory = os.path.dirname(config.logging.file) if config.logging.file else ""
    return os.path.join(os.path.dirname(log_directory) or ".", "state", "txgateway.db")


def response_file_of(config: GatewayConfig) -> str:
    """The SQLite file of C{[responses]}: C{state_file}, else C{responses.db} beside the budgets' state file."""
    if config.responses.state_file:
        return config.responses.state_file
    return os.path.join(os.path.dirname(state_file_of(config)), "responses.db")


def open_spend_file(config: GatewayConfig) -> SpendFile:
    """
    The SQLite file of settled spend (L{state_file_of}).

    @raise ConfigError: it cannot be opened (the message names C{[budgets] state_file}).
    """
    path = state_file_of(config)
    try:
        return SpendFile(path)
    except Exception as error:
        raise ConfigError(f"{config.source}: [budgets] state_file: cannot open {path}: {error}") from None


def ledger_thread() -> ThreadPool:
    """One thread for the spend file: its writes happen in order, off the reactor thread."""
    return ThreadPool(1, 1, "txgateway-budgets")


def memory_cache_store(config: GatewayConfig, clock: IReactorTime, metrics: GatewayMetrics) -> dict[str, ICacheStore]:
    """The memory cache store when a service caches in memory (its size reported as C{txgateway_cache_bytes})."""
    if not any(service.cache == "memory" for service in config.services.values()):
        return {}
    store = MemoryCacheStore(clock, config.cache.max_bytes)
    metrics.cache_bytes.set_function(lambda: store.bytes)
    return {"memory": store}


def build_server_factory(front: GatewayFront, clock: IReactorTime, max_connections: int | None = None) -> HTTPServerFactory:
    """The data plane's listener serving C{front}; its connection timers run on C{clock}."""
    gateway = front.gateway
    settings = gateway.config.gateway
    return HTTPServerFactory(
        front,
        clock,
        gateway.log,
        max_body_size=settings.max_body_size,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.client_idle_timeout,
        secure=settings.listen.startswith("ssl:"),
        max_bodies_held=settings.max_bodies_in_flight,
        max_connections=max_connections,
        answered_when_full=OPERATOR_READS,
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
        log_destination: LogDestination | None = None,
        worker: Any = None,
        open_files: int | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        #: The open files this process may hold (its soft limit, raised at start); L{None}: not known, no derived limit.
        self._open_files = open_files
        #: This process's line to its supervisor (a L{SupervisorLink}) when it is a worker.
        self._worker = worker
        # The gateway's own timers (timeouts, backoff, breakers, buckets) run
        # on clock; connections and the site's timers on the reactor.
        self._clock = reactor if clock is None else clock
        self._stdout = sys.stdout if stdout is None else stdout
        self._config_path = config_path
        self.sink = open_sink(config.logging.file, self._stdout, self._clock)
        # structlog writes to this destination (configured once, by makeService).
        self._log_destination = LogDestination() if log_destination is None else log_destination
        self._log_destination.use(self.sink, config.logging.level)
        self.log = self._logger()
        self.metrics = GatewayMetrics(self._clock)
        self._upstreams: list[UpstreamPool] = []
        self._retired_ledgers: list[IGovernanceStore] = []
        self._retired_spans: list[Any] = []
        self._stopping = False
        store = self._rate_limit_store(config)
        self._cache_stores = self._cache_stores_for(config, {})
        self._threads: ThreadPool | None = None
        self._governance_store = self._governance_store_for(config)
        self._response_threads: ThreadPool | None = None
        self._admin_threads: ThreadPool | None = None
        self._response_store = self._response_store_for(config)
        self._spans = self._span_export_for(config)
        #: The configuration as gateway.ini says it; what is served adds the admin API's keys and teams.
        self._configured = config
        self._admin = self._admin_control_for(config)
        self.gateway = build_gateway(
            config, self._clock, self._upstream_for, store, self.log, self.metrics, self._access_log(config),
            cache_stores=self._cache_stores, governance_store=self._governance_store, spans=self._spans,
            peers=worker, response_store=self._response_store, admin=self._admin,
        )
        self.front = GatewayFront(self.gateway)
        self.server_factory = build_server_factory(self.front, reactor, self._connection_limit(config))
        factory = self.server_factory
        self.metrics.client_connections.set_function(lambda: factory.serving)
        # No limit is reported as -1 (a gauge has no "none").
        self.metrics.client_connections_limit.set_function(lambda: -1 if factory.max_connections is None else factory.max_connections)
        if worker is None:
            strports.service(config.gateway.listen, self.server_factory, reactor=reactor).setServiceParent(self)
        else:
            self.sink.shared = True
            worker.gateway = lambda: self.gateway
            worker.on_lost = self._supervisor_lost
            address = listen_address(reactor, config.gateway.listen)
            ReusePortListener(reactor, address, self.server_factory).setServiceParent(self)
        if self._admin is not None and config.admin.listen:
            site = Site(AdminListener(lambda: self.gateway).app.resource())
            site.log = lambda request: None  # the admin API logs its changes itself
            if worker is None:
                strports.service(config.admin.listen, site, reactor=reactor).setServiceParent(self)
            else:
                ReusePortListener(reactor, listen_address(reactor, config.admin.listen), site).setServiceParent(self)

    def _connection_limit(self, config: GatewayConfig) -> int | None:
        """
        C{[gateway] max_connections}, or (C{auto}) what the open files allow
        beside the backend pools' idle connections; a number set past that
        is kept, with a warning.
        """
        allowed = None
        if self._open_files is not None:
            allowed = connections_for(self._open_files, POOL_IDLE_CONNECTIONS * len(self._upstreams))
        chosen = config.gateway.max_connections
        if chosen is None:
            return allowed
        if allowed is not None and chosen > allowed:
            self.log.warning(
                "max_connections_above_open_files", max_connections=chosen, open_files=self._open_files, allowed=allowed,
                reason="[gateway] max_connections is more than the open files allow: past "
                       f"{allowed} streams a backend connection may fail for want of a file descriptor",
            )
        return chosen

    def _logger(self) -> Any:
        log = structlog.get_logger("txgateway")
        # concrete: binding per request is cheap
        return log.bind(worker=self._worker.index) if self._worker is not None else log.bind()

    def _access_log(self, config: GatewayConfig) -> AccessLog:
        always = {"worker": self._worker.index} if self._worker is not None else None
        return AccessLog(self.sink, config.logging.level, always)

    def _supervisor_lost(self) -> None:
        """A worker whose supervisor is gone drains and stops: an orphan must not keep serving the port."""
        if not self._stopping and self._reactor.running:
            self._reactor.stop()

    def _shared_calls(self) -> BatchedCalls:
        return BatchedCalls(self._worker.call, self._clock, SUPERVISOR_TIMEOUT)

    def _rate_limit_store(self, config: GatewayConfig) -> IRateLimitStore:
        settings = config.ratelimit
        if settings.backend == "redis":
            from txgateway.ratelimit.redis import connect_redis

            return connect_redis(
                settings.redis_url, self._clock, settings.redis_timeout, settings.redis_retry_interval, self.log
            )
        if self._worker is not None:
            return SharedRateLimitStore(self._shared_calls(), self._clock, self.log)
        return MemoryRateLimitStore(self._clock)

    def _span_export_for(self, config: GatewayConfig) -> Any:
        """The span export C{[tracing]} asks for (its thread starts with the service), or L{None}."""
        settings = config.tracing
        if not settings.enabled:
            return None
        post = OTLPHttpPost(settings.otlp_endpoint, settings.otlp_headers, settings.timeout)
        return SpanExport(post, settings.service_name, self._reactor.callFromThread, self.log)

    def _governance_store_for(self, config: GatewayConfig) -> IGovernanceStore | None:
        """
        The ledger C{[budgets]} names, when the configuration governs keys.

        @raise ConfigError: the state file cannot be opened.
        """
        if not config.governed:
            return None
        settings = config.budgets
        if settings.store == "redis":
            from txgateway.governance.redis import connect_ledger

            url = settings.redis_url or config.ratelimit.redis_url
            return connect_ledger(url, self._clock, settings.redis_timeout, self.log)
        if self._worker is not None:
            # The supervisor holds the ledger and its spend file for every worker.
            return SharedLedgerStore(self._shared_calls(), self._clock, self.log, "sqlite")
        spend_file = open_spend_file(config)
        if self._threads is None:
            self._threads = ledger_thread()
            self._threads.start()
        threads = self._threads
        run = functools.partial(deferToThreadPool, self._reactor, threads)
        return LocalLedgerStore(self._clock, spend_file, run, self.log, config.end_user_budget_periods)

    def _admin_control_for(self, config: GatewayConfig) -> AdminControl | None:
        """
        The admin API's work and its store (where the budgets are: their
        SQLite file, or their Redis), when C{[admin] keys} are set.

        @raise ConfigError: the SQLite file cannot be opened.
        """
        if not config.admin.enabled:
            return None
        settings = config.budgets
        initial = None
        if settings.store == "redis":
            url = settings.redis_url or config.ratelimit.redis_url
            store: IAdminStore = connect_admin_store(url, self._clock, settings.redis_timeout, self.log)
        else:
            path = state_file_of(config)
            # A thread of its own (started with the service): a writer waiting for another never holds the reactor.
            self._admin_threads = ThreadPool(1, 1, "txgateway-admin")
            run = functools.partial(deferToThreadPool, self._reactor, self._admin_threads)
            try:
                store = SqliteAdminStore(path, run)
                initial = store.read_registry()  # at start, before the first request: its keys are served from it
            except Exception as error:
                raise ConfigError(f"{config.source}: [budgets] state_file: cannot open {path} for the admin API: {error}") from None
        return AdminControl(store, self._clock, lambda: self._configured, self._serve_registry, self.log, initial)

    def _serve_registry(self, registry: Registry) -> None:
        """Serve gateway.ini's configuration with the admin API's keys and teams of C{registry}."""
        if self._stopping or not hasattr(self, "gateway"):
            return
        self.apply(overlaid(self._configured, registry, self._clock.seconds()), admin_version=registry.version)

    def _response_store_for(self, config: GatewayConfig) -> IResponseStore | None:
        """
        The store of C{[responses]} (L{None} when it is C{off}); it lives as
        long as the daemon (a reload that changes C{[responses]} needs a restart).

        @raise ConfigError: the SQLite file cannot be opened.
        """
        settings = config.responses
        if settings.store == "off":
            return None
        if settings.store == "memory":
            return MemoryResponseStore(self._clock, settings.max_entries)
        if settings.store == "redis":
            url = settings.redis_url or config.ratelimit.redis_url
            return connect_response_store(url, self._clock, settings.redis_timeout, self.log)
        path = response_file_of(config)
        if self._response_threads is None:
            # A thread of its own (started with the service): a slow disk never holds the budgets' writes.
            self._response_threads = ThreadPool(1, 1, "txgateway-responses")
        run = functools.partial(deferToThreadPool, self._reactor, self._response_threads)
        try:
            return SqliteResponseStore(path, self._clock, run, settings.max_entries)
        except Exception as error:
            raise ConfigError(f"{config.source}: [responses] state_file: cannot open {path}: {error}") from None

    def _cache_stores_for(self, config: GatewayConfig, kept: Mapping[str, ICacheStore]) -> dict[str, ICacheStore]:
        """The cache stores C{config}'s services use, keeping those of C{kept} (same [cache] settings)."""
        stores = dict(kept)
        kinds = {service.cache for service in config.services.values()} - {"off"}
        if "memory" in kinds and "memory" not in stores:
            stores.update(memory_cache_store(config, self._clock, self.metrics))
        if "redis" in kinds and "redis" not in stores:
            url = config.cache.redis_url or config.ratelimit.redis_url
            stores["redis"] = connect_cache(url, self._clock, config.cache.redis_timeout, self.log)
        return stores

    def _upstream_for(self, service: ServiceConfig, url: str) -> IUpstream:
        # One pool per endpoint of a service, even for services sharing a
        # URL: each is closed when its own endpoint goes.
        upstream = UpstreamPool(url, self._reactor, max_idle=POOL_IDLE_CONNECTIONS, idle_seconds=POOL_IDLE_SECONDS)
        self._upstreams.append(upstream)
        return upstream

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd asks its application for a log observer before it starts
        # logging: offering ours keeps every line of output JSON.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(
                ILogObserver, TwistedJsonObserver(self.sink, self.gateway.config.logging.level)
            )

    def privilegedStartService(self) -> None:
        # twistd binds the listener here (before dropping privileges).
        with _one_line_when_the_port_is_taken(self.gateway.config):
            super().privilegedStartService()

    def startService(self) -> None:
        if self._worker is not None:
            self._worker.connect()
        if self._admin is not None:
            # The admin API's keys and teams are served before the first request is taken.
            self._admin.start().addErrback(
                lambda failure: self.log.error("admin_store_unavailable", reason=failure.getErrorMessage(), serving="gateway.ini alone")
            )
        with _one_line_when_the_port_is_taken(self.gateway.config):
            super().startService()
        if self._spans is not None:
            self._spans.start()
        if self._response_threads is not None:
            self._response_threads.start()
        if self._admin_threads is not None:
            self._admin_threads.start()
        # What was built so far (modules, configuration) lives as long as the
        # daemon: out of the collector's sight, full collections stay short
        # (measured: 38 ms pauses before).  PyPy's collector has no freeze.
        if hasattr(gc, "freeze"):
            gc.collect()
            gc.freeze()
        config = self.gateway.config
        if self._config_path is not None and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.reload))
        self.log.info(
            "gateway_started",
            listen=config.gateway.listen,
            config=config.source,
            open_files=self._open_files,
            max_connections=self.server_factory.max_connections,
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
            self.gateway.last_reload = {"time": self._clock.seconds(), "outcome": f"rejected: {error}"}
            return False
        self._configured = config
        if self._admin is not None:
            config = overlaid(config, self._admin.registry, self._clock.seconds())
        return self.apply(config)

    def apply(self, config: GatewayConfig, admin_version: int | None = None) -> bool:
        """Swap in C{config} (see L{reload}); C{admin_version}: the admin API's registry changed, not gateway.ini."""
        old = self.gateway
        if config.gateway.listen != old.config.gateway.listen:
            self.log.warning(
                "config_reload_listen_unchanged",
                reason="a new listen endpoint needs a restart; still listening as before",
                listen=old.config.gateway.listen,
            )
        if config.logging != old.config.logging:
            try:
                sink = open_sink(config.logging.file, self._stdout, self._clock)
            except OSError as error:
                self.log.error("config_reload_rejected", reason=f"[logging] file: {error}")
                old.last_reload = {"time": self._clock.seconds(), "outcome": f"rejected: [logging] file: {error}"}
                return False
            old_sink, self.sink = self.sink, sink
            self.sink.shared = old_sink.shared
            self._log_destination.use(self.sink, config.logging.level)
            self.log = self._logger()
            old_sink.close()
        store = old.store
        if config.ratelimit != old.config.ratelimit:
            store = self._rate_limit_store(config)
        same_cache = config.cache == old.config.cache and config.ratelimit.redis_url == old.config.ratelimit.redis_url
        retired_stores = [] if same_cache else list(self._cache_stores.values())
        self._cache_stores = self._cache_stores_for(config, self._cache_stores if same_cache else {})
        for retired in retired_stores:
            retired.close()
        retired_ledger = None
        if (config.governed, config.budgets) != (old.config.governed, old.config.budgets) or (
            config.budgets.store == "redis" and config.ratelimit.redis_url != old.config.ratelimit.redis_url
        ):
            try:
                governance_store = self._governance_store_for(config)
            except ConfigError as error:
                self.log.error("config_reload_rejected", reason=str(error))
                old.last_reload = {"time": self._clock.seconds(), "outcome": f"rejected: {error}"}
                return False
            retired_ledger, self._governance_store = self._governance_store, governance_store
        if config.tracing != old.config.tracing:
            if self._spans is not None:
                self._retired_spans.append(self._spans)
            self._spans = self._span_export_for(config)
            if self._spans is not None:
                self._spans.start()
        gateway = build_gateway(
            config,
            self._clock,
            self._upstream_for,
            store,
            self.log,
            self.metrics,
            self._access_log(config),
            previous=old,
            cache_stores=self._cache_stores,
            governance_store=self._governance_store,
            spans=self._spans,
            peers=self._worker,
            response_store=self._response_store,
            admin=self._admin,
        )
        if retired_ledger is not None:
            # Reservations in flight settle on the old store (their governor holds it): close it after the drain.
            self._retired_ledgers.append(retired_ledger)
        gateway.accepting = old.accepting
        self.server_factory.max_body_size = config.gateway.max_body_size
        self.server_factory.max_bodies_held = config.gateway.max_bodies_in_flight
        self.server_factory.header_timeout = config.gateway.header_timeout
        self.server_factory.idle_timeout = config.gateway.client_idle_timeout
        self.server_factory.max_connections = self._connection_limit(config)
        self.server_factory.log = self.log
        self.front.use(gateway)
        self.gateway = gateway
        self._retire(old, gateway)
        changed = sorted(
            name
            for name in set(config.services) | set(old.config.services)
            if config.services.get(name) != old.config.services.get(name)
        )
        if admin_version is not None:
            self.log.info("admin_registry_served", version=admin_version, keys=len(config.auth.keys), teams=len(config.teams))
            gateway.last_reload = old.last_reload
            return True
        self.log.info("config_reloaded", config=config.source, services_changed=changed)
        gateway.last_reload = {"time": self._clock.seconds(), "outcome": "applied"}
        return True

    def _retire(self, old: Gateway, new: Gateway) -> None:
        """Release what the old configuration had and the new one does not use."""
        kept = {id(endpoint) for endpoint in _every_endpoint(new)}
        for endpoint in _every_endpoint(old):
            if id(endpoint) not in kept:
                endpoint.breaker.stop()
        used = {id(endpoint.upstream) for route in new.broker.routes.values() for endpoint in route.endpoints}
        for upstream in [upstream for upstream in self._upstreams if id(upstream) not in used]:
            # Only idle connections close; requests in flight finish first.
            self._upstreams.remove(upstream)
            upstream.close()
        if old.store is not None and old.store is not new.store:
            old.store.close()

    # -- stop

    def stopService(self) -> Deferred:
        self._stopping = True
        if self._admin is not None:
            self._admin.stop()
        if self._worker is not None:
            self._worker.stopping = True
        self.gateway.accepting = False
        self.log.info("gateway_stopping", in_flight=self.front.in_flight)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        delay = self.gateway.config.gateway.drain_delay
        if delay > 0:
            # Still accepting, /health/ready at 503: a load balancer's probe sees it and moves traffic away.
            await deferLater(self._clock, delay)
        await super().stopService()  # the listener stops accepting
        await self._drain(self.gateway.config.gateway.drain_timeout)
        for endpoint in _every_endpoint(self.gateway):
            endpoint.breaker.stop()
        await DeferredList([upstream.close() for upstream in self._upstreams])
        for cache_store in self._cache_stores.values():
            closing = cache_store.close()
            if closing is not None:
                await closing
        if self.gateway.store is not None:
            await self.gateway.store.close()
        for ledger in [*self._retired_ledgers, self._governance_store]:
            if ledger is not None:
                await ledger.close()
        for threads in (self._threads, self._response_threads):
            if threads is not None:
                threads.stop()  # what was queued on them is done first
        if self._response_store is not None:
            closing = self._response_store.close()
            if closing is not None:
                await closing
        if self._admin is not None:
            closing = self._admin.close()
            if closing is not None:
                await closing
        if self._admin_threads is not None:
            self._admin_threads.stop()
        for spans in self._retired_spans + ([self._spans] if self._spans is not None else []):
            spans.stop()  # what waits is exported first (a few seconds at most)
        self.log.info("gateway_stopped")
        self.sink.sync()

    async def _drain(self, timeout: float) -> None:
        """
        Wait for the requests in flight, for C{timeout} seconds at most, then
        close the client connections once what was written to them is out
        (the reactor stops right after: an answer still in a buffer would be
        lost).
        """
        started = self._clock.seconds()
        if self.front.in_flight:
            self.log.info("gateway_draining", in_flight=self.front.in_flight, drain_timeout=timeout)
            idle = self.front.wait_until_idle()
            idle.addTimeout(timeout, self._clock)
            try:
                await idle
            except Exception:
                self.log.warning("gateway_drain_timeout", cut=self.front.in_flight, drain_timeout=timeout)
            else:
                self.log.info("gateway_drained")
        closed = self.server_factory.close_connections()
        closed.addTimeout(max(0.1, timeout - (self._clock.seconds() - started)), self._clock)
        try:
            await closed
        except Exception:
            self.server_factory.abort_connections()
