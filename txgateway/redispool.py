"""
The one way the gateway opens Redis: a lazy txredisapi connection pool
for a Redis URL, shared by the rate limiter's, the cache's and the
budgets' Redis stores.  Two kinds of URL:

- C{redis://[user:password@]host:port/db}: one server;
- C{redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]}:
  the Sentinels that know the master named C{master}; the pool asks them
  for its address before every connection, drops its connections when the
  address changes, and refuses one to a server that is no longer master,
  so that it follows a failover by itself.

txredisapi connects on the global reactor (it imports it): txredisapi is
imported only when Redis is configured, and every call on the pool is
bounded by the caller's own timeout on its injected clock.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import unquote

import attrs

__all__ = ["RedisAddress", "command_bytes", "forgot_the_script", "parse_redis_url", "redis_pool"]

#: The most seconds between two attempts to reach the master (txredisapi's default is 10:
#: after a failover, connections would wait up to that long for the new master).
RECONNECT_MAX_DELAY = 1.0
#: The most seconds one question to the Sentinels waits for a healthy master.
DISCOVERY_TIMEOUT = 1.0


@attrs.frozen
class RedisAddress:
    """
    Where a Redis URL points: one server (C{host}, C{port}), or the
    master C{master} known to the C{sentinels}.
    """

    host: str | None
    port: int | None
    db: int
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None

    @property
    def described(self) -> str:
        """What the operator is shown (never a password)."""
        if self.master is not None:
            nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"redis+sentinel://{nodes}/{self.master}/{self.db}"
        return f"redis://{self.host}:{self.port}/{self.db}"


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not colon:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port in {url!r}, got {text!r}")
    return host, int(port)


def parse_redis_url(url: str) -> RedisAddress:
    """
    The address of a C{redis://} or C{redis+sentinel://} URL; L{ValueError}
    saying what is expected when it is neither.
    """
    value = url.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("redis", "redis+sentinel"):
        raise ValueError(
            f"expected redis://host:port/db or redis+sentinel://host:port[,host:port...]/master[/db], got {url!r}"
        )
    netloc, _, path = rest.partition("/")
    credentials, at, nodes = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    segments = [segment for segment in path.split("/") if segment]
    if scheme == "redis":
        if not nodes or "," in nodes:
            raise ValueError(f"expected redis://host:port/db, got {url!r}")
        host, port = _host_port(nodes, 6379, url)
        if len(segments) > 1 or (segments and not segments[0].isdigit()):
            raise ValueError(f"expected a database number after the port in {url!r}")
        return RedisAddress(host, port, int(segments[0]) if segments else 0, username, password)
    sentinels = tuple(_host_port(node.strip(), 26379, url) for node in nodes.split(",") if node.strip())
    if not sentinels:
        raise ValueError(f"expected at least one Sentinel host:port in {url!r}")
    if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError(f"expected the master's name (and a database number) after the Sentinels in {url!r}")
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisAddress(None, None, db, username, password, sentinels, unquote(segments[0]))


def command_bytes(args: tuple, charset: str | None, errors: str, encode_value: Callable[[Any], bytes]) -> bytes:
    """
    A command as Redis reads it (RESP), in one pass: text is encoded with
    C{charset}, bytes go as they are, anything else as C{encode_value}
    (txredisapi's own) says.  txredisapi writes the same bytes, but runs
    its encoder twice an argument (the value, then its length), through
    its type checks each time: every ledger and limiter call pays it.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is str and charset is not None:
            arg = arg.encode(charset, errors)
        elif type(arg) is not bytes:
            arg = encode_value(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def _one_pass_commands(protocol: type) -> type:
    """C{protocol} (a txredisapi protocol class) writing its commands with L{command_bytes}."""

    class OnePassCommands(protocol):  # type: ignore[misc, valid-type]
        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            return command_bytes(args, self.charset, self.errors, self._encode_value)

    OnePassCommands.__name__ = OnePassCommands.__qualname__ = f"OnePass{protocol.__name__}"
    return OnePassCommands


@attrs.frozen
class RedisPool:
    """A pool's calls (txredisapi's connection handler) and how to close it all."""

    calls: Any
    disconnect: Callable[[], Any]


def redis_pool(url: str, connect_timeout: float, as_bytes: bool = False) -> RedisPool:
    """
    A lazy pool of 4 connections to C{url}, reconnecting on its own (to the
    current master, for a Sentinel URL).

    @param as_bytes: replies as bytes (the cache's entries), else as text
        with numbers converted (the limiter's script).
    """
    import txredisapi  # imports the global reactor: only when Redis is configured

    address = parse_redis_url(url)
    text = {"charset": None} if as_bytes else {"convertNumbers": True}
    if address.master is None:
        pool = txredisapi.lazyConnectionPool(
            host=address.host,
            port=address.port,
            dbid=address.db,
            poolsize=4,
            reconnect=True,
            password=address.password,
            username=address.username,
            connectTimeout=connect_timeout,
            **text,
        )
        # Its connections are made on later turns of the reactor: each is one of these.
        pool._factory.protocol = _one_pass_commands(pool._factory.protocol)
        return RedisPool(pool, pool.disconnect)

    class Protocol(_one_pass_commands(txredisapi.SentinelRedisProtocol)):  # type: ignore[misc]
        # txredisapi's own check compares the role with a str: with replies
        # as bytes (the cache's pool) it refused every connection, master or not.
        def connectionMade(self) -> Any:
            def check_role(role: list) -> Any:
                name = role[0].decode() if isinstance(role[0], bytes) else role[0]
                if self.factory.is_master and name != "master":
                    self.transport.loseConnection()
                    return None
                return txredisapi.RedisProtocol.connectionMade(self)

            if self.password is not None:
                self.auth(self.password, self.username)
            return self.role().addCallback(check_role)

    class Factory(txredisapi.SentinelConnectionFactory):
        maxDelay = RECONNECT_MAX_DELAY
        protocol = Protocol

    sentinel = txredisapi.Sentinel(list(address.sentinels), connectTimeout=connect_timeout)
    # While no Sentinel names a healthy master (a failover), each discovery
    # waits this long before the connection's next attempt (txredisapi: 10 s).
    sentinel.discovery_timeout = DISCOVERY_TIMEOUT
    pool = sentinel.master_for(
        address.master, factory_class=Factory, dbid=address.db, poolsize=4,
        password=address.password, username=address.username, **text,
    )

    def disconnect() -> Any:
        from twisted.internet.defer import gatherResults

        return gatherResults([pool.disconnect(), sentinel.disconnect()], consumeErrors=True)

    return RedisPool(pool, disconnect)


def forgot_the_script(error: Exception) -> bool:
    """
    Redis answered NOSCRIPT (it restarted and lost its script cache);
    txredisapi names that ScriptDoesNotExist, a raw client says NOSCRIPT.
    """
    return type(error).__name__ == "ScriptDoesNotExist" or str(error).startswith("NOSCRIPT")
