"""
The gateway's API keys as configuration values: a name and the SHA-256
digest of the secret (the secret itself is never kept).
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ApiKey"]

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
