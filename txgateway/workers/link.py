"""
A worker's line to its supervisor: the channel it calls the shared state
through, the circuit verdicts it tells and hears, and the one view of the
daemon (C{/health}, C{/status.json}, C{/metrics}) gathered from every
worker through the supervisor.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from txgateway.admin.documents import status_document
from txgateway.observability.metrics import RecentWindows
from txgateway.workers.channel import CallChannel, ChannelClosed
from txgateway.workers.merge import merge_expositions, merge_health
from txgateway.workers.shared import CircuitShare

__all__ = ["SupervisorLink", "GATHER_TIMEOUT"]

#: Seconds a worker waits for the supervisor's gathered view before it
#: answers C{/health}, C{/status.json} or C{/metrics} with its own alone
#: (longer than the supervisor's own wait for each worker's snapshot).
GATHER_TIMEOUT = 3.0


class SupervisorLink:
    """
    One worker's connection to the supervisor at C{socket_path}.

    @ivar index: this worker's number (from 1), in its log lines and metrics.
    @ivar circuits: this worker's breakers, by place, for shared verdicts.
    @ivar gateway: a callable returning the worker's current
        L{txgateway.front.gateway.Gateway}, set by the service.
    @ivar on_lost: called once when the supervisor's connection goes
        while the worker is not stopping (the worker then stops: an orphan
        must not keep the port).
    """

    def __init__(
        self, connector: Callable[[ClientFactory], Any], clock: IReactorTime, index: int, log: Any, secret: str = "",
    ) -> None:
        self._connector = connector
        self._clock = clock
        self.index = index
        #: What proves to the supervisor that this process is the worker it spawned.
        self._secret = secret
        self._log = log
        self._channel: CallChannel | None = None
        self._connecting: list[Deferred] = []
        self.circuits = CircuitShare(self.notify)
        self.gateway: Callable[[], Any] = lambda: None
        self.on_lost: Callable[[], None] = lambda: None
        self.stopping = False

    # -- the connection

    def connect(self) -> None:
        """Connect (once the reactor runs) and say hello."""
        link = self

        class _Factory(ClientFactory):
            def buildProtocol(self, addr: Any) -> CallChannel:
                return CallChannel({"snapshot": link._snapshot, "open_circuit": link._open_circuit, "count_circuit": link._count_circuit}, link._made, link._lost)

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                link._failed(reason)

        self._connector(_Factory())

    def _made(self, channel: CallChannel) -> None:
        self._channel = channel
        channel.notify("hello", {"worker": self.index, "secret": self._secret})
        waiting, self._connecting = self._connecting, []
        for waiter in waiting:
            waiter.callback(channel)

    def _failed(self, reason: Failure) -> None:
        self._log.error("supervisor_unreachable", reason=reason.getErrorMessage())
        waiting, self._connecting = self._connecting, []
        for waiter in waiting:
            waiter.errback(ChannelClosed("the supervisor cannot be reached"))
        self.on_lost()

    def _lost(self, channel: CallChannel) -> None:
        self._channel = None
        if not self.stopping:
            self._log.error("supervisor_lost", reason="the supervisor's channel closed; this worker stops")
            self.on_lost()

    def call(self, name: str, args: Any = None) -> Deferred:
        """Ask the supervisor (waiting for the connection first, if it is being made)."""
        if self._channel is not None:
            return self._channel.call(name, args)
        waiting: Deferred = Deferred()
        self._connecting.append(waiting)
        return waiting.addCallback(lambda channel: channel.call(name, args))

    def notify(self, name: str, args: Any = None) -> None:
        """Tell the supervisor (dropped while not connected)."""
        if self._channel is not None:
            self._channel.notify(name, args)

    # -- what the supervisor asks of this worker

    def _snapshot(self, args: Any) -> dict:
        gateway = self.gateway()
        return {
            "health": gateway.local_health(),
            "metrics": gateway.metrics.exposition().decode("utf-8"),
            "windows": gateway.metrics.window_state(),
        }

    def _open_circuit(self, args: list) -> None:
        service, place, worker, reason = args
        self.circuits.open_here(service, place, worker, reason)

    def _count_circuit(self, args: list) -> None:
        service, place, worker, failed, reason = args
        self.circuits.count_here(service, place, worker, bool(failed), reason)

    # -- the one view

    def _gather(self) -> Deferred[dict]:
        """
        Every answering worker's snapshot, through the supervisor; if it does
        not answer within L{GATHER_TIMEOUT}, this worker's own alone (a probe
        is answered, and shows the daemon degraded).
        """
        own_only = {"uptime": None, "configured": None, "restarts": None, "snapshots": [[self.index, self._snapshot(None)]]}

        def alone(failure: Failure) -> dict:
            self._log.warning("supervisor_gather_failed", reason=failure.getErrorMessage(), answering="this worker alone")
            return own_only

        return self.call("gather").addTimeout(GATHER_TIMEOUT, self._clock).addErrback(alone)

    def health(self, own: dict) -> Deferred[dict]:
        """C{/health} for the whole daemon (C{own}: this worker's)."""
        return self._gather().addCallback(self._health, own)

    def _health(self, gathered: dict, own: dict) -> dict:
        documents = [snapshot["health"] for _, snapshot in gathered["snapshots"]] or [own]
        uptime = gathered["uptime"] if gathered["uptime"] is not None else own.get("uptime_s", 0.0)
        body = merge_health(documents, uptime)
        answering = len(gathered["snapshots"])
        body["workers"] = {"configured": gathered["configured"], "answering": answering, "restarts": gathered["restarts"]}
        if gathered["configured"] is None:
            body["workers"]["supervisor"] = "not answering"
        missing = gathered["configured"] is None or answering < gathered["configured"]
        if missing and body["status"] == "ok":
            body["status"] = "degraded"
        return body

    def status(self, gateway: Any) -> Deferred[dict]:
        """C{/status.json} for the whole daemon: merged health, and every worker's windows summed."""

        def document(gathered: dict) -> dict:
            health = self._health(gathered, gateway.local_health())
            windows = RecentWindows(self._clock)
            for _, snapshot in gathered["snapshots"]:
                windows.absorb(snapshot["windows"])
            return status_document(health, windows, gateway.store, gateway.config.source, gateway.last_reload)

        return self._gather().addCallback(document)

    def exposition(self, own: bytes) -> Deferred[bytes]:
        """C{/metrics} for the whole daemon: counters summed, gauges per worker, and the supervisor's own."""

        def merged(gathered: dict) -> bytes:
            texts = [(index, snapshot["metrics"]) for index, snapshot in gathered["snapshots"]]
            workers = GaugeMetricFamily("txgateway_workers", "Worker processes answering, and configured.", labels=["kind"])
            workers.add_metric(["answering"], len(texts))
            supervisor_families: list = [workers]
            if gathered["configured"] is not None:  # the supervisor answered
                workers.add_metric(["configured"], gathered["configured"])
                supervisor_families.append(CounterMetricFamily(
                    "txgateway_worker_restarts", "Worker processes that ended unasked and were started again.",
                    value=gathered["restarts"],
                ))
            return merge_expositions(texts or [(self.index, own.decode("utf-8"))], supervisor_families)

        return self._gather().addCallback(merged)
