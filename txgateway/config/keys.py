"""
Callers as configuration values: API keys (a name and the SHA-256 digest
of the secret; the secret itself is never kept) with what each may call
and spend, the teams that share limits, and the prices of models.

Money is counted in whole nano-dollars (10^-9 USD): integers add exactly,
in Python and in Redis's Lua alike, up to about nine million dollars a
counter.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math

import attrs

__all__ = ["ApiKey", "BUDGET_PERIODS", "ModelPrice", "NANO_PER_USD", "TeamLimits", "usd_to_nano"]

#: Nano-dollars in a dollar.
NANO_PER_USD = 1_000_000_000
#: The calendar periods a budget may cover (UTC), and C{total} (never renewed).
BUDGET_PERIODS = ("day", "week", "month", "total")


def usd_to_nano(usd: float) -> int:
    """Dollars as whole nano-dollars (rounded to the nearest)."""
    return int(round(usd * NANO_PER_USD))


@attrs.frozen
class TeamLimits:
    """
    The limits a C{[team:NAME]} puts on all its keys together (L{None}: no
    such limit).
    """

    name: str
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"

    @property
    def governed(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.tokens_per_minute, self.requests_per_minute, self.budget_usd))


@attrs.frozen
class ApiKey:
    """
    A named key, as its SHA-256 digest, with what it may call and spend.

    @ivar models: shell-style patterns of the models it may call (empty: all).
    @ivar services: the services it may call under C{/api/} (empty: all).
    @ivar user_budget_usd: what each end user of the key may spend in the
        key's C{budget_period} (L{None}: no such limit); with
        C{user_tokens_per_minute} and C{user_requests_per_minute}, the
        allowance every end user the key's calls name gets of their own.
    """

    name: str
    digest: bytes = attrs.field(repr=False)
    team: str | None = None
    models: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    user_budget_usd: float | None = None
    user_tokens_per_minute: int | None = None
    user_requests_per_minute: int | None = None
    #: Digests of the key's earlier secrets still valid (a rotation's grace period), by the admin API.
    retired_digests: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    #: Turned off by the admin API: its requests are refused (403 C{key_disabled}).
    disabled: bool = False
    #: Where it was written: C{gateway.ini}, or C{keys_file PATH}.
    origin: str = "gateway.ini"

    @property
    def governed(self) -> bool:
        """Whether any limit, or a list of the models or services it may call, is set on the key itself."""
        limits = (self.requests_per_minute, self.tokens_per_minute, self.max_parallel, self.budget_usd)
        return any(v is not None for v in limits) or self.limits_users or bool(self.models) or bool(self.services)

    @property
    def limits_users(self) -> bool:
        """Whether each end user of the key has limits of their own."""
        return any(v is not None for v in (self.user_budget_usd, self.user_tokens_per_minute, self.user_requests_per_minute))

    def may_call_model(self, model: str) -> bool:
        """Whether C{model} matches one of the key's C{models} (or the key names none)."""
        return not self.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def may_call_service(self, service: str) -> bool:
        """Whether C{service} is one of the key's C{services} (or the key names none)."""
        return not self.services or service in self.services

    @staticmethod
    def digest_of(secret: str) -> bytes:
        """The SHA-256 digest a secret is kept as."""
        return hashlib.sha256(secret.encode("utf-8")).digest()

    @staticmethod
    def digest_from_hex(hexdigest: str) -> bytes:
        """
        A digest given as 64 hex digits.

        @raise ValueError: it is not.
        """
        try:
            digest = bytes.fromhex(hexdigest.strip())
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError("expected the SHA-256 digest of the secret: 64 hex digits")
        return digest

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
        check_key_name(name)
        secret = secret.strip()
        if secret.startswith("sha256:"):
            try:
                return cls(name, cls.digest_from_hex(secret[len("sha256:"):]))
            except ValueError:
                raise ValueError(f"key {name!r}: sha256: needs 64 hex digits") from None
        return cls(name, cls.digest_of(secret))


def check_key_name(name: str) -> str:
    """
    A key's (or team's) name: letters, digits, C{-}, C{_} or C{.}.

    @raise ValueError: it is not.
    """
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"a key name is letters, digits, '-', '_' or '.', got {name!r}")
    return name


@attrs.frozen
class ModelPrice:
    """
    What a model costs, in US dollars per million tokens, as the gateway
    sends it to a backend.  C{cached_prompt}: prompt tokens the backend
    reports as cached (L{None}: priced as C{prompt}).
    """

    model: str
    prompt: float = 0.0
    completion: float = 0.0
    cached_prompt: float | None = None

    def cost_nano(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """What C{prompt_tokens} and C{completion_tokens} cost, in nano-dollars (rounded up)."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_price = self.prompt if self.cached_prompt is None else self.cached_prompt
        # USD per million tokens is exactly 1,000 nano-dollars per token per USD.
        nano = ((prompt_tokens - cached) * self.prompt + cached * cached_price + completion_tokens * self.completion) * 1000
        return int(math.ceil(nano - 1e-6))


#: The price of a model nobody priced.
FREE = ModelPrice("*")
