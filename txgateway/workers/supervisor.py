"""
The supervisor: with C{[gateway] workers} above 1, the twistd process
serves no proxied traffic; it starts the workers, replaces one that dies
(with a backoff, so a crash loop cannot spin), holds the state they share
and answers their calls over a UNIX socket, validates a reload once and
passes it on, and stops when every worker has drained.
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
import signal
import tempfile
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from txgateway.config.gateway import ConfigError, GatewayConfig
from txgateway.workers.channel import CallChannel
from txgateway.workers.state import SharedState

__all__ = ["Supervisor", "restart_delay", "WORKER_ARGUMENT", "WORKER_SECRET_ENV"]

#: The twistd option that makes a process a worker: C{--worker INDEX:SOCKET}.
WORKER_ARGUMENT = "--worker"
#: The environment variable a worker finds its secret in (its hello on the control socket carries it).
WORKER_SECRET_ENV = "TXGATEWAY_WORKER_SECRET"

#: A worker that lived this long before it ended starts again at once.
STEADY_SECONDS = 30.0
#: The longest wait before a crashing worker is started again.
MAX_RESTART_DELAY = 30.0
#: Seconds a worker may take to answer a snapshot for the one view.
SNAPSHOT_TIMEOUT = 2.0
#: Seconds past its drain that a worker is given before it is killed.
STOP_GRACE = 10.0


def restart_delay(quick_deaths: int) -> float:
    """Seconds before starting a worker again after its C{quick_deaths}-th consecutive quick end: 0, 1, 2, 4 ... 30."""
    if quick_deaths <= 0:
        return 0.0
    return min(MAX_RESTART_DELAY, 2.0 ** (quick_deaths - 1))


class _WorkerSlot:
    """One worker's place: its process, its channel, how often it ended quickly."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.pid: int | None = None
        self.channel: CallChannel | None = None
        self.started_at = 0.0
        self.quick_deaths = 0
        self.ended: Deferred | None = None
        self.restart: Any = None
        #: The secret this slot's current process proves itself with (new at each spawn).
        self.secret = ""


class _WorkerProcess(ProcessProtocol):
    def __init__(self, slot: _WorkerSlot, ended: Callable[[_WorkerSlot, Failure], None]) -> None:
        self._slot = slot
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:
        self._ended(self._slot, reason)


def _how_it_ended(reason: Failure) -> dict:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return {"signal": signal.Signals(signal_number).name}
    return {"exit_code": getattr(value, "exitCode", None)}


