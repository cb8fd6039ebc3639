"""
The operator's routes, served by Klein: C{/health}, C{/health/ready},
C{/health/live}, C{/metrics}, C{/status}, C{/status.json} and
C{/spend.json}, and the JSON
404, 405 and 500 for every other path that is not proxied.  They are thin:
the documents are built by L{txgateway.admin.documents}, the numbers are
kept by the metrics.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Iterable, Protocol

from klein import Klein
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from txgateway import __version__, errors
from txgateway.admin.page import STATUS_PAGE, status_page_with
from txgateway.errors import ErrorKind, GatewayError, describe_failure, error_answer
from txgateway.ids import request_id_for
from txgateway.observability.context import IRequestContext
from txgateway.observability.metrics import CONTENT_TYPE_LATEST, GatewayMetrics

__all__ = ["AdminRoutes", "OperatorView"]


class OperatorView(Protocol):
    """What the admin routes read of the running gateway."""

    accepting: bool
    metrics: GatewayMetrics
    log: Any

    def health(self) -> Any:
        """The C{/health} document, or a L{Deferred} of it."""

    def status(self) -> Any:
        """The C{/status.json} document, or a L{Deferred} of it."""

    def exposition(self) -> Any:
        """The C{/metrics} text, or a L{Deferred} of it."""

    def may_see_status(self, client: str, forwarded_by: str | None = None) -> bool:
        """
        Whether C{client} (an address) may see C{/status}; C{forwarded_by}:
        the peer that said it forwarded the request for another client.
        """

    def admin_resource(self) -> Any:
        """The admin API's resource when it is served on this address, else L{None}."""

    def spend(self, end_user: tuple[str, str] | None = None) -> Any:
        """
        A L{Deferred} of the C{/spend.json} document, or L{None} when no key
        is governed; with C{end_user} (a key's name and an end user's id),
        that end user's own allowance too (a L{GatewayError} for no such key).
        """


def _context(request: IRequest) -> Any:
    return IRequestContext(request, None)


