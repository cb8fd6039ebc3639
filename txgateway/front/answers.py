"""
The front's own answers on the data plane: the one JSON error shape (made
by L{txgateway.errors.error_answer}) written to an L{IncomingRequest}.
"""

from __future__ import annotations

from typing import Iterable

from txgateway.anthropic.wire import ANTHROPIC, gateway_error_body
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import ErrorKind, error_answer
from txgateway.observability.context import RequestContext

__all__ = ["answer_error"]


def answer_error(
    request: IncomingRequest, kind: ErrorKind, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """
    Answer C{request} with the JSON error shape (Anthropic's on
    C{/v1/messages}); its outcome is the error's type.
    """
    ctx: RequestContext = request.context
    ctx.outcome = kind.type
    answer = error_answer(kind, message, ctx.request_id, headers)
    if ctx.client_api == ANTHROPIC:
        status, body = gateway_error_body(kind, message, ctx.request_id)
        request.respond(status, body, answer.headers)
        return
    request.respond(answer.status, answer.body, answer.headers)
