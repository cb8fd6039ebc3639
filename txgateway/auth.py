"""
API keys for C{/api/*}: C{Authorization: Bearer <key>} or C{X-API-Key}.

Keys are kept only as SHA-256 digests (given hashed as C{sha256:<hex>}, or
hashed when loaded), compared in constant time against every configured
key, and never logged; what the gateway knows of a caller is the key's name.
"""

from __future__ import annotations

import hashlib
import hmac

import attrs
from typing import Any

__all__ = ["ApiKey", "Authenticator", "Caller"]


@attrs.frozen
class ApiKey:
    """A named key, as its SHA-256 digest."""

    name: str
    digest: bytes = attrs.field(repr=False)

    @classmethod
    def parse(cls, entry: str) -> "ApiKey":
        """
        C{name:secret} or C{name:sha256:<64 hex>}.

        @raise ValueError: the entry is neither.
        """
        name, sep, secret = entry.strip().partition(":")
        name = name.strip()
        if not sep or not name or not secret.strip():
            raise ValueError("expected name:secret or name:sha256:<hex>")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"a key name is letters, digits, '-', '_' or '.', got {name!r}")
        secret = secret.strip()
        if secret.startswith("sha256:"):
            hexdigest = secret[len("sha256:"):]
            try:
                digest = bytes.fromhex(hexdigest)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"key {name!r}: sha256: needs 64 hex digits")
            return cls(name, digest)
        return cls(name, hashlib.sha256(secret.encode("utf-8")).digest())


@attrs.frozen
class Caller:
    """
    Who is calling, by key name, and which header carried the key (so that
    it can be kept from the backend).
    """

    name: str
    header: bytes


@attrs.frozen
class Authenticator:
    """Checks a request's API key against the configured ones."""

    keys: tuple[ApiKey, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def _match(self, presented: bytes) -> str | None:
        digest = hashlib.sha256(presented).digest()
        found = None
        for key in self.keys:  # no early exit: the time does not say which key
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found

    def caller(self, request: Any) -> Caller | None:
        """The caller whose key the request (an L{IncomingRequest}) carries, or L{None}."""
        candidates = []
        for value in request.header_values(b"x-api-key")[:1]:
            candidates.append((value.strip(), b"x-api-key"))
        for value in request.header_values(b"authorization")[:1]:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                candidates.append((token.strip(), b"authorization"))
        for presented, header in candidates:
            name = self._match(presented)
            if name is not None:
                return Caller(name, header)
        return None
