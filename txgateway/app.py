"""
The routes: C{/health}, C{/health/ready}, C{/health/live}, C{/metrics}
and C{/api/<service>/...}.  They are thin: the work lives in the broker.

L{GatewayFront} receives every complete request from the data plane
(L{txgateway.server}), gives it its id, trace context and JSON access
line, and sends C{/api/} to the broker without URL matching (the hot
path) and everything else to the Klein routes through L{AdminBridge}.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import Any, Iterable
from urllib.parse import unquote_to_bytes

import httptools
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from txgateway import errors
from txgateway.auth import Authenticator
from txgateway.broker import AnswerCutShort, ServiceBroker
from txgateway.config import GatewayConfig
from txgateway.context import CompletionFacts, RequestContext, client_address, request_id_for
from txgateway.errors import ErrorKind, GatewayError, error_body
from txgateway.logs import AccessLog
from txgateway.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from txgateway.openai_wire import BadCall, OpenAICall
from txgateway.paths import UnsafePath, split_api_path
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.server import IncomingRequest
from txgateway.status import STATUS_PAGE
from txgateway.tracing import trace_context_for

__all__ = ["AdminBridge", "Gateway", "GatewayFront", "GatewayRoutes", "answer_error", "write_error"]


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
        metrics: GatewayMetrics,
        access_log: AccessLog,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.broker = broker
        self.store = store
        self.log = log
        self.metrics = metrics
        self.access_log = access_log
        self.authenticator = Authenticator(config.auth.keys)
        self.started_at = clock.seconds() if started_at is None else started_at
        self.accepting = True
        #: When the configuration was last reloaded, and how it went ({"time", "outcome"}), for /status.
        self.last_reload: dict | None = None

    def circuits(self) -> list[tuple[str, str, str]]:
        """Each endpoint's circuit state (service, endpoint, state), for metrics."""
        return [
            (name, endpoint.url, endpoint.breaker.status().state)
            for name, route in sorted(self.broker.routes.items())
            for endpoint in route.endpoints
        ] + self.broker.models.circuits()

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
            endpoints = []
            for endpoint in route.endpoints:
                status = endpoint.breaker.status()
                degraded = degraded or status.state != "closed"
                endpoints.append({
                    "url": endpoint.url,
                    "circuit": status.state,
                    "consecutive_failures": status.consecutive_failures,
                    "trial_in_s": None if status.trial_in is None else round(status.trial_in, 3),
                    "in_flight": endpoint.in_flight,
                })
            services[name] = {"url": route.config.url, **_service_circuit(endpoints), "endpoints": endpoints}
        body: dict[str, Any] = {
            "status": "ok",
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "services": services,
        }
        if self.broker.models.models:
            body["models"] = self.broker.models.health()
        cache = self.broker.cache
        if cache is not None and cache.stores:
            descriptions = [store.description for _, store in sorted(cache.stores.items())]
            body["cache"] = {
                "backend": ", ".join(d["backend"] for d in descriptions),
                "healthy": all(d["healthy"] for d in descriptions),
            }
            degraded = degraded or not body["cache"]["healthy"]
        if self.store is not None:
            body["ratelimit"] = self.store.description
            degraded = degraded or not body["ratelimit"].get("healthy", True)
        if degraded:
            body["status"] = "degraded"
        if not self.accepting:
            body["status"] = "shutting_down"
        return body


    def status(self) -> dict:
        """What C{/status.json} answers: C{/health}'s view with each endpoint's last 60 s, the stores and the events."""
        body = self.health()
        recent = self.metrics.recent
        for name, service in body["services"].items():
            for endpoint in service["endpoints"]:
                endpoint.update(recent.summary(name, endpoint["url"]))
        stores = []
        if self.store is not None:
            stores.append({"name": "rate limit", **_store_health(self.store.description)})
        if "cache" in body:
            stores.append({"name": "cache", **body["cache"]})
        body["stores"] = stores
        body["events"] = self.metrics.events.recent()
        body["config"] = self.config.source
        body["last_reload"] = self.last_reload
        return body


def _store_health(description: dict) -> dict:
    return {"backend": description["backend"], "healthy": bool(description.get("healthy", True))}


