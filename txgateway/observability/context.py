"""
Who is asking and what became of the request: the client's address, the
caller, and the per-request context that every log line, the access line
and every C{X-Gateway-*} header (stamped here, in one place) draw from.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence, Union

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from txgateway.observability.tracing import SpanNotes, TraceContext

__all__ = ["Caller", "IRequestContext", "CompletionFacts", "RequestContext", "SpendFacts", "client_address", "is_trusted_proxy"]

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]




class IRequestContext(Interface):
    """
    The L{RequestContext} of a request, as a component of the twisted.web
    request the admin routes render (C{IRequestContext(request)}).
    """


def _is_trusted(address: str, trusted: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(request: Any, trusted_proxies: Sequence[_Network] = ()) -> str:
    """
    The client's address: the socket peer, unless the peer is one of the
    C{trusted_proxies}, in which case the nearest address in
    C{X-Forwarded-For} that is not itself a trusted proxy.
    """
    address = request.client_host
    if not trusted_proxies or not _is_trusted(address, trusted_proxies):
        return address
    hops = []
    for value in request.header_values(b"x-forwarded-for"):
        hops.extend(part.strip() for part in value.decode("latin-1").split(","))
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # A forged or broken entry: stop trusting the chain here.
            return address
        if not _is_trusted(hop, trusted_proxies):
            return hop
        address = hop
    return address


def is_trusted_proxy(address: str, trusted_proxies: Sequence[_Network]) -> bool:
    """Whether the peer C{address} is one of the C{trusted_proxies} (whose C{X-Forwarded-For} is believed)."""
    return bool(trusted_proxies) and _is_trusted(address, trusted_proxies)


@attrs.frozen
class Caller:
    """
    Who is calling, by key name, and which headers carried the gateway's
    keys (so that they can be kept from the backend).
    """

    name: str
    header: bytes
    #: Every header that carried one of the gateway's keys (C{header} first).
    headers: tuple[bytes, ...] = ()

    @property
    def withheld(self) -> tuple[bytes, ...]:
        """The headers a backend never gets (unless its service asks for the key)."""
        return self.headers or (self.header,)


@attrs.define
class CompletionFacts:
    """
    What the access line says of an OpenAI request: the model asked for,
    the model that answered (as the backend names it in its usage, else as
    sent), the tokens every attempt reported, and the resumes of its stream.
    """

    requested_model: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    resumed: int = 0
    #: Where its stream was resumed (a tuple, made anew when it grows: most calls hold none for as long as they stream).
    resumed_on: tuple[str, ...] = ()
    #: What the client asked for: C{chat}, C{text_completion}, C{embeddings}... (the GenAI operation).
    operation: str | None = None
    #: The most the client let it complete (C{max_completion_tokens} or C{max_tokens}).
    max_tokens: int | None = None
    #: Each backend answer's usage, with the model it was sent as (what is billed).
    billed: tuple[tuple[str | None, Any], ...] = ()
    #: The client asked for a stream.
    stream: bool = False
    #: The answer's id and why each of its choices ended, as the client got them.
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    #: The API of the backend that answered (C{gen_ai.provider.name}): C{openai} or C{anthropic}.
    target_api: str = "openai"
    #: The gateway cut the stream at the completion its key reserved (the backend went past it).
    stream_cut: bool = False
    #: Who the call is for (the client's end user) and their session, as the call says them.
    end_user: str | None = None
    session: str | None = None

    def fields(self) -> dict[str, Any]:
        """The access line's fields."""
        fields = {
            "requested_model": self.requested_model,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "resumed": self.resumed,
            "resumed_on": list(self.resumed_on),
        }
        if self.stream_cut:
            fields["stream_cut"] = True
        if self.end_user is not None:
            fields["end_user"] = self.end_user
        if self.session is not None:
            fields["session"] = self.session
        return fields


