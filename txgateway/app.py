"""
The routes: C{/health}, C{/health/ready}, C{/health/live}, C{/metrics}
and C{/api/<service>/...}.  They are thin: the work lives in the broker.

L{GatewayRoot} stands in front of the Klein routes and gives every request
its id, its trace context and its JSON access line.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from txgateway import errors
from txgateway.auth import Authenticator
from txgateway.broker import AnswerCutShort, ServiceBroker
from txgateway.config import GatewayConfig
from txgateway.context import RequestContext, client_address, request_id_for
from txgateway.errors import ErrorKind, GatewayError, error_body
from txgateway.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from txgateway.paths import UnsafePath, split_api_path
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.tracing import trace_context_for

__all__ = ["Gateway", "GatewayRoot", "GatewayRoutes", "write_error"]


class Gateway:
    """
    One configuration of the running gateway, as the routes see it; a
    reload builds a new one and in-flight requests finish on the old.

    @ivar accepting: L{False} once shutdown has begun (C{/health/ready}
        answers 503).
    @ivar started_at: when the daemon started (kept across reloads).
    """

    def __init__(
        self,
        config: GatewayConfig,
        clock: IReactorTime,
        broker: ServiceBroker,
        store: IRateLimitStore | None,
        log: Any,
        metrics: GatewayMetrics | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.broker = broker
        self.store = store
        self.log = log
        self.metrics = metrics or GatewayMetrics()
        self.authenticator = Authenticator(config.auth.keys)
        self.started_at = clock.seconds() if started_at is None else started_at
        self.accepting = True

    def circuits(self) -> list[tuple[str, str]]:
        """Each service's circuit state, for metrics."""
        return [(name, route.breaker.status().state) for name, route in sorted(self.broker.routes.items())]

    def store_health(self) -> tuple[str, bool] | None:
        """The rate-limit store's backend and health, for metrics."""
        if self.store is None:
            return None
        description = self.store.description
        return description["backend"], bool(description.get("healthy", True))

    def health(self) -> dict:
        """What C{GET /health} answers."""
        services = {}
        degraded = False
        for name, route in sorted(self.broker.routes.items()):
            status = route.breaker.status()
            degraded = degraded or status.state != "closed"
            services[name] = {
                "url": route.config.url,
                "circuit": status.state,
                "consecutive_failures": status.consecutive_failures,
                "trial_in_s": None if status.trial_in is None else round(status.trial_in, 3),
            }
        body: dict[str, Any] = {
            "status": "ok",
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "services": services,
        }
        if self.store is not None:
            body["ratelimit"] = self.store.description
            degraded = degraded or not body["ratelimit"].get("healthy", True)
        if degraded:
            body["status"] = "degraded"
        if not self.accepting:
            body["status"] = "shutting_down"
        return body