def _service_circuit(endpoints: list[dict]) -> dict:
    """
    A service's circuit from its endpoints': closed if any endpoint is
    closed, else half_open if any is, else open; the failures and trial
    time are those of the endpoints in that state (the fewest, the soonest).
    """
    for state in ("closed", "half_open", "open"):
        same = [endpoint for endpoint in endpoints if endpoint["circuit"] == state]
        if same:
            trials = [endpoint["trial_in_s"] for endpoint in same if endpoint["trial_in_s"] is not None]
            return {
                "circuit": state,
                "consecutive_failures": min(endpoint["consecutive_failures"] for endpoint in same),
                "trial_in_s": min(trials) if trials else None,
            }
    raise ValueError("a service without endpoints")


def write_error(
    request: IRequest, kind: ErrorKind, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """
    For the Klein routes (a twisted.web request): set the status and
    headers of an error answer and return its JSON body.
    """
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


def answer_error(
    request: IncomingRequest, kind: ErrorKind, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """For the data plane: answer C{request} with the JSON error shape."""
    ctx: RequestContext = request.context
    ctx.outcome = kind.type
    body = error_body(kind, message, ctx.request_id)
    request.respond(kind.status, body, [(b"Content-Type", b"application/json"), *headers])


def _json(request: IRequest, body: dict, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    encoded = json.dumps(body).encode("utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(encoded))
    return encoded


#: The operator's paths: probes, the scrape, the status page.
_OPERATOR_PATHS = (b"/health", b"/metrics", b"/status")


def _model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "txgateway"}


def _answer_json(request: IncomingRequest, body: dict) -> None:
    encoded = json.dumps(body).encode("utf-8")
    request.respond(200, encoded, [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")])


def _api_done(result: None, request: IncomingRequest) -> None:
    if not request.gone and request.started:
        request.finish()


def _api_failed(failure: Failure, request: IncomingRequest, gateway: "Gateway") -> None:
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

    def _may_see_status(self, request: IRequest) -> bool:
        ctx: RequestContext | None = getattr(request, "context", None)
        address = ctx.client if ctx is not None else request.getClientAddress().host
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.gateway.config.status.allow)

    @app.route("/status", methods=["GET", "HEAD"])
    def status_page(self, request: IRequest) -> bytes:
        if not self._may_see_status(request):
            return write_error(request, errors.NOT_FOUND, "nothing is served at this path")
        page = STATUS_PAGE.encode("utf-8")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(page))
        return page

    @app.route("/status.json", methods=["GET", "HEAD"])
    def status_document(self, request: IRequest) -> bytes:
        if not self._may_see_status(request):
            return write_error(request, errors.NOT_FOUND, "nothing is served at this path")
        return _json(request, self.gateway.status())

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        body = self.gateway.metrics.exposition()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _authenticated(self, request: IncomingRequest, ctx: RequestContext) -> bool:
        """Whether the caller may go on (with the gateway's API keys on); else it was answered 401."""
        authenticator = self.gateway.authenticator
        if not authenticator.enabled:
            return True
        ctx.caller = authenticator.caller(request)
        if ctx.caller is None:
            answer_error(
                request,
                errors.UNAUTHORIZED,
                "a valid API key is needed: Authorization: Bearer <key> or X-API-Key: <key>",
                [(b"WWW-Authenticate", b'Bearer realm="txgateway"')],
            )
            return False
        ctx.bind(api_key_name=ctx.caller.name)
        return True

    async def api_request(self, request: IncomingRequest) -> None:
        """
        Answer a C{/api/<service>/...} request (L{GatewayFront} sends them
        here directly): its API key, its service, then the broker.
        """
        ctx: RequestContext = request.context
        # Before the service lookup: a caller without a key learns nothing.
        if not self._authenticated(request, ctx):
            return
        try:
            service, rest = split_api_path(request.path)
        except UnsafePath as error:
            answer_error(request, errors.NOT_FOUND, str(error))
            return
        if service not in self.gateway.broker.routes:
            answer_error(request, errors.UNKNOWN_SERVICE, f"no service is named {service!r}")
            return
        ctx.service = service
        request.set_header(b"X-Gateway-Service", service.encode("ascii"))
        await self._brokered(request, ctx, self.gateway.broker.proxy(request, ctx, rest, request.query))

    async def _brokered(self, request: IncomingRequest, ctx: RequestContext, answering: Any) -> None:
        """Await the broker's answer; a L{GatewayError} becomes the error shape."""
        try:
            await answering
        except GatewayError as error:
            ctx.stamp(request, self.gateway.clock.seconds())
            answer_error(request, error.kind, error.message, error.headers)
        except AnswerCutShort:
            pass

    async def openai_request(self, request: IncomingRequest) -> None:
        """
        Answer C{/v1/...}, OpenAI's API: C{GET /v1/models} (and one model)
        from the configuration, and every C{POST} routed by its body's
        C{model} to that model's targets.
        """
        ctx: RequestContext = request.context
        if not self._authenticated(request, ctx):
            return
        models = self.gateway.broker.models
        path = request.path
        if path == b"/v1/models" or path.startswith(b"/v1/models/"):
            if request.method not in (b"GET", b"HEAD"):
                answer_error(request, errors.METHOD_NOT_ALLOWED, "only GET is allowed here", [(b"Allow", b"GET, HEAD")])
                return
            created = int(self.gateway.started_at)
            if path == b"/v1/models":
                listed = [_model_object(name, created) for name in models.names()]
                _answer_json(request, {"object": "list", "data": listed})
                return
            name = unquote_to_bytes(path[len(b"/v1/models/"):]).decode("utf-8", "replace")
            if name not in models.names():
                answer_error(request, errors.MODEL_NOT_FOUND, f"no model is named {name!r}")
                return
            _answer_json(request, _model_object(name, created))
            return
        if request.method != b"POST":
            answer_error(
                request, errors.METHOD_NOT_ALLOWED,
                f"{request.method.decode('ascii', 'replace')} is not allowed here", [(b"Allow", b"POST")],
            )
            return
        try:
            call = OpenAICall.parse(request.body, path)
        except BadCall as error:
            answer_error(request, errors.BAD_REQUEST, f"{error}: an OpenAI request is a JSON object with a model")
            return
        if call.model is None:
            answer_error(request, errors.BAD_REQUEST, "the body has no model: a string naming the model is needed")
            return
        targets = models.targets_for(call.model)
        if targets is None:
            answer_error(request, errors.MODEL_NOT_FOUND, f"no model is named {call.model!r}")
            return
        ctx.service = targets[0].route.config.name
        ctx.completion = CompletionFacts(requested_model=call.model)
        rest = path[len(b"/v1"):]
        await self._brokered(request, ctx, self.gateway.broker.proxy_model(request, ctx, call, targets, rest, request.query))

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
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        ctx: RequestContext | None = getattr(request, "context", None)
        log = ctx.log if ctx is not None else self.gateway.log
        log.error("unhandled_error", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        return write_error(request, errors.INTERNAL_ERROR, "the gateway failed to handle this request")


class GatewayFront:
    """
    What the data plane hands every complete request to: it gives the
    request its context (id, trace, client, clock time), the
    C{X-Request-ID} answer header, a JSON access line and its metrics when
    it ends, then serves C{/api/} through the broker and everything else
    through the Klein routes.  It also counts requests in flight, for
    draining.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.use(gateway)

    def use(self, gateway: Gateway) -> None:
        """Serve new requests from C{gateway}; requests in flight keep theirs."""
        gateway.metrics.watch(gateway.circuits, gateway.store_health)
        routes = GatewayRoutes(gateway)
        ended = functools.partial(self._ended, gateway)
        self._current = (gateway, routes, AdminBridge(routes.app.resource(), gateway.clock), ended)

    @property
    def gateway(self) -> Gateway:
        """The gateway new requests are served from."""
        return self._current[0]

    def handle(self, request: IncomingRequest) -> None:
        """Serve one complete request (called by the data plane)."""
        gateway, routes, admin, ended = self._current
        request_id = request_id_for(request.header(b"x-request-id"))
        trace = trace_context_for(request.header(b"traceparent"), request.header(b"tracestate"))
        ctx = RequestContext(
            request_id=request_id,
            client=client_address(request, gateway.config.ratelimit.trusted_proxies),
            started_at=gateway.clock.seconds(),
            base_log=gateway.log,
            trace=trace,
        )
        request.context = ctx
        request.on_end = ended
        request.set_header(b"X-Request-ID", request_id.encode("ascii"))
        self.in_flight += 1
        gateway.metrics.request_started()
        path = request.path
        if path.startswith(b"/api/") or (path.startswith(b"/v1/") and gateway.broker.models.models):
            handling = routes.api_request if path.startswith(b"/api/") else routes.openai_request
            handled = Deferred.fromCoroutine(handling(request))
            if not handled.called:
                ctx.handling = handled
            handled.addCallbacks(_api_done, _api_failed, callbackArgs=(request,), errbackArgs=(request, gateway))
        else:
            admin.serve(request)

    def _ended(self, gateway: Gateway, request: IncomingRequest, aborted: bool) -> None:
        ctx: RequestContext = request.context
        if aborted:
            # First, so that the broker can tell a client that left from a
            # failing backend when its work is cancelled.
            ctx.client_gone = True
            if ctx.outcome is None:
                ctx.outcome = "client_disconnected"
            if ctx.handling is not None and not ctx.handling.called:
                ctx.handling.cancel()
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


# -- the Klein routes, served in memory


class _AdminRequest(Request):
    """A twisted.web request that carries the gateway's context for the routes."""

    # The routes set their own Content-Type.
    defaultContentType = None

    def __init__(self, channel: Any, queued: bool = False) -> None:
        super().__init__(channel, queued)
        self.context = channel.site.pending_context
        channel.site.made = self


class _AdminSite(Site):
    requestFactory = _AdminRequest
    pending_context: RequestContext | None = None
    made: _AdminRequest | None = None
    noisy = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        """The front writes the access line."""


#: Request headers that describe the client connection, not the request.
_NOT_BRIDGED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"expect", b"keep-alive", b"upgrade"})
#: Answer headers the data plane writes itself (or, for Server, not at all).
_NOT_RELAYED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"server"})


