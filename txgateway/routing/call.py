"""
L{Call}: what one client request carries through the broker (its context,
the request, the path sent on, its targets, its deadline, the OpenAI
request read from its body and the transcript of its stream), one value
passed from part to part instead of a dozen parameters.
"""

from __future__ import annotations

import math

import attrs

from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.headers import request_headers_for_upstream
from txgateway.dataplane.server import IncomingRequest
from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.openai.relays import Transcript
from txgateway.openai.wire import OpenAICall
from txgateway.routing.model import Target

__all__ = ["Call"]


@attrs.define(eq=False)
class Call:
    """
    One client request on its way to a backend.

    @ivar path: the path and query sent on (checked), joined to each
        endpoint's base path.
    @ivar targets: where it may be served, in order (a service and its
        fallbacks, or a model's targets).
    @ivar openai: the OpenAI request read from the body, when the gateway
        reads it (its model is rewritten per target).
    @ivar deadline_at: the clock time after which no attempt starts (the
        first target's C{deadline} from when the chain began serving it).
    @ivar transcript: what the client was sent of a streamed completion, for a resume.
    """

    request: IncomingRequest
    ctx: RequestContext
    path: bytes
    targets: list[Target]
    openai: OpenAICall | None = None
    transcript: Transcript | None = None
    deadline_at: float = math.inf

    @classmethod
    def of(
        cls, request: IncomingRequest, ctx: RequestContext, path: bytes, targets: list[Target], openai: OpenAICall | None = None
    ) -> "Call":
        """
        A call of C{request} to C{targets} (its deadline starts when the
        chain serves it); an OpenAI call's facts start on C{ctx} here.
        """
        transcript = None
        if openai is not None:
            ctx.completion = CompletionFacts(
                requested_model=openai.model, operation=openai.operation(path), max_tokens=openai.max_tokens,
                stream=openai.stream,
            )
            if openai.stream:
                transcript = Transcript(openai.resumable_kind)
        return cls(request, ctx, path, targets, openai, transcript)

    @property
    def idempotency_key(self) -> bool:
        """The client sent an C{Idempotency-Key}: the request may be sent again after a silence."""
        return self.request.header(b"idempotency-key") is not None

    def body_for(self, target: Target, prefill: str | None = None) -> bytes:
        """The body sent to C{target} (the model renamed, the text so far as a prefill)."""
        if self.openai is None:
            return self.request.body
        return self.openai.body_for(target.model, prefill=prefill)

    def headers_for(self, config: ServiceConfig, span_id: str | None = None) -> list[tuple[bytes, bytes]]:
        """
        The headers the request carries to C{config}'s service (its trace
        context naming the attempt's span C{span_id} as the parent, when the
        attempt has one).
        """
        ctx = self.ctx
        extra = ctx.trace.headers(span_id) if ctx.trace is not None else []
        # The gateway's own API key stays here unless the service asks for it.
        withheld = (ctx.caller.header,) if ctx.caller is not None and not config.forward_api_key else ()
        if config.api_key:
            # The backend's key, in place of whatever the client sent.
            extra.append((b"Authorization", b"Bearer " + config.api_key.encode("ascii")))
        if config.speaks_openai:
            # The gateway reads these answers as they pass: no compression.
            extra.append((b"Accept-Encoding", b"identity"))
        return request_headers_for_upstream(self.request, ctx.request_id, ctx.client, extra=extra, withheld=withheld)
