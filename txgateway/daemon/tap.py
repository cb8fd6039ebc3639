"""
The twistd plugin's options and C{makeService}: the one place in txgateway
that touches the global reactor.
"""

from __future__ import annotations

import os
import resource

from typing import Any

from twisted.python import usage

from txgateway.config.gateway import ConfigError, load_config

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """C{twistd txgateway} options."""

    synopsis = "[--config gateway.ini]"
    longdesc = (
        "An API gateway for AI services: routes /api/<service>/* to the "
        "services of gateway.ini, with circuit breakers, retries, rate "
        "limits, request ids and JSON logs.  Without --config it runs on its "
        "embedded defaults (ai, data and rag on localhost:8000-8002, port 3000)."
    )
    optParameters = [
        ["config", "c", None, "Path to gateway.ini (default: the embedded defaults)."],
        ["worker", None, None, "Internal: run as worker INDEX of the supervisor at SOCKET (INDEX:SOCKET)."],
    ]


def makeService(options: Options):
    """
    Load the configuration and build the gateway service on the global
    reactor.  A configuration problem ends twistd with one line naming the
    file, section and key, and exit status 1.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from txgateway.daemon.dispatch import lean_dispatch
    from txgateway.daemon.openfiles import raise_open_files_limit
    from txgateway.daemon.service import GatewayService

    try:
        config = load_config(options["config"])
    except ConfigError as error:
        raise SystemExit(f"txgateway: configuration error: {error}") from None
    try:
        serverFromString(reactor, config.gateway.listen)
    except Exception as error:  # serverFromString raises whatever its parser met
        raise SystemExit(
            f"txgateway: configuration error: {config.source}: [gateway] listen: "
            f"not a usable endpoint ({type(error).__name__}: {error})"
        ) from None
    # structlog is configured here, once: the service points its destination
    # at the log sink (and a reload at a new one).
    from txgateway.observability.logs import LogDestination, configure_logging

    destination = LogDestination()
    configure_logging(destination)
    lean_dispatch(reactor)
    # Raised before workers are spawned: they inherit it (and raise their own alike).
    open_files = raise_open_files_limit(resource)
    worker = None
    if options["worker"]:
        worker = _supervisor_link(reactor, options["worker"])
    elif config.gateway.workers > 1:
        return _supervisor(config, reactor, options["config"], destination)
    if worker is None:
        _check_free(reactor, config, "gateway", config.gateway.listen)
        if config.admin.enabled and config.admin.listen:
            _check_free(reactor, config, "admin", config.admin.listen)
    try:
        return GatewayService(
            config, reactor, config_path=options["config"], log_destination=destination, worker=worker, open_files=open_files,
        )
    except OSError as error:
        raise SystemExit(_log_file_error(config, error)) from None
    except ConfigError as error:  # a file it could not open (the spend file): one line, no traceback
        raise SystemExit(f"txgateway: configuration error: {error}") from None


def _check_free(reactor: Any, config: Any, section: str, listen: str) -> None:
    """
    End twistd with one line, before it logs anything, when the TCP
    address C{listen} is taken (the listener binds it later, at start).
    """
    import socket

    from txgateway.workers.listen import listen_address

    try:
        address = listen_address(reactor, listen)
    except ValueError:
        return  # not a TCP port (a UNIX socket...): its listener says what goes wrong
    probe = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((address.interface, address.port))
    except OSError as error:
        raise SystemExit(f"txgateway: cannot listen: {config.source}: [{section}] listen = {listen}: {error.strerror or error}") from None
    finally:
        probe.close()


def _log_file_error(config: Any, error: OSError) -> str:
    return (
        f"txgateway: configuration error: {config.source}: [logging] file: "
        f"{error.strerror or error}: {error.filename or config.logging.file}"
    )


def _supervisor_link(reactor: Any, argument: str) -> Any:
    """The line of worker C{INDEX} to the supervisor at C{SOCKET} (C{--worker INDEX:SOCKET})."""
    import structlog

    from txgateway.workers.link import SupervisorLink

    index, _, path = argument.partition(":")
    if not index.isdigit() or not path:
        raise SystemExit(f"txgateway: --worker expects INDEX:SOCKET, got {argument!r}")
    from txgateway.workers.supervisor import WORKER_SECRET_ENV

    log = structlog.get_logger("txgateway").bind(worker=int(index))
    secret = os.environ.pop(WORKER_SECRET_ENV, "")
    return SupervisorLink(lambda factory: reactor.connectUNIX(path, factory, timeout=5), reactor, int(index), log, secret)


def _supervisor(config: Any, reactor: Any, config_path: str | None, destination: Any) -> Any:
    """
    The supervisor of C{[gateway] workers} processes: it holds the
    address, the shared buckets and the local ledger, and starts the workers.
    """
    import functools
    import signal
    import sys

    import structlog
    from twisted.internet.threads import deferToThreadPool

    from txgateway.daemon.service import ledger_thread, open_spend_file
    from txgateway.governance.local import LocalLedgerStore
    from txgateway.observability.logs import TwistedJsonObserver, open_sink
    from txgateway.ratelimit.memory import MemoryRateLimitStore
    from txgateway.workers.listen import listen_address, reuseport_socket
    from txgateway.workers.state import SharedState
    from txgateway.workers.supervisor import WORKER_ARGUMENT, Supervisor

    try:
        address = listen_address(reactor, config.gateway.listen)
    except ValueError as error:
        raise SystemExit(f"txgateway: configuration error: {config.source}: [gateway] workers: {error}") from None
    try:
        sink = open_sink(config.logging.file, sys.stdout, reactor)
    except OSError as error:
        raise SystemExit(_log_file_error(config, error)) from None
    sink.shared = True
    destination.use(sink, config.logging.level)
    log = structlog.get_logger("txgateway").bind(worker=0)
    ledger = None
    if config.governed and config.budgets.store != "redis":
        try:
            spend_file = open_spend_file(config)
        except ConfigError as error:
            raise SystemExit(f"txgateway: configuration error: {error}") from None
        # Off the thread answering the workers.
        threads = ledger_thread()
        reactor.callWhenRunning(threads.start)
        reactor.addSystemEventTrigger("after", "shutdown", threads.stop)
        ledger = LocalLedgerStore(
            reactor, spend_file, functools.partial(deferToThreadPool, reactor, threads), log, config.end_user_budget_periods,
        )
    state = SharedState(MemoryRateLimitStore(reactor), ledger)

    def hold_address() -> Any:
        try:
            return reuseport_socket(address, listen=False)
        except OSError as error:
            raise SystemExit(
                f"txgateway: cannot listen: {config.source}: [gateway] listen = {config.gateway.listen}: {error.strerror or error}"
            ) from None

    def worker_argv(index: int, socket_path: str) -> list[str]:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "txgateway"]
        if config_path:
            argv += ["--config", config_path]
        return argv + [WORKER_ARGUMENT, f"{index}:{socket_path}"]

    def on_sighup(reload: Any) -> None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))

    return Supervisor(
        config, state, reactor.spawnProcess, reactor.listenUNIX, reactor, worker_argv,
        functools.partial(load_config, config_path), log, hold_address, on_sighup,
        TwistedJsonObserver(sink, config.logging.level),
    )
