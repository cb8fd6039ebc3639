"""
API keys for C{/api/*}: C{Authorization: Bearer <key>} or C{X-API-Key}.

Keys are kept only as SHA-256 digests (given hashed as C{sha256:<hex>}, or
hashed when loaded) and never logged; what the gateway knows of a caller is
the key's name.  A presented key is hashed and looked up by its digest: one
dictionary lookup with 10 keys or 10,000.  Its time can say nothing useful
about a secret: an attacker controls the secret, not its digest, and a
digest's prefix does not lead to a secret that has it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs

from txgateway.config.keys import ApiKey
from txgateway.observability.context import Caller

__all__ = ["AmbiguousCredentials", "Authenticator", "KeyDisabled"]


class AmbiguousCredentials(ValueError):
    """Two headers carry two different keys of the gateway: which one pays cannot be told."""


class KeyDisabled(ValueError):
    """The request carries a key the admin API turned off."""

@attrs.frozen
class Authenticator:
    """Checks a request's API key against the configured ones."""

    keys: tuple[ApiKey, ...]
    _by_digest: dict = attrs.field(init=False, repr=False)
    _disabled: frozenset = attrs.field(init=False, repr=False)
    #: Each caller as made once (a caller is a value: a stream holds it for minutes, and a thousand
    #: streams of one key one caller); a key's name with the headers that carried it, a few per key.
    _callers: dict = attrs.field(init=False, repr=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        # A key's earlier secrets still in their grace period are the key too.
        by_digest = {digest: key.name for key in self.keys for digest in (key.digest, *key.retired_digests)}
        object.__setattr__(self, "_by_digest", by_digest)
        object.__setattr__(self, "_disabled", frozenset(key.name for key in self.keys if key.disabled))

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (then every proxied request needs one)."""
        return bool(self.keys)

    def _match(self, presented: bytes) -> str | None:
        return self._by_digest.get(hashlib.sha256(presented).digest())

    def name_of(self, presented: bytes) -> str | None:
        """The name of the key C{presented} (a secret) is, or L{None}."""
        return self._match(presented)

    def caller(self, request: Any) -> Caller | None:
        """
        The caller whose key the request (an L{IncomingRequest}) carries, or
        L{None}.  Every header carrying one of the gateway's keys is named
        on the caller, to be withheld from backends.

        @raise AmbiguousCredentials: two headers carry two different keys.
        @raise KeyDisabled: the key was turned off.
        """
        candidates = []
        for value in request.header_values(b"x-api-key")[:1]:
            candidates.append((value.strip(), b"x-api-key"))
        for value in request.header_values(b"authorization")[:1]:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                candidates.append((token.strip(), b"authorization"))
        found = [(name, header) for name, header in ((self._match(presented), header) for presented, header in candidates) if name]
        if not found:
            return None
        names = {name for name, _ in found}
        if len(names) > 1:
            raise AmbiguousCredentials(f"the request carries two different API keys of this gateway ({' and '.join(h.decode() for _, h in found)})")
        name, header = found[0]
        if name in self._disabled:
            raise KeyDisabled(f"the key {name!r} is disabled")
        headers = tuple(header for _, header in found)
        caller = self._callers.get((name, headers))
        if caller is None:
            caller = self._callers[(name, headers)] = Caller(name, header, headers)
        return caller