@attrs.define
class SpendFacts:
    """What the access line says of a governed key's request: its reservation and its cost."""

    key: str
    team: str | None
    reserved_tokens: int
    cost_usd: float | None = None

    def fields(self) -> dict[str, Any]:
        """The access line's fields."""
        return {"key": self.key, "team": self.team, "reserved_tokens": self.reserved_tokens, "cost_usd": self.cost_usd}


@attrs.define
class RequestContext:
    """
    What the gateway reports of one request while it is in flight: what its
    access line, its spans and its answer's C{X-Gateway-*} headers say.  It
    is a report, not a blackboard: the rooms write what happened here, and
    decide by their own objects (routing by its call and each target's
    attempts, the data plane by its request).

    @ivar started_at: the injected clock's time when the request arrived.
    @ivar base_log: the gateway's structlog logger; L{log} binds it to the
        request id (and trace id) on first use, as most requests log
        nothing but their access line.
    """

    request_id: str
    client: str
    started_at: float
    base_log: Any
    service: str | None = None
    attempts: int = 0
    outcome: str | None = None
    client_gone: bool = False
    trace: TraceContext | None = None
    caller: Caller | None = None
    handling: Deferred | None = None
    #: The service (and, for a model, the model name sent) of the target serving the request now.
    served_by: str | None = None
    served_model: str | None = None
    #: The targets that gave up before this one (a tuple, made anew when it grows).
    fallback_from: tuple[str, ...] = ()
    #: The response cache's verdict (hit, miss, bypass, coalesced), for cached services.
    cache: str | None = None
    #: Set for OpenAI (and Messages) requests only.
    completion: CompletionFacts | None = None
    #: The client's API when its errors take that API's shape: C{anthropic} on C{/v1/messages}, else L{None} (the gateway's).
    client_api: str | None = None
    #: Set for governed keys only.
    spend: SpendFacts | None = None
    #: Set when the request's spans are exported (it is sampled and an exporter is configured).
    span_notes: SpanNotes | None = None
    #: The C{[model:NAME]} section (or C{*}) that routed an OpenAI request.
    model_section: str | None = None
    #: When the answer's status and headers started (the clock's time), once they did.
    answered_at: float | None = None
    #: Its handling goes on when its client leaves (a governed JSON call: its backend makes the
    #: answer anyway, and it is paid from what the answer reports): the door does not cancel it.
    outlives_client: bool = False
    _bound_log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to this request's ids."""
        if self._bound_log is None:
            trace_id = self.trace.trace_id if self.trace is not None else None
            if self.caller is not None:
                self._bound_log = self.base_log.bind(request_id=self.request_id, trace_id=trace_id, api_key_name=self.caller.name)
            else:
                self._bound_log = self.base_log.bind(request_id=self.request_id, trace_id=trace_id)
        return self._bound_log

    def identify(self, caller: Caller) -> None:
        """The request carries C{caller}'s key: its name goes on every later log line of the request."""
        self.caller = caller
        if self._bound_log is not None:
            self._bound_log = self._bound_log.bind(api_key_name=caller.name)

    def stamp(self, request: Any, now: float) -> None:
        """
        Put the gateway's own account on C{request}'s answer, just before it
        starts (every C{X-Gateway-*} header is written here and nowhere
        else): the service (and model) that answered, the targets that
        gave up before it, the whole ms until now, and the attempts made.
        """
        service = self.served_by or self.service
        if service is not None:
            request.set_header(b"X-Gateway-Service", service.encode("ascii"))
        if self.served_model is not None:
            request.set_header(b"X-Gateway-Model", self.served_model.encode("ascii"))
        if self.fallback_from:
            request.set_header(b"X-Gateway-Fallback-From", ", ".join(self.fallback_from).encode("ascii"))
        self.answered_at = now
        request.set_header(b"X-Gateway-Response-Time", b"%d" % round((now - self.started_at) * 1000.0))
        request.set_header(b"X-Gateway-Attempts", b"%d" % self.attempts)

    def bind(self, **values: Any) -> None:
        """Add C{values} to every later line of this request's log."""
        self._bound_log = self.log.bind(**values)
