"""
The one JSON error shape every client sees:

    {"error": {"type": "...", "message": "...", "request_id": "..."}}

Each kind of failure has a stable C{type} and its status code here, and
nowhere else.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

import attrs

__all__ = [
    "ErrorAnswer", "ErrorKind", "GatewayError", "KINDS", "describe_failure", "error_answer", "error_body", "without_credentials",
]


@attrs.frozen
class ErrorKind:
    """
    A stable error C{type} with the HTTP status that goes with it, and the
    C{Retry-After} every answer of that kind carries (L{None}: none, or
    one each answer computes: see L{GatewayError}'s C{headers}).
    """

    type: str
    status: int
    retry_after: int | None = None


BAD_REQUEST = ErrorKind("bad_request", 400)
UNAUTHORIZED = ErrorKind("unauthorized", 401)
NOT_FOUND = ErrorKind("not_found", 404)
UNKNOWN_SERVICE = ErrorKind("unknown_service", 404)
MODEL_NOT_FOUND = ErrorKind("model_not_found", 404)
#: A Responses call going on from a response the gateway does not hold for its caller.
PREVIOUS_RESPONSE_NOT_FOUND = ErrorKind("previous_response_not_found", 404)
METHOD_NOT_ALLOWED = ErrorKind("method_not_allowed", 405)
REQUEST_TIMEOUT = ErrorKind("request_timeout", 408)
BODY_TOO_LARGE = ErrorKind("body_too_large", 413)
RATE_LIMITED = ErrorKind("rate_limited", 429)
TOKENS_EXCEEDED = ErrorKind("tokens_exceeded", 429)
BUDGET_EXCEEDED = ErrorKind("budget_exceeded", 429)
TOO_MANY_PARALLEL = ErrorKind("too_many_parallel", 429)
MODEL_NOT_ALLOWED = ErrorKind("model_not_allowed", 403)
SERVICE_NOT_ALLOWED = ErrorKind("service_not_allowed", 403)
#: A request to change protocols (a WebSocket) where the gateway serves only HTTP: the client retries over HTTP.
UPGRADE_REQUIRED = ErrorKind("upgrade_required", 426)
HEADER_TOO_LARGE = ErrorKind("header_too_large", 431)
#: A governed key's request the gateway cannot account for (no model call, no price).
NOT_GOVERNABLE = ErrorKind("not_governable", 403)
#: A governed key's model call whose body is not JSON (a form, a file upload).
UNSUPPORTED_MEDIA_TYPE = ErrorKind("unsupported_media_type", 415)
#: Two different credentials of the gateway in one request.
AMBIGUOUS_CREDENTIALS = ErrorKind("ambiguous_credentials", 401)
#: A key the admin API turned off.
KEY_DISABLED = ErrorKind("key_disabled", 403)
#: An admin route asked with a caller's key, not an admin key.
FORBIDDEN = ErrorKind("forbidden", 403)
#: An admin change that contradicts what is there (a name taken, a team still used, a key of gateway.ini).
CONFLICT = ErrorKind("conflict", 409)
#: The admin store cannot be asked.
ADMIN_UNAVAILABLE = ErrorKind("admin_unavailable", 503)
INTERNAL_ERROR = ErrorKind("internal_error", 500)
NOT_IMPLEMENTED = ErrorKind("not_implemented", 501)
UPSTREAM_UNAVAILABLE = ErrorKind("upstream_unavailable", 502)
CIRCUIT_OPEN = ErrorKind("circuit_open", 503)
BUDGETS_UNAVAILABLE = ErrorKind("budgets_unavailable", 503)
#: The store of the Responses the gateway holds cannot be asked.
RESPONSES_UNAVAILABLE = ErrorKind("responses_unavailable", 503)
#: The gateway's own room is taken (C{[gateway] max_bodies_in_flight}, C{max_connections}, its open
#: files): a moment later there is some, whichever backend is asked.
GATEWAY_BUSY = ErrorKind("gateway_busy", 503, retry_after=1)
UPSTREAM_TIMEOUT = ErrorKind("upstream_timeout", 504)
#: Only in the SSE ``event: error`` that ends a stream broken after its
#: status was sent (the status here is what it would have been before).
STREAM_BROKEN = ErrorKind("stream_broken", 502)
STREAM_IDLE = ErrorKind("stream_idle", 504)

KINDS = {
    kind.type: kind
    for kind in (
        BAD_REQUEST,
        UNAUTHORIZED,
        NOT_FOUND,
        UNKNOWN_SERVICE,
        MODEL_NOT_FOUND,
        PREVIOUS_RESPONSE_NOT_FOUND,
        METHOD_NOT_ALLOWED,
        REQUEST_TIMEOUT,
        BODY_TOO_LARGE,
        HEADER_TOO_LARGE,
        UPGRADE_REQUIRED,
        NOT_GOVERNABLE,
        UNSUPPORTED_MEDIA_TYPE,
        AMBIGUOUS_CREDENTIALS,
        KEY_DISABLED,
        FORBIDDEN,
        CONFLICT,
        ADMIN_UNAVAILABLE,
        RATE_LIMITED,
        TOKENS_EXCEEDED,
        BUDGET_EXCEEDED,
        TOO_MANY_PARALLEL,
        MODEL_NOT_ALLOWED,
        SERVICE_NOT_ALLOWED,
        INTERNAL_ERROR,
        NOT_IMPLEMENTED,
        UPSTREAM_UNAVAILABLE,
        CIRCUIT_OPEN,
        BUDGETS_UNAVAILABLE,
        RESPONSES_UNAVAILABLE,
        GATEWAY_BUSY,
        UPSTREAM_TIMEOUT,
        STREAM_BROKEN,
        STREAM_IDLE,
    )
}


class GatewayError(Exception):
    """
    A failure to answer with the error shape: raise it anywhere below a
    route, and the route turns it into the response.

    @ivar headers: extra response headers, such as C{Retry-After}.
    """

    def __init__(
        self, kind: ErrorKind, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message
        self.headers = headers


def error_body(kind: ErrorKind, message: str, request_id: str) -> bytes:
    """The JSON bytes of the error shape."""
    return json.dumps(
        {"error": {"type": kind.type, "message": message, "request_id": request_id}}
    ).encode("utf-8")



@attrs.frozen
class ErrorAnswer:
    """A whole error answer: status, headers (Content-Type first) and the JSON body."""

    status: int
    headers: list
    body: bytes


def error_answer(
    kind: ErrorKind, message: str, request_id: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> ErrorAnswer:
    """
    The error answer a client sees, from the data plane, the front or the
    admin routes alike: every one is made here (with its kind's
    C{Retry-After}, unless C{headers} say one).
    """
    headers = [(b"Content-Type", b"application/json"), *headers]
    if kind.retry_after is not None and not any(name.lower() == b"retry-after" for name, _ in headers):
        headers.append((b"Retry-After", b"%d" % kind.retry_after))
    return ErrorAnswer(kind.status, headers, error_body(kind, message, request_id))


def describe_failure(error: Exception) -> str:
    """A short reason for a failed call (a connection, Redis), without a traceback."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


#: The password of a URL's user information (C{scheme://user:password@host}).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^@/\s'\"]+@")


def without_credentials(text: str) -> str:
    """C{text} with the password of every URL in it masked (C{redis://:***@host}), for messages and documents."""
    return _URL_PASSWORD.sub(r"\1***@", text)
