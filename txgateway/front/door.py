"""
The front door: what the data plane hands every complete request to.
L{GatewayFront} gives it its id, trace context, client address and JSON
access line, then sends C{/api/} and C{/v1/} to the proxied handlers
without URL matching (the hot path) and everything else to the admin
routes, which Klein renders straight into the answer.
"""

from __future__ import annotations

import functools
from typing import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from txgateway import errors
from txgateway.admin.render import ResourceRenderer
from txgateway.admin.routes import AdminRoutes
from txgateway.dataplane.server import IncomingRequest
from txgateway.front.answers import answer_error
from txgateway.front.gateway import Gateway
from txgateway.front.proxied import ProxiedRequests
from txgateway.ids import request_id_for
from txgateway.observability.context import RequestContext, client_address
from txgateway.observability.tracing import SpanNotes, trace_context_for

__all__ = ["GatewayFront", "OPERATOR_READS"]

#: The operator's paths: probes, the scrape, the status page.
_OPERATOR_PATHS = (b"/health", b"/metrics", b"/status")
#: The operator's reads, answered even on a connection past C{[gateway]
#: max_connections} (one request, then closed): a full gateway is when its
#: probes and its scrape matter most.  Read from the Klein routes under
#: those paths that answer C{GET} and take no argument, so a route added
#: there is one of them.
OPERATOR_READS = frozenset(
    rule.rule.encode("ascii")
    for rule in AdminRoutes.app.url_map.iter_rules()
    if rule.rule.startswith(tuple(path.decode("ascii") for path in _OPERATOR_PATHS))
    and not rule.arguments
    and (rule.methods is None or "GET" in rule.methods)
)


@attrs.frozen
class _Serving:
    """What new requests are served by: one gateway's parts."""

    gateway: Gateway
    proxied: ProxiedRequests
    admin: ResourceRenderer
    ended: Callable[[IncomingRequest, bool], None]


def _api_done(result: None, request: IncomingRequest) -> None:
    if not request.gone and request.started:
        request.finish()


def _api_failed(failure: Failure, request: IncomingRequest, gateway: Gateway) -> None:
    ctx: RequestContext = request.context
    if ctx.client_gone or request.gone or request.finished or failure.check(CancelledError):
        return  # the client left: the cancellation ends here
    ctx.log.error("unhandled_error", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
    if request.started:
        # Part of an answer may be out: the only honest end is a broken one.
        ctx.outcome = errors.INTERNAL_ERROR.type
        request.abort()
        return
    answer_error(request, errors.INTERNAL_ERROR, "the gateway failed to handle this request")


class GatewayFront:
    """
    What the data plane hands every complete request to: it gives the
    request its context (id, trace, client, clock time), the
    C{X-Request-ID} answer header, a JSON access line and its metrics when
    it ends, then serves C{/api/} and C{/v1/} through the proxied handlers
    and everything else through the Klein routes.  It also counts requests in flight, for
    draining.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.use(gateway)

    def use(self, gateway: Gateway) -> None:
        """Serve new requests from C{gateway}; requests in flight keep theirs."""
        gateway.metrics.watch(gateway.circuits, gateway.store_health, gateway.spans_dropped)
        self._current = _Serving(
            gateway,
            ProxiedRequests(gateway),
            ResourceRenderer(AdminRoutes(gateway).app.resource(), gateway.clock),
            functools.partial(self._ended, gateway),
        )

    @property
    def gateway(self) -> Gateway:
        """The gateway new requests are served from."""
        return self._current.gateway

    def handle(self, request: IncomingRequest) -> None:
        """Serve one complete request (called by the data plane)."""
        serving = self._current
        gateway = serving.gateway
        request_id = request_id_for(request.header(b"x-request-id"))
        trace = trace_context_for(request.header(b"traceparent"), request.header(b"tracestate"), gateway.sample())
        ctx = RequestContext(
            request_id=request_id,
            client=client_address(request, gateway.config.ratelimit.trusted_proxies),
            started_at=gateway.clock.seconds(),
            base_log=gateway.log,
            trace=trace,
        )
        if gateway.spans is not None and trace.sampled:
            ctx.span_notes = SpanNotes()
        request.context = ctx
        request.on_end = serving.ended
        request.set_header(b"X-Request-ID", request_id.encode("ascii"))
        self.in_flight += 1
        gateway.metrics.request_started()
        path = request.path
        if path.startswith((b"/api/", b"/v1/")):
            proxied = serving.proxied
            handling = proxied.api_request if path.startswith(b"/api/") else proxied.openai_request
            handled = Deferred.fromCoroutine(handling(request))
            if not handled.called:
                ctx.handling = handled
            handled.addCallbacks(_api_done, _api_failed, callbackArgs=(request,), errbackArgs=(request, gateway))
        else:
            serving.admin.serve(request, ctx)

    def _ended(self, gateway: Gateway, request: IncomingRequest, aborted: bool) -> None:
        ctx: RequestContext = request.context
        if aborted:
            # First, so that the broker can tell a client that left from a
            # failing backend when its work is cancelled.
            ctx.client_gone = True
            if ctx.outcome is None:
                ctx.outcome = "client_disconnected"
            if ctx.handling is not None and not ctx.handling.called and not ctx.outlives_client:
                ctx.handling.cancel()
        ctx.handling = None  # what it holds goes now, whoever keeps the context (the span export)
        seconds = gateway.clock.seconds() - ctx.started_at
        status = 499 if ctx.outcome == "client_disconnected" else request.code
        method = request.method.decode("ascii", "replace")
        # Probes, scrapes and the status page: a debug line each, and not
        # counted as requests (a load balancer's probes drown the rest).
        operator = request.path.startswith(_OPERATOR_PATHS) and request.code < 400
        gateway.access_log.request(
            "request_aborted" if aborted else "request_completed",
            ctx,
            level="debug" if operator else "info",
            method=method,
            path=request.path.decode("latin-1"),
            status=status,
            duration_ms=round(seconds * 1000.0, 3),
            bytes_sent=request.bytes_sent,
        )
        if operator:
            gateway.metrics.request_ended()
        else:
            gateway.metrics.observe_request(ctx.service, method, status, seconds)
            if ctx.model_section is not None:
                answered = ctx.answered_at - ctx.started_at if ctx.answered_at is not None else seconds
                gateway.metrics.observe_model(ctx.model_section, status >= 500, answered)
            if ctx.span_notes is not None and gateway.spans is not None:
                gateway.spans.add(ctx, method, request.path.decode("latin-1"), status, ctx.started_at + seconds)
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle_waiters:
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