def write_error(
    request: IRequest, kind: ErrorKind, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """Set the status and headers of an error answer and return its JSON body."""
    ctx: RequestContext | None = getattr(request, "context", None)
    request_id = ctx.request_id if ctx is not None else request_id_for(None)
    if ctx is not None:
        ctx.outcome = kind.type
    request.setResponseCode(kind.status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in headers:
        request.setHeader(name, value)
    body = error_body(kind, message, request_id)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _json(request: IRequest, body: dict, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    encoded = json.dumps(body).encode("utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(encoded))
    return encoded


def _write_answer(answer: bytes | Resource | None, request: IRequest) -> None:
    ctx: RequestContext = request.context
    if answer is _LEFT_UNFINISHED or ctx.client_gone or request.finished:
        return
    if answer:
        request.write(answer)
    request.finish()


def _handle_failure(failure: Failure, request: IRequest, routes: "GatewayRoutes") -> None:
    ctx: RequestContext = request.context
    if ctx.client_gone or request.finished or failure.check(CancelledError):
        return  # the client left: the cancellation ends here
    _write_answer(routes.unexpected(request, failure), request)


class _LeftUnfinished(Resource):
    """
    What a route returns when the answer must stay unfinished (its
    connection is closing): Klein then does not finish it, so the client
    never gets the end of a chunked body that was cut short.
    """

    isLeaf = True

    def render(self, request: IRequest) -> int:
        return NOT_DONE_YET


_LEFT_UNFINISHED = _LeftUnfinished()


class GatewayRoutes:
    """
    The Klein routes of one gateway (probes, metrics, JSON 404/405/500),
    and L{api_request}, the handler of C{/api/} that L{GatewayRoot} calls
    without URL matching.
    """

    app = Klein()

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @app.route("/health/live", methods=["GET", "HEAD"])
    def live(self, request: IRequest) -> bytes:
        return _json(request, {"status": "alive"})

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def ready(self, request: IRequest) -> bytes:
        if self.gateway.accepting:
            return _json(request, {"status": "ready"})
        return _json(request, {"status": "shutting_down"}, 503)

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        return _json(request, self.gateway.health())

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        body = self.gateway.metrics.exposition()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    async def api_request(self, request: IRequest) -> bytes | Resource | None:
        """
        Answer a C{/api/<service>/...} request (L{GatewayRoot} sends them
        here directly): its API key, its service, then the broker.
        """
        ctx: RequestContext = request.context
        authenticator = self.gateway.authenticator
        if authenticator.enabled:
            # Before the service lookup: a caller without a key learns nothing.
            ctx.caller = authenticator.caller(request)
            if ctx.caller is None:
                return write_error(
                    request,
                    errors.UNAUTHORIZED,
                    "a valid API key is needed: Authorization: Bearer <key> or X-API-Key: <key>",
                    [(b"WWW-Authenticate", b'Bearer realm="txgateway"')],
                )
            ctx.log = ctx.log.bind(api_key_name=ctx.caller.name)
        try:
            service, rest = split_api_path(request.path)
        except UnsafePath as error:
            return write_error(request, errors.NOT_FOUND, str(error))
        if service not in self.gateway.broker.routes:
            return write_error(request, errors.UNKNOWN_SERVICE, f"no service is named {service!r}")
        ctx.service = service
        request.setHeader(b"X-Gateway-Service", service.encode("ascii"))
        query = request.uri.partition(b"?")[2]
        try:
            await self.gateway.broker.proxy(request, ctx, rest, query)
        except GatewayError as error:
            elapsed_ms = (self.gateway.clock.seconds() - ctx.started_at) * 1000.0
            request.setHeader(b"X-Gateway-Response-Time", b"%d" % round(elapsed_ms))
            request.setHeader(b"X-Gateway-Attempts", b"%d" % ctx.attempts)
            return write_error(request, error.kind, error.message, error.headers)
        except AnswerCutShort:
            return _LEFT_UNFINISHED
        return None

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return write_error(request, errors.NOT_FOUND, "nothing is served at this path")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or []
        return write_error(
            request,
            errors.METHOD_NOT_ALLOWED,
            f"{request.method.decode('ascii', 'replace')} is not allowed here",
            [(b"Allow", ", ".join(allowed).encode("ascii"))],
        )

    @app.handle_errors
    def unexpected(self, request: IRequest, failure: Failure) -> bytes | None:
        ctx: RequestContext | None = getattr(request, "context", None)
        log = ctx.log if ctx is not None else self.gateway.log
        log.error("unhandled_error", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        if request.startedWriting:
            # Part of an answer is out: the only honest end is a broken one.
            request.loseConnection()
            return _LEFT_UNFINISHED
        return write_error(request, errors.INTERNAL_ERROR, "the gateway failed to handle this request")


class GatewayRoot(Resource):
    """
    The site's root: gives each request its context (id, trace, client,
    clock time, bound logger), the C{X-Request-ID} response header, a JSON
    access line and its metrics when it ends, then hands it to the routes of
    the current gateway.  It also counts requests in flight, for draining.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.use(gateway)

    def use(self, gateway: Gateway) -> None:
        """Serve new requests from C{gateway}; requests in flight keep theirs."""
        gateway.metrics.watch(gateway.circuits, gateway.store_health)
        routes = GatewayRoutes(gateway)
        self._current = (gateway, routes, routes.app.resource())

    @property
    def gateway(self) -> Gateway:
        """The gateway new requests are served from."""
        return self._current[0]

    def render(self, request: IRequest) -> Any:
        gateway, routes, klein = self._current
        request_id = request_id_for(request.requestHeaders.getRawHeaders(b"x-request-id", [None])[0])
        trace = trace_context_for(
            request.requestHeaders.getRawHeaders(b"traceparent", [None])[0],
            request.requestHeaders.getRawHeaders(b"tracestate", [None])[0],
        )
        ctx = RequestContext(
            request_id=request_id,
            client=client_address(request, gateway.config.ratelimit.trusted_proxies),
            started_at=gateway.clock.seconds(),
            log=gateway.log.bind(request_id=request_id, trace_id=trace.trace_id),
            trace=trace,
        )
        request.context = ctx
        request.setHeader(b"X-Request-ID", request_id.encode("ascii"))
        self.in_flight += 1
        gateway.metrics.in_flight.inc()
        request.notifyFinish().addBoth(self._completed, request, ctx, gateway)
        if request.path.startswith(b"/api/"):
            return self._serve_api(request, routes)
        return klein.render(request)

    def _serve_api(self, request: IRequest, routes: "GatewayRoutes") -> int:
        """
        The proxy's hot path, served without Klein's URL matching (a third
        of the CPU time per proxied request, measured): the same handler,
        the same cancellation when the client leaves (L{_completed} cancels
        it), the same answers.
        """
        handled = Deferred.fromCoroutine(routes.api_request(request))
        request.context.handling = handled
        handled.addCallbacks(_write_answer, _handle_failure, callbackArgs=(request,), errbackArgs=(request, routes))
        return NOT_DONE_YET

    def _completed(self, result: object, request: IRequest, ctx: RequestContext, gateway: Gateway) -> None:
        # Runs before Klein cancels the route (it registered first), so the
        # broker can tell a client that left from a failing backend.
        aborted = isinstance(result, Failure)
        if aborted:
            ctx.client_gone = True
            if ctx.outcome is None:
                ctx.outcome = "client_disconnected"
            if ctx.handling is not None and not ctx.handling.called:
                ctx.handling.cancel()
        seconds = gateway.clock.seconds() - ctx.started_at
        status = 499 if ctx.outcome == "client_disconnected" else request.code
        method = request.method.decode("ascii", "replace")
        ctx.log.info(
            "request_completed" if not aborted else "request_aborted",
            method=method,
            path=request.path.decode("latin-1"),
            service=ctx.service,
            status=status,
            duration_ms=round(seconds * 1000.0, 3),
            client=ctx.client,
            attempts=ctx.attempts,
            outcome=ctx.outcome,
            bytes_sent=request.sentLength,
        )
        gateway.metrics.observe_request(ctx.service, method, status, seconds)
        gateway.metrics.in_flight.dec()
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_until_idle(self) -> Deferred[None]:
        """A Deferred that fires once no request is in flight."""
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter
