"""
The one way the gateway opens Redis: a lazy txredisapi connection pool
for a C{redis://[user:password@]host:port/db} URL, shared by the rate
limiter's and the cache's Redis stores.  txredisapi connects on the global
reactor (it imports it): this module is imported only when Redis is
configured, and every call on the pool is bounded by the caller's own
timeout on its injected clock.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["forgot_the_script", "redis_pool"]


def redis_pool(url: str, connect_timeout: float, as_bytes: bool = False) -> Any:
    """
    A lazy pool of 4 connections to C{url}, reconnecting on its own.

    @param as_bytes: replies as bytes (the cache's entries), else as text
        with numbers converted (the limiter's script).
    """
    import txredisapi  # imports the global reactor: only when Redis is configured

    parts = urlsplit(url)
    text = {"charset": None} if as_bytes else {"convertNumbers": True}
    return txredisapi.lazyConnectionPool(
        host=parts.hostname,
        port=parts.port or 6379,
        dbid=int(parts.path.strip("/") or 0),
        poolsize=4,
        reconnect=True,
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
        connectTimeout=connect_timeout,
        **text,
    )


def forgot_the_script(error: Exception) -> bool:
    """
    Redis answered NOSCRIPT (it restarted and lost its script cache);
    txredisapi names that ScriptDoesNotExist, a raw client says NOSCRIPT.
    """
    return type(error).__name__ == "ScriptDoesNotExist" or str(error).startswith("NOSCRIPT")
