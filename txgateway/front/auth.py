"""
API keys for C{/api/*}: C{Authorization: Bearer <key>} or C{X-API-Key}.

Keys are kept only as SHA-256 digests (given hashed as C{sha256:<hex>}, or
hashed when loaded), compared in constant time against every configured
key, and never logged; what the gateway knows of a caller is the key's name.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import attrs

from txgateway.config.keys import ApiKey
from txgateway.observability.context import Caller

__all__ = ["Authenticator"]






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
