"""
Where a client path goes: C{/api/<service>/<rest>} becomes the service's
base URL with C{<rest>} appended, and never anything outside that base.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

__all__ = ["UnsafePath", "checked_rest", "join_target", "split_api_path", "upstream_target", "upstream_url"]

_API_PREFIX = b"/api/"
# What a path may hold before decoding: RFC 3986 pchar, '/' and '%'.
_PATH_BYTES = re.compile(rb"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_QUERY_BYTES = re.compile(rb"^[\x21-\x7e]*$")
_SLASHES = re.compile(rb"/{2,}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_SEPARATORS = re.compile(rb"[/\\]")
_MAX_DECODING_ROUNDS = 4


class UnsafePath(ValueError):
    """The request path could reach outside its service, or is malformed."""


def split_api_path(path: bytes) -> tuple[str, bytes]:
    """
    Split a raw request path C{/api/NAME/rest} into C{("NAME", b"/rest")}.

    @raise UnsafePath: the path does not start with C{/api/NAME}.
    """
    if not path.startswith(_API_PREFIX):
        raise UnsafePath("the path does not start with /api/")
    name, slash, rest = path[len(_API_PREFIX):].partition(b"/")
    if not name:
        raise UnsafePath("the path names no service")
    try:
        service = name.decode("ascii")
    except UnicodeDecodeError:
        raise UnsafePath("the service name is not ASCII") from None
    return service, slash + rest


def _fully_decoded(raw: bytes) -> bytes:
    """Percent-decode until nothing changes, so double encoding hides nothing."""
    for _ in range(_MAX_DECODING_ROUNDS):
        decoded = unquote_to_bytes(raw)
        if decoded == raw:
            return decoded
        raw = decoded
    raise UnsafePath("the path is percent-encoded too many times")


def upstream_url(base_url: str, rest: bytes, query: bytes = b"") -> bytes:
    """
    Join a service's base URL and the raw rest of a client path (see
    L{upstream_target}).

    @raise UnsafePath: the rest of the path could not be forwarded safely.
    """
    return upstream_target(base_url.encode("ascii"), rest, query)


def upstream_target(base: bytes, rest: bytes, query: bytes = b"") -> bytes:
    """
    Join a service's base (its URL, or the path of it that the backend sees)
    and the raw rest of a client path (L{checked_rest}, then L{join_target}).

    @raise UnsafePath: the rest of the path could not be forwarded safely.
    """
    return join_target(base, checked_rest(rest, query))


def join_target(base: bytes, checked: bytes) -> bytes:
    """A base and what L{checked_rest} returned: the target a backend sees."""
    url = base + checked
    if not url.startswith(b"/") and b"://" not in url[:8]:
        url = b"/" + url  # a bare base path: the origin-form target needs its slash
    return url


def checked_rest(rest: bytes, query: bytes = b"") -> bytes:
    """
    The raw rest of a client path and its query, checked once per request,
    ready to be joined to each endpoint's base (L{join_target}).

    The rest is forwarded as the client encoded it, with runs of slashes
    folded into one; it is refused when any spelling of it (percent-encoded
    once or many times, with '/' or '\\' as separator) holds a '.' or '..'
    segment (with or without path parameters: C{..;}, C{.;x}), a control
    character, or bytes outside the URL alphabet.

    @raise UnsafePath: the rest of the path could not be forwarded safely.
    """
    if rest and not rest.startswith(b"/"):
        raise UnsafePath("the rest of the path must start with '/'")
    if not _PATH_BYTES.match(rest):
        raise UnsafePath("the path holds characters that must be percent-encoded")
    if not _QUERY_BYTES.match(query):
        raise UnsafePath("the query holds characters that must be percent-encoded")
    if b"%" in rest:
        decoded = _fully_decoded(rest)
        if _CONTROL.search(decoded):
            raise UnsafePath("the path holds control characters")
    else:
        decoded = rest  # the alphabet check above already excluded control bytes
    if b"." in decoded:
        for segment in _SEPARATORS.split(decoded):
            # A path parameter does not hide a dot segment: Tomcat and Spring
            # read "..;x" (and "..;") as "..", escaping the base path.
            if segment.split(b";", 1)[0] in (b".", b".."):
                raise UnsafePath("the path holds a '.' or '..' segment")
    if b"//" in rest:
        rest = _SLASHES.sub(b"/", rest)
    return rest + b"?" + query if query else rest
