"""
Who is asking: the request id, the client's address, and the per-request
context that every log line and header about the request draws from.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Sequence, Union

import attrs
from twisted.internet.defer import Deferred

from txgateway.auth import Caller
from txgateway.ids import uuid4_string
from txgateway.tracing import TraceContext

__all__ = ["CompletionFacts", "RequestContext", "client_address", "request_id_for"]

_SAFE_ID = re.compile(rb"[A-Za-z0-9_.:-]{1,128}")

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def request_id_for(sent: bytes | None) -> str:
    """
    The id a request goes by: the client's C{X-Request-ID} when it is short
    and safe (letters, digits, C{-_.:}, at most 128), else a new UUID, so it
    can never inject a header or a log field.
    """
    if sent is not None and _SAFE_ID.fullmatch(sent):
        return sent.decode("ascii")
    return uuid4_string()


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
    resumed_on: list[str] = attrs.Factory(list)

    def fields(self) -> dict[str, Any]:
        """The access line's fields."""
        return {
            "requested_model": self.requested_model,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "resumed": self.resumed,
            "resumed_on": self.resumed_on,
        }


@attrs.define
class RequestContext:
    """
    What the gateway knows about one request while it is in flight.

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
    served_by: str | None = None
    fallback_from: list[str] = attrs.Factory(list)
    #: The response cache's verdict (hit, miss, bypass, coalesced), for cached services.
    cache: str | None = None
    #: Set for OpenAI requests only.
    completion: CompletionFacts | None = None
    _bound_log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to this request's ids."""
        if self._bound_log is None:
            trace_id = self.trace.trace_id if self.trace is not None else None
            self._bound_log = self.base_log.bind(request_id=self.request_id, trace_id=trace_id)
        return self._bound_log

    def stamp(self, request: Any, now: float) -> None:
        """
        Put the gateway's own account on C{request}'s answer, just before it
        starts: C{X-Gateway-Response-Time} (whole ms until now) and
        C{X-Gateway-Attempts}.
        """
        request.set_header(b"X-Gateway-Response-Time", b"%d" % round((now - self.started_at) * 1000.0))
        request.set_header(b"X-Gateway-Attempts", b"%d" % self.attempts)

    def bind(self, **values: Any) -> None:
        """Add C{values} to every later line of this request's log."""
        self._bound_log = self.log.bind(**values)