def _error(
    request: IRequest, kind: ErrorKind, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """Set the status and headers of an error answer on a twisted.web request; returns its body."""
    ctx = _context(request)
    if ctx is not None:
        ctx.outcome = kind.type
    answer = error_answer(kind, message, ctx.request_id if ctx is not None else request_id_for(None), headers)
    request.setResponseCode(answer.status)
    for name, value in answer.headers:
        request.setHeader(name, value)
    return _sized(request, answer.body)


def _sized(request: IRequest, body: bytes) -> bytes:
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _json(request: IRequest, body: dict, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return _sized(request, json.dumps(body).encode("utf-8"))


def may_see_status(allow: Iterable[Any], client: str) -> bool:
    """Whether the address C{client} is in one of the networks C{allow}."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(ip in network for network in allow)


#: The root document: the gateway's name, its version and the APIs it serves.
_ROOT = {
    "name": "txgateway",
    "version": __version__,
    "apis": {
        "openai": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models"],
        "anthropic": ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"],
        "services": "/api/<service>/",
    },
}


class AdminRoutes:
    """The Klein routes of one gateway's operator view."""

    app = Klein()

    def __init__(self, view: OperatorView) -> None:
        self.view = view

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        """What is served here, for the clients that probe a base URL (Claude Code sends C{HEAD /} first)."""
        return _json(request, _ROOT)

    @app.route("/admin")
    def admin_page(self, request: IRequest) -> bytes:
        """C{/admin/}, where the admin page and API are (its calls are relative to it): a 308, for any method."""
        request.setResponseCode(308)
        request.setHeader(b"Location", b"/admin/")
        return _sized(request, b"")

    @app.route("/admin/", branch=True)
    def admin(self, request: IRequest) -> Any:
        """The admin API and page (C{[admin] keys}), unless it listens on C{[admin] listen}."""
        resource = self.view.admin_resource()
        if resource is None:
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        return resource

    @app.route("/health/live", methods=["GET", "HEAD"])
    def live(self, request: IRequest) -> bytes:
        """The process answers."""
        return _json(request, {"status": "alive"})

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def ready(self, request: IRequest) -> bytes:
        """The gateway takes new requests (503 once a drain began)."""
        if self.view.accepting:
            return _json(request, {"status": "ready"})
        return _json(request, {"status": "shutting_down"}, 503)

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        """
        Every service's and model's circuits and the stores' health, to
        C{[status] allow}; anyone else gets the status word alone (backend
        URLs and the model map are the operator's).
        """
        document = await maybeDeferred(self.view.health)
        if not self._may_see_status(request):
            document = {"status": document["status"]}
        return _json(request, document)

    def _may_see_status(self, request: IRequest) -> bool:
        """Whether the request comes from C{[status] allow} (a forwarded one: see L{OperatorView.may_see_status})."""
        ctx = _context(request)
        peer = request.getClientAddress().host
        forwarded = request.getHeader(b"forwarded") is not None or request.getHeader(b"x-forwarded-for") is not None
        return self.view.may_see_status(ctx.client if ctx is not None else peer, peer if forwarded else None)

    @app.route("/status", methods=["GET", "HEAD"])
    async def status_page(self, request: IRequest) -> bytes:
        """The status page (to allowed addresses only; others see a 404), holding its first data."""
        if not self._may_see_status(request):
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        page = STATUS_PAGE
        try:
            status = await maybeDeferred(self.view.status)
            spending = self.view.spend()
            spend = await spending if spending is not None else None
        except Exception as error:
            # The page still comes, and fetches its data itself.
            self.view.log.warning("status_page_first_data_failed", reason=describe_failure(error))
        else:
            page = status_page_with(json.dumps({"status": status, "spend": spend}))
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return _sized(request, page.encode("utf-8"))

    @app.route("/status.json", methods=["GET", "HEAD"])
    async def status_document(self, request: IRequest) -> bytes:
        """What the status page shows, as JSON."""
        if not self._may_see_status(request):
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        return _json(request, await maybeDeferred(self.view.status))

    @app.route("/spend.json", methods=["GET", "HEAD"])
    async def spend(self, request: IRequest) -> bytes:
        """
        Each governed key's and team's spend and remaining budget, spend per
        model per day, the end users who spent the most; with
        C{?key=NAME&end_user=ID}, that end user's own allowance.
        """
        if not self._may_see_status(request):
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        key, end_user = (request.args.get(name, [None])[0] for name in (b"key", b"end_user"))
        if (key is None) != (end_user is None):
            return _error(request, errors.BAD_REQUEST, "give key and end_user together: ?key=NAME&end_user=ID")
        asked = None if key is None else (key.decode("utf-8", "replace"), end_user.decode("utf-8", "replace"))
        spending = self.view.spend(asked)
        if spending is None:
            return _error(request, errors.NOT_FOUND, "no key is governed: no [key:NAME] limit, team or price is set")
        try:
            document = await spending
        except GatewayError as error:
            return _error(request, error.kind, error.message)
        except Exception as error:
            self.view.log.warning("spend_unavailable", reason=describe_failure(error))
            return _error(request, errors.BUDGETS_UNAVAILABLE, "the budgets store did not answer; try again")
        return _json(request, document)

    @app.route("/metrics", methods=["GET", "HEAD"])
    async def metrics(self, request: IRequest) -> bytes:
        """The Prometheus exposition (key and team names, spend): to C{[status] allow} only, like C{/status}."""
        if not self._may_see_status(request):
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        text = await maybeDeferred(self.view.exposition)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return _sized(request, text)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """Any other path."""
        return _error(request, errors.NOT_FOUND, "nothing is served at this path")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        """A method a route does not take."""
        return method_not_allowed(request, failure)

    @app.handle_errors
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """A route that failed: logged with its traceback, answered without it."""
        return unexpected(request, failure, self.view.log)


def method_not_allowed(request: IRequest, failure: Failure) -> bytes:
    """The answer to a method a Klein route does not take (its C{Allow} header said)."""
    allowed = failure.value.valid_methods or []
    return _error(
        request,
        errors.METHOD_NOT_ALLOWED,
        f"{request.method.decode('ascii', 'replace')} is not allowed here",
        [(b"Allow", ", ".join(allowed).encode("ascii"))],
    )


def unexpected(request: IRequest, failure: Failure, log: Any) -> bytes:
    """The answer to a Klein route that failed: logged with its traceback (on C{log} without a context), answered without it."""
    ctx = _context(request)
    (ctx.log if ctx is not None else log).error(
        "unhandled_error", exc_info=(failure.type, failure.value, failure.getTracebackObject()),
    )
    return _error(request, errors.INTERNAL_ERROR, "the gateway failed to handle this request")