class _AnswerReader:
    """Parses what twisted.web wrote into the client's answer."""

    def __init__(self, request: IncomingRequest) -> None:
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self.finished = False

    def feed(self, data: bytes) -> None:
        if not self.finished:
            self._parser.feed_data(data)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        length = None
        headers = []
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower not in _NOT_RELAYED:
                headers.append((name, value))
        request = self._request
        request.start(self._parser.get_status_code(), self._reason, headers, length)
        if request.method == b"HEAD":
            self.on_message_complete()  # no body follows, whatever Content-Length says

    def on_body(self, data: bytes) -> None:
        self._request.write(data)

    def on_message_complete(self) -> None:
        if not self.finished:
            self.finished = True
            self._request.finish()


class _AnswerTransport(StringTransport):
    """The in-memory transport a twisted.web channel writes its answer to."""

    def __init__(self, reader: _AnswerReader, peer: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 0))
        self._reader = reader

    def write(self, data: bytes) -> None:
        self._reader.feed(data)

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self._reader.feed(b"".join(seq))


class AdminBridge:
    """
    Serves the admin routes (probes, C{/metrics}, the JSON 404/405) with
    Klein, through twisted.web in memory: the request is written to an
    C{HTTPChannel} on an in-memory transport, and the answer that channel
    writes is parsed back (httptools) into the client's answer, which the
    data plane frames.  These requests are rare and small; the proxy's hot
    path never comes here.
    """

    def __init__(self, resource: Any, clock: IReactorTime) -> None:
        self._site = _AdminSite(resource, reactor=clock)
        self._site.timeOut = None

    def serve(self, request: IncomingRequest) -> None:
        """Answer C{request} from the Klein routes."""
        channel = self._site.buildProtocol(None)
        reader = _AnswerReader(request)
        channel.makeConnection(_AnswerTransport(reader, request.client_host))
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method, request.path + (b"?" + request.query if request.query else b""))]
        for name, value in request.headers:
            if name.lower() not in _NOT_BRIDGED:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"Content-Length: %d\r\n\r\n" % len(request.body))
        lines.append(request.body)
        self._site.pending_context = request.context
        try:
            channel.dataReceived(b"".join(lines))
        finally:
            self._site.pending_context = None
            made, self._site.made = self._site.made, None

        def release(result: object = None) -> None:
            # Once twisted.web is done with its request (after Klein's own
            # finish, which comes after the answer was written): not sooner.
            channel.connectionLost(Failure(ConnectionDone()))

        if made is None or made.finished:
            release()
        else:
            made.notifyFinish().addBoth(release)
