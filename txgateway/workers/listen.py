"""
How workers share one address: each binds its own socket with
C{SO_REUSEPORT} on C{[gateway] listen}, and the kernel spreads new
connections evenly over them (measured in C{bench/accept_spread.py}: one
inherited socket let one worker take every kept-alive connection).
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)

__all__ = ["ListenAddress", "ReusePortListener", "listen_address", "reuseport_socket"]


@attrs.frozen
class ListenAddress:
    """Where workers listen: the family, interface, port and backlog, and TLS when C{ssl:}."""

    family: int
    interface: str
    port: int
    backlog: int
    tls: Any = None


def listen_address(reactor: Any, description: str) -> ListenAddress:
    """
    The address of a C{tcp:}, C{tcp6:} or C{ssl:} endpoint description.

    @raise ValueError: another kind of endpoint (workers need a TCP port).
    """
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, (TCP4ServerEndpoint, SSL4ServerEndpoint, TCP6ServerEndpoint)):
        family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) or ":" in endpoint._interface else socket.AF_INET
        tls = endpoint._sslContextFactory if isinstance(endpoint, SSL4ServerEndpoint) else None
        return ListenAddress(family, endpoint._interface, endpoint._port, endpoint._backlog, tls)
    raise ValueError(f"workers listen on a tcp:, tcp6: or ssl: endpoint, not {description!r}")


def reuseport_socket(address: ListenAddress, listen: bool = True) -> socket.socket:
    """
    A socket bound to C{address} with C{SO_REUSEPORT} (listening when
    C{listen}); non-blocking.

    @raise OSError: the address is taken by a socket that does not share it, or not ours.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.interface, address.port))
        if listen:
            sock.listen(address.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortListener(Service):
    """A worker's listener: its own C{SO_REUSEPORT} socket on the daemon's address, serving C{factory}."""

    def __init__(self, reactor: Any, address: ListenAddress, factory: Any) -> None:
        self._reactor = reactor
        self._address = address
        self._factory = factory
        self._port: Any = None

    def privilegedStartService(self) -> None:
        factory = self._factory
        if self._address.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self._address.tls, False, factory)
        sock = reuseport_socket(self._address)
        try:
            self._port = self._reactor.adoptStreamPort(sock.fileno(), self._address.family, factory)
        finally:
            sock.close()  # the port holds its own copy
        super().privilegedStartService()

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        port, self._port = self._port, None
        return maybeDeferred(port.stopListening) if port is not None else maybeDeferred(lambda: None)