class Supervisor(Service):
    """
    The daemon of C{workers} processes.

    @param spawn: C{reactor.spawnProcess}.
    @param listen_unix: C{reactor.listenUNIX}.
    @param clock: the supervisor's timers (restarts, the stop's deadline).
    @param worker_argv: the command of worker C{index} given the control
        socket's path (it ends with C{--worker INDEX:SOCKET}).
    @param load: reads and validates gateway.ini (L{txgateway.config.gateway.load_config}).
    @param hold_address: binds the daemon's address so that the port is
        known free and stays ours while workers come and go; returns what to close.
    """

    def __init__(
        self,
        config: GatewayConfig,
        state: SharedState,
        spawn: Callable[..., Any],
        listen_unix: Callable[..., Any],
        clock: Any,
        worker_argv: Callable[[int, str], list[str]],
        load: Callable[[], GatewayConfig],
        log: Any,
        hold_address: Callable[[], Any] = lambda: None,
        on_sighup: Callable[[Callable[[], None]], None] = lambda reload: None,
        log_observer: Any = None,
    ) -> None:
        self.config = config
        self.state = state
        self._spawn = spawn
        self._listen_unix = listen_unix
        self._clock = clock
        self._worker_argv = worker_argv
        self._load = load
        self.log = log
        self._hold_address = hold_address
        self._on_sighup = on_sighup
        self._log_observer = log_observer
        self._slots = {index: _WorkerSlot(index) for index in range(1, config.gateway.workers + 1)}
        self._directory = ""
        self._control: Any = None
        self._held: Any = None
        self.stopping = False
        self.restarts = 0
        self.started_at = 0.0

    @property
    def socket_path(self) -> str:
        """The control socket the workers connect to."""
        return os.path.join(self._directory, "control.sock")

    # -- start

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # As the single process does: twistd's own lines are JSON too.
        if self._log_observer is not None and isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self._log_observer)

    def privilegedStartService(self) -> None:
        self._held = self._hold_address()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.started_at = self._clock.seconds()
        # Private to the daemon's user: only its workers may call the shared state.
        self._directory = tempfile.mkdtemp(prefix="txgateway-")
        factory = Factory.forProtocol(self._channel)
        self._control = self._listen_unix(self.socket_path, factory, mode=0o600)
        self._on_sighup(self.reload)
        for slot in self._slots.values():
            self._start(slot)
        self.log.info(
            "supervisor_started", workers=len(self._slots), listen=self.config.gateway.listen,
            config=self.config.source, pid=os.getpid(),
        )

    def _start(self, slot: _WorkerSlot) -> None:
        slot.restart = None
        slot.ended = Deferred()
        slot.started_at = self._clock.seconds()
        argv = self._worker_argv(slot.index, self.socket_path)
        # In its environment, not its argv (which any user may read): only the process
        # spawned here knows it, and its hello on the control socket must carry it.
        slot.secret = secrets.token_hex(16)
        slot.process = self._spawn(
            _WorkerProcess(slot, self._ended), argv[0], argv, env={**os.environ, WORKER_SECRET_ENV: slot.secret},
            childFDs={0: 0, 1: 1, 2: 2},
        )
        slot.pid = slot.process.pid
        self.log.info("worker_started", worker=slot.index, pid=slot.pid)

    def _ended(self, slot: _WorkerSlot, reason: Failure) -> None:
        slot.process = None
        slot.channel = None
        ended, slot.ended = slot.ended, None
        how = _how_it_ended(reason)
        if self.stopping:
            self.log.info("worker_stopped", worker=slot.index, pid=slot.pid, **how)
        else:
            lived = self._clock.seconds() - slot.started_at
            slot.quick_deaths = 0 if lived >= STEADY_SECONDS else slot.quick_deaths + 1
            delay = restart_delay(slot.quick_deaths)
            self.restarts += 1
            self.log.error(
                "worker_exited", worker=slot.index, pid=slot.pid, lived_s=round(lived, 3), restart_in_s=delay, **how
            )
            slot.restart = self._clock.callLater(delay, self._start, slot)
        if ended is not None:
            ended.callback(None)

    # -- the workers' calls

    def _channel(self) -> CallChannel:
        """A worker's end of the control socket, answering its calls."""
        channel = CallChannel({}, None, self._lost)
        channel.handlers = {
            "batch": self._trusted(channel, self.state.batch),
            "circuit_opened": self._trusted(channel, lambda args: self._circuit_opened(channel, args)),
            "circuit_counted": self._trusted(channel, lambda args: self._circuit_counted(channel, args)),
            "gather": self._trusted(channel, lambda args: self._gather()),
            "hello": lambda args: self._hello(channel, args),
        }
        return channel

    def _trusted(self, channel: CallChannel, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """C{handler}, answered only on the channel of a worker this supervisor spawned (its hello proved it)."""

        def answer(args: Any) -> Any:
            if self._slot_of(channel) is None:
                self._refuse(channel, "a call before a proven hello")
                raise PermissionError("not a worker of this supervisor")
            return handler(args)

        return answer

    def _hello(self, channel: CallChannel, args: Any) -> None:
        args = args if isinstance(args, dict) else {}
        slot = self._slots.get(args.get("worker"))
        secret = args.get("secret")
        if slot is None or not slot.secret or not isinstance(secret, str) or not hmac.compare_digest(secret, slot.secret):
            self._refuse(channel, "a hello without its worker's secret")
            return
        slot.channel = channel

    def _refuse(self, channel: CallChannel, why: str) -> None:
        """Close a control connection that is not one of this supervisor's workers."""
        self.log.warning("control_socket_refused", reason=why)
        if channel.transport is not None:
            channel.transport.loseConnection()

    def _slot_of(self, channel: CallChannel) -> _WorkerSlot | None:
        for slot in self._slots.values():
            if slot.channel is channel:
                return slot
        return None

    def _lost(self, channel: CallChannel) -> None:
        slot = self._slot_of(channel)
        if slot is not None:
            slot.channel = None

    def _circuit_opened(self, channel: CallChannel, args: list) -> None:
        service, place, reason = args
        slot = self._slot_of(channel)
        worker = slot.index if slot is not None else None
        for slot in self._slots.values():
            if slot.channel is not None and slot.channel is not channel:
                slot.channel.notify("open_circuit", [service, place, worker, reason])

    def _circuit_counted(self, channel: CallChannel, args: list) -> None:
        """A worker counted a failure of a backend (or the success that ends them): every other worker counts it."""
        service, place, failed, reason = args
        slot = self._slot_of(channel)
        worker = slot.index if slot is not None else None
        for slot in self._slots.values():
            if slot.channel is not None and slot.channel is not channel:
                slot.channel.notify("count_circuit", [service, place, worker, failed, reason])

    def _gather(self) -> Deferred[dict]:
        slots = [slot for slot in self._slots.values() if slot.channel is not None]
        asked = [slot.channel.call("snapshot").addTimeout(SNAPSHOT_TIMEOUT, self._clock) for slot in slots]

        def gathered(results: list) -> dict:
            snapshots = [[slot.index, value] for slot, (ok, value) in zip(slots, results) if ok]
            return {
                "uptime": self._clock.seconds() - self.started_at,
                "configured": len(self._slots),
                "restarts": self.restarts,
                "snapshots": snapshots,
            }

        return DeferredList(asked, consumeErrors=True).addCallback(gathered)

    # -- reload

    def reload(self) -> bool:
        """
        Validate gateway.ini once: a valid file reloads every worker (each
        by its own SIGHUP), an invalid one is logged once and every worker
        keeps running as it is.
        """
        if self.stopping:
            return False
        try:
            config = self._load()
        except ConfigError as error:
            self.log.error("config_reload_rejected", reason=str(error), workers_kept=len(self._slots))
            return False
        for key in ("workers", "listen"):
            if getattr(config.gateway, key) != getattr(self.config.gateway, key):
                self.log.warning(
                    "config_reload_needs_restart", key=f"[gateway] {key}", kept=getattr(self.config.gateway, key)
                )
        if config.budgets != self.config.budgets or config.governed != self.config.governed:
            self.log.warning("config_reload_needs_restart", key="[budgets]", reason="the shared ledger is kept as started")
        self.config = config
        for slot in self._slots.values():
            if slot.process is not None:
                slot.process.signalProcess("HUP")
        self.log.info("config_reload_passed", workers=sum(slot.process is not None for slot in self._slots.values()))
        return True

    # -- stop

    def stopService(self) -> Deferred:
        super().stopService()
        self.stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        settings = self.config.gateway
        running = [slot for slot in self._slots.values() if slot.process is not None]
        self.log.info("supervisor_stopping", workers=len(running))
        for slot in self._slots.values():
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
        for slot in running:
            slot.process.signalProcess("TERM")
        ended = DeferredList([slot.ended for slot in running if slot.ended is not None])
        deadline = settings.drain_delay + settings.drain_timeout + STOP_GRACE
        ended.addTimeout(deadline, self._clock)
        try:
            await ended
        except Exception:
            for slot in self._slots.values():
                if slot.process is not None:
                    self.log.error("worker_killed", worker=slot.index, pid=slot.pid, after_s=deadline)
                    slot.process.signalProcess("KILL")
        if self._control is not None:
            await maybeDeferred(self._control.stopListening)
        if self.state.ledger is not None:
            await self.state.ledger.close()
        await self.state.buckets.close()
        if self._held is not None:
            self._held.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        self.log.info("supervisor_stopped")
