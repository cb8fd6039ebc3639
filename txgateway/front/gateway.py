"""
L{Gateway}: one configuration of the running gateway, as the front and the
admin routes see it; a reload builds a new one, and requests in flight
finish on the old.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from txgateway.admin.api import AdminApi
from txgateway.admin.documents import end_user_document, health_document, spend_document, status_document
from txgateway.admin.routes import may_see_status
from txgateway.config.gateway import GatewayConfig
from txgateway import errors
from txgateway.errors import GatewayError
from txgateway.front.auth import Authenticator
from txgateway.governance.governor import user_limits
from txgateway.observability.context import is_trusted_proxy
from txgateway.observability.logs import AccessLog
from txgateway.observability.metrics import GatewayMetrics
from txgateway.ratelimit.interface import IRateLimitStore
from txgateway.routing.broker import ServiceBroker
from txgateway.speaking import bounded_id

__all__ = ["Gateway", "SPEND_DAYS"]

#: Days of spend per model C{/spend.json} shows.
SPEND_DAYS = 31


class Gateway:
    """
    One configuration's parts: the broker, the rate-limit store, the logs
    and metrics, the API keys.

    @ivar accepting: L{False} once shutdown has begun (C{/health/ready}
        answers 503).
    @ivar started_at: when the daemon started (kept across reloads).
    @ivar last_reload: when the configuration was last reloaded, and how it
        went (C{{"time", "outcome"}}), for C{/status}.
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
        spans: Any = None,
        sample_ratio: float = 1.0,
        rng: Any = None,
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
        #: The Responses conversations the gateway holds (L{None}: C{[responses] store = off}).
        self.conversations: Any = None
        self.last_reload: dict | None = None
        #: Where sampled requests' spans go (a L{txgateway.observability.export.SpanExport}), or L{None}.
        self.spans = spans
        self._sample_ratio = sample_ratio
        self._random = (rng or random.Random()).random
        #: The other workers of a daemon of workers (a
        #: L{txgateway.workers.link.SupervisorLink}), whose views the
        #: operator's documents merge; L{None} for a single process.
        self.peers: Any = None
        #: The admin API's work (a L{txgateway.admin.control.AdminControl}), or L{None}: no C{[admin] keys}.
        self.admin: Any = None
        self._admin_resource: Any = None

    def admin_resource(self, own_listener: bool = False) -> Any:
        """
        The admin API's Klein resource, served under C{/admin/} on the
        gateway's address (C{own_listener} false) or on C{[admin] listen}
        (true); L{None} where it is not served.
        """
        if self.admin is None or bool(self.config.admin.listen) != own_listener:
            return None
        if self._admin_resource is None:
            admins = {key.digest: key.name for key in self.config.admin.keys}
            api = AdminApi(self.admin, admins, self.authenticator.name_of, self.spend, self.log)
            self._admin_resource = api.app.resource()
        return self._admin_resource

    def sample(self) -> bool:
        """Whether a new trace is sampled (C{[tracing] sample_ratio}; a client's sampled flag wins over this)."""
        return self._sample_ratio >= 1.0 or self._random() < self._sample_ratio

    def spans_dropped(self) -> int | None:
        """Spans that never left, for C{/metrics} (L{None}: no export)."""
        return self.spans.dropped if self.spans is not None else None

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

    def local_health(self) -> dict:
        """This process's C{/health} document."""
        return health_document(self.broker, self.store, self.clock.seconds() - self.started_at, self.accepting)

    def health(self) -> dict | Deferred[dict]:
        """What C{GET /health} answers: this process's, or (workers) a L{Deferred} of the daemon's."""
        if self.peers is not None:
            return self.peers.health(self.local_health())
        return self.local_health()

    def status(self) -> dict | Deferred[dict]:
        """What C{/status.json} answers (a L{Deferred} with workers)."""
        if self.peers is not None:
            return self.peers.status(self)
        return status_document(self.local_health(), self.metrics, self.store, self.config.source, self.last_reload)

    def exposition(self) -> bytes | Deferred[bytes]:
        """What C{/metrics} answers (a L{Deferred} with workers: every worker's, merged)."""
        own = self.metrics.exposition()
        if self.peers is not None:
            return self.peers.exposition(own)
        return own

    def spend(self, end_user: tuple[str, str] | None = None) -> Any:
        """
        A L{Deferred} of what C{/spend.json} answers, or L{None} when no key
        is governed; with C{end_user} (a key's name, an end user's id), that
        end user's own allowance under C{end_user} (L{GatewayError}
        C{not_found}: no such key).
        """
        governor = self.broker.governor
        if governor is None:
            return None
        scopes = governor.scopes()
        key = None
        if end_user is not None:
            key = governor.keys.get(end_user[0])
            if key is None:
                return fail(GatewayError(errors.NOT_FOUND, f"no key is named {end_user[0]!r}"))
            scopes.append(user_limits(key, bounded_id(end_user[1]) or ""))
        spending = governor.store.spend(scopes, SPEND_DAYS)

        def document(report: Any) -> dict:
            body = spend_document(report, governor)
            if key is not None:
                body["end_user"] = end_user_document(report, key, bounded_id(end_user[1]) or "")
            return body

        return spending.addCallback(document)

    def may_see_status(self, client: str, forwarded_by: str | None = None) -> bool:
        """
        Whether C{client} is in C{[status] allow}.  A request forwarded
        (C{forwarded_by}: its peer) by a proxy not in C{trusted_proxies} is
        not local, whatever its peer: a reverse proxy on the same host makes
        every client look like 127.0.0.1.
        """
        if forwarded_by is not None and not is_trusted_proxy(forwarded_by, self.config.ratelimit.trusted_proxies):
            return False
        return may_see_status(self.config.status.allow, client)
