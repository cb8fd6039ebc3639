"""
The twistd plugin's options and C{makeService}: the one place in txgateway
that touches the global reactor.
"""

from __future__ import annotations

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
    ]


def makeService(options: Options):
    """
    Load the configuration and build the gateway service on the global
    reactor.  A configuration problem ends twistd with one line naming the
    file, section and key, and exit status 1.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

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
    try:
        return GatewayService(config, reactor, config_path=options["config"], log_destination=destination)
    except OSError as error:
        raise SystemExit(
            f"txgateway: configuration error: {config.source}: [logging] file: "
            f"{error.strerror or error}: {error.filename or config.logging.file}"
        ) from None
