"""
The admin API's routes under C{/admin/}, served by Klein: keys, teams,
spend, the audit trail and the admin page.  Every route but the page's
shell needs an admin key (C{Authorization: Bearer <secret>} of C{[admin]
keys}); a caller's key is 403, no key 401.  JSON in and out, errors in
the one shape.  The routes are thin: L{AdminControl} does the work.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from txgateway import errors
from txgateway.admin.console import ADMIN_PAGE
from txgateway.admin.control import AdminControl
from txgateway.admin.routes import _context, _error, _json, _sized, method_not_allowed, unexpected
from txgateway.errors import GatewayError

__all__ = ["AdminApi", "AdminListener"]

#: The most audit entries one answer holds.
MOST_AUDIT_ENTRIES = 1000


class AdminApi:
    """
    The Klein routes of the admin API.

    @param admins: the admin keys' digests, to their names (C{[admin] keys}).
    @param caller_named: the name of the caller key a secret is, or L{None}.
    @param spend: a L{Deferred} of C{/spend.json}'s document, or L{None} when nothing is governed.
    """

    app = Klein()

    def __init__(
        self, control: AdminControl, admins: dict[bytes, str], caller_named: Callable[[bytes], str | None],
        spend: Callable[[], Any], log: Any,
    ) -> None:
        self.control = control
        self._admins = admins
        self._caller_named = caller_named
        self._spend = spend
        self._log = log

    def _actor(self, request: IRequest) -> str:
        """
        The admin whose key the request carries.

        @raise GatewayError: C{unauthorized} (none), C{forbidden} (a caller's key).
        """
        value = request.getHeader(b"authorization") or b""
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token:
            name = self._admins.get(hashlib.sha256(token).digest())
            if name is not None:
                return name
            if self._caller_named(token) is not None:
                raise GatewayError(errors.FORBIDDEN, "this is a caller's API key; the admin API takes an admin key ([admin] keys)")
        raise GatewayError(
            errors.UNAUTHORIZED, "an admin key is needed: Authorization: Bearer <admin key> ([admin] keys)",
            headers=((b"WWW-Authenticate", b'Bearer realm="txgateway admin"'),),
        )

    @staticmethod
    def _body(request: IRequest) -> Any:
        raw = request.content.read() if request.content is not None else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as error:
            raise GatewayError(errors.BAD_REQUEST, f"the body is not JSON: {error}") from None

    async def _answer(self, request: IRequest, work: Callable[[str], Any], status: int = 200) -> bytes:
        """Run C{work} for the request's admin, answering its JSON (or its error)."""
        try:
            actor = self._actor(request)
            result = await maybeDeferred(work, actor)  # a value, a Deferred or a coroutine alike
        except GatewayError as error:
            return _error(request, error.kind, error.message, error.headers)
        ctx = _context(request)
        if ctx is not None:
            ctx.outcome = "ok"
        return _json(request, result, status)

    # -- the page

    @app.route("/", methods=["GET", "HEAD"])
    def page(self, request: IRequest) -> bytes:
        """The admin page: a shell with no data (it asks for an admin key, then calls this API with it)."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return _sized(request, ADMIN_PAGE.encode("utf-8"))

    # -- keys

    @app.route("/keys", methods=["GET", "HEAD"])
    def keys(self, request: IRequest) -> Any:
        """Every key (gateway.ini's read-only, with where they come from)."""
        return self._answer(request, lambda actor: {"keys": self.control.keys()})

    @app.route("/keys", methods=["POST"])
    def create_key(self, request: IRequest) -> Any:
        """A new key: its secret in the answer, once."""
        return self._answer(request, lambda actor: self.control.create_key(self._body(request), actor), 201)

    @app.route("/keys/<name>", methods=["GET", "HEAD"])
    def key(self, request: IRequest, name: str) -> Any:
        """One key."""
        return self._answer(request, lambda actor: self.control.key(name))

    @app.route("/keys/<name>", methods=["PATCH"])
    def change_key(self, request: IRequest, name: str) -> Any:
        """Any of a key's fields, and C{disabled}."""
        return self._answer(request, lambda actor: self.control.change_key(name, self._body(request), actor))

    @app.route("/keys/<name>/rotate", methods=["POST"])
    def rotate_key(self, request: IRequest, name: str) -> Any:
        """A new secret; the old one valid for C{grace_seconds}."""
        return self._answer(request, lambda actor: self.control.rotate_key(name, self._body(request), actor))

    @app.route("/keys/<name>", methods=["DELETE"])
    def delete_key(self, request: IRequest, name: str) -> Any:
        """A key gone: its secret is refused at once."""
        return self._answer(request, lambda actor: self.control.delete_key(name, actor))

    # -- teams

    @app.route("/teams", methods=["GET", "HEAD"])
    def teams(self, request: IRequest) -> Any:
        """Every team (gateway.ini's read-only)."""
        return self._answer(request, lambda actor: {"teams": self.control.teams()})

    @app.route("/teams", methods=["POST"])
    def create_team(self, request: IRequest) -> Any:
        """A new team."""
        return self._answer(request, lambda actor: self.control.create_team(self._body(request), actor), 201)

    @app.route("/teams/<name>", methods=["GET", "HEAD"])
    def team(self, request: IRequest, name: str) -> Any:
        """One team."""
        return self._answer(request, lambda actor: self.control.team(name))

    @app.route("/teams/<name>", methods=["PATCH"])
    def change_team(self, request: IRequest, name: str) -> Any:
        """Any of a team's fields."""
        return self._answer(request, lambda actor: self.control.change_team(name, self._body(request), actor))

    @app.route("/teams/<name>", methods=["DELETE"])
    def delete_team(self, request: IRequest, name: str) -> Any:
        """A team gone (none of its keys may be left)."""
        return self._answer(request, lambda actor: self.control.delete_team(name, actor))

    # -- spend and audit

    @app.route("/spend", methods=["GET", "HEAD"])
    def spend(self, request: IRequest) -> Any:
        """What C{/spend.json} shows."""

        def spend(actor: str) -> Any:
            spending = self._spend()
            if spending is None:
                return {"keys": {}, "teams": {}, "models_by_day": [], "by_day": [], "end_users": []}
            return spending

        return self._answer(request, spend)

    @app.route("/audit", methods=["GET", "HEAD"])
    def audit(self, request: IRequest) -> Any:
        """Every change, newest first (C{?limit=N}, at most 1,000): who, when, what, before and after."""
        raw = request.args.get(b"limit", [b"100"])[0]

        def audit(actor: str) -> Any:
            try:
                limit = int(raw)
            except ValueError:
                limit = 0
            if not 1 <= limit <= MOST_AUDIT_ENTRIES:
                raise GatewayError(errors.BAD_REQUEST, f"limit: expected a whole number from 1 to {MOST_AUDIT_ENTRIES}")
            return self.control.audit(limit).addCallback(lambda entries: {"entries": entries})

        return self._answer(request, audit)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """Any other admin path."""
        return _error(request, errors.NOT_FOUND, "no admin route is at this path")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        """A method the route does not take."""
        return method_not_allowed(request, failure)

    @app.handle_errors
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """A route that failed: logged with its traceback, answered without it."""
        return unexpected(request, failure, self._log)


class AdminListener:
    """
    What C{[admin] listen} serves: the admin API under C{/admin/} of the
    gateway serving now (C{current}), and JSON 404s elsewhere.
    """

    app = Klein()

    def __init__(self, current: Callable[[], Any]) -> None:
        self._current = current

    @app.route("/admin")
    def admin_page(self, request: IRequest) -> bytes:
        """C{/admin/}, where the admin page and API are (its calls are relative to it): a 308, for any method."""
        request.setResponseCode(308)
        request.setHeader(b"Location", b"/admin/")
        return _sized(request, b"")

    @app.route("/admin/", branch=True)
    def admin(self, request: IRequest) -> Any:
        """The admin API of the gateway serving now."""
        resource = self._current().admin_resource(own_listener=True)
        if resource is None:
            return _error(request, errors.NOT_FOUND, "nothing is served at this path")
        return resource

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """Any other path: only the admin API listens here."""
        return _error(request, errors.NOT_FOUND, "only the admin API (/admin/) is served at this address")
