"""
What may be kept, for how long, and under which key: pure functions of
an answer's status and headers and of a request's method, target, body,
caller and the headers its answer varies on.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import attrs

__all__ = ["CachedAnswer", "cache_key", "directives", "freshness", "varied_key", "vary_names"]


@attrs.frozen
class CachedAnswer:
    """
    A kept answer: status, the backend's headers and body, when it was
    kept and until when it is fresh (clock seconds).  An entry with
    C{vary} names the request headers whose values complete the key: the
    answer itself is kept under that longer key.
    """

    code: int
    reason: bytes
    headers: tuple
    body: bytes
    stored_at: float
    expires_at: float
    vary: tuple = ()

    @property
    def size(self) -> int:
        """Bytes it takes, roughly: its body and headers."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers) + 64


class HeaderSource(Protocol):
    """What L{varied_key} reads of a request."""

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of the header C{name} (lower case)."""


#: A request with no Cache-Control.
NO_DIRECTIVES: frozenset[bytes] = frozenset()
_MAX_AGE = re.compile(rb"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d+)", re.I)


def directives(value: bytes | None) -> set[bytes]:
    """The lower-case directive names of a Cache-Control (or Pragma) value."""
    if not value:
        return set()
    return {part.strip().split(b"=", 1)[0].strip().lower() for part in value.split(b",")}


def freshness(code: int, headers: list[tuple[bytes, bytes]], ttl: float) -> float | None:
    """
    How long a backend's answer may be kept (the shorter of C{ttl} and its
    C{s-maxage}, else C{max-age}), or L{None} when it may not be: not a
    200, a C{Set-Cookie}, C{Cache-Control: no-store} or C{private}, or
    C{Vary: *}.  A backend's C{no-cache} does not keep an answer out: SSE
    servers send it on every stream to stop proxies from buffering, and the
    operator asked for the service's answers to be kept.
    """
    if code != 200:
        return None
    control = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"set-cookie":
            return None
        if lower == b"cache-control":
            control += b"," + value
        if lower == b"vary" and b"*" in value:
            return None
    if directives(control) & {b"no-store", b"private"}:
        return None
    ages = {kind.lower(): int(seconds) for kind, seconds in _MAX_AGE.findall(control)}
    age = ages.get(b"s-maxage", ages.get(b"max-age"))
    if age is not None:
        if age <= 0:
            return None
        return min(ttl, float(age))
    return ttl


def vary_names(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
    """The request header names a backend's C{Vary} lists, lowercased and sorted."""
    names = set()
    for name, value in headers:
        if name.lower() == b"vary":
            names |= {part.strip().lower() for part in value.split(b",") if part.strip()}
    return tuple(sorted(names))


def cache_key(service: str, method: bytes, target: bytes, body: bytes, caller: str | None) -> str:
    """
    The key of a request's answer: service, method, path and query, a
    SHA-256 of the body, and the caller (one tenant never reads another's
    answers).
    """
    caller_bytes = (caller or "").encode()
    head = b"%s\0%s\0%d:%s%d:%s%d\0" % (
        service.encode(), method, len(caller_bytes), caller_bytes, len(target), target, len(body)
    )
    digest = hashlib.sha256(head)
    if body:
        digest.update(body)
    return "txgateway:cache:" + digest.hexdigest()


def varied_key(key: str, names: tuple[bytes, ...], request: HeaderSource) -> str:
    """C{key} completed by the values of the request headers C{names}."""
    digest = hashlib.sha256(key.encode())
    for name in names:
        value = b"\n".join(request.header_values(name))
        digest.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
    return key + ":" + digest.hexdigest()
