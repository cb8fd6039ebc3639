"""
Keys and teams made at run time through the admin API, as values: what a
request may say of them (checked field by field, each refusal naming its
field), the records the admin store keeps, and the configuration they make
together with gateway.ini's own keys and teams.  Pure: no I/O, no clock
but the times it is given.

A record is a JSON object:

    key:  {"name", "secret_sha256", "fields": {...}, "disabled", "retired":
           [{"secret_sha256", "until"}], "created_at", "updated_at"}
    team: {"name", "fields": {...}, "created_at", "updated_at"}

C{fields} hold the names of C{[key:NAME]} and C{[team:NAME]}.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any, Callable, Mapping

import attrs

from txgateway.config.keys import BUDGET_PERIODS, ApiKey, TeamLimits, check_key_name

__all__ = [
    "KEY_FIELDS", "TEAM_FIELDS", "AdminInputError", "Registry", "checked_fields", "checked_name", "new_secret",
    "overlaid", "public_key", "public_team",
]

#: The prefix of the secrets the admin API makes (the rest: 43 URL-safe characters, 256 bits).
SECRET_PREFIX = "sk-gw-"


class AdminInputError(ValueError):
    """A field of an admin request that cannot be taken; C{field} names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _limit(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdminInputError(field, f"expected a whole number of at least 1, or null; got {value!r}")
    return value


def _usd(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1e9:
        raise AdminInputError(field, f"expected US dollars from 0 to 1e9, or null; got {value!r}")
    return float(value)


def _period(field: str, value: Any) -> str:
    if value not in BUDGET_PERIODS:
        raise AdminInputError(field, f"expected one of {', '.join(BUDGET_PERIODS)}; got {value!r}")
    return value


def _names(field: str, value: Any, check: Callable[[str], bool], what: str) -> list[str]:
    items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) and item and check(item) for item in items):
        raise AdminInputError(field, f"expected a list of {what}; got {value!r}")
    return items


def _models(field: str, value: Any) -> list[str]:
    return _names(field, value, lambda item: all(c.isalnum() or c in "-_.:/@*?[]!" for c in item), "model names or shell patterns")


def _services(field: str, value: Any) -> list[str]:
    return _names(field, value, lambda item: all(c.isalnum() or c in "-_." for c in item), "service names")


def _team(field: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise AdminInputError(field, f"expected a team's name, or null; got {value!r}")
    try:
        return check_key_name(value)
    except ValueError as error:
        raise AdminInputError(field, str(error)) from None


#: The fields of a key, each with its check (as C{[key:NAME]} names them), and its default.
KEY_FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "team": (_team, None),
    "models": (_models, []),
    "services": (_services, []),
    "requests_per_minute": (_limit, None),
    "tokens_per_minute": (_limit, None),
    "max_parallel": (_limit, None),
    "budget_usd": (_usd, None),
    "budget_period": (_period, "month"),
    "user_budget_usd": (_usd, None),
    "user_tokens_per_minute": (_limit, None),
    "user_requests_per_minute": (_limit, None),
}

#: The fields of a team (as C{[team:NAME]} names them), and their defaults.
TEAM_FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "tokens_per_minute": (_limit, None),
    "requests_per_minute": (_limit, None),
    "budget_usd": (_usd, None),
    "budget_period": (_period, "month"),
}


def checked_name(value: Any) -> str:
    """
    A key's or team's name from a request.

    @raise AdminInputError: it is none (C{name}).
    """
    if not isinstance(value, str):
        raise AdminInputError("name", f"expected letters, digits, '-', '_' or '.'; got {value!r}")
    try:
        return check_key_name(value)
    except ValueError as error:
        raise AdminInputError("name", str(error)) from None


def checked_fields(body: Mapping[str, Any], known: Mapping[str, tuple], allowed_extra: tuple[str, ...] = ()) -> dict:
    """
    The fields of C{body} that C{known} names, each checked; a field it does
    not name (but C{allowed_extra}) is refused.

    @raise AdminInputError: a field is unknown or its value cannot be taken.
    """
    fields = {}
    for name, value in body.items():
        if name in allowed_extra:
            continue
        if name not in known:
            raise AdminInputError(name, f"no such field; the fields are {', '.join(sorted(known))}")
        fields[name] = known[name][0](name, value)
    return fields


def new_secret() -> str:
    """A new API key secret: C{sk-gw-} and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest_hex(secret: str) -> str:
    """The SHA-256 of C{secret}, as 64 hex digits (all that is kept of it)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _key_of(record: Mapping[str, Any], now: float) -> ApiKey:
    fields = {name: record["fields"].get(name, default) for name, (_, default) in KEY_FIELDS.items()}
    retired = tuple(
        bytes.fromhex(old["secret_sha256"]) for old in record.get("retired", ()) if old["until"] > now
    )
    return ApiKey(
        record["name"], bytes.fromhex(record["secret_sha256"]), fields["team"], tuple(fields["models"]),
        tuple(fields["services"]), fields["requests_per_minute"], fields["tokens_per_minute"], fields["max_parallel"],
        fields["budget_usd"], fields["budget_period"], fields["user_budget_usd"], fields["user_tokens_per_minute"],
        fields["user_requests_per_minute"], retired_digests=retired, disabled=bool(record.get("disabled")),
    )


def _team_of(record: Mapping[str, Any]) -> TeamLimits:
    fields = {name: record["fields"].get(name, default) for name, (_, default) in TEAM_FIELDS.items()}
    return TeamLimits(record["name"], **fields)


@attrs.frozen
class Registry:
    """
    What the admin store holds: its version (moved on by every change), the
    keys and the teams made through the admin API, as records by name.
    """

    version: int = 0
    keys: Mapping[str, dict] = attrs.field(factory=dict)
    teams: Mapping[str, dict] = attrs.field(factory=dict)

    def next_expiry(self, now: float) -> float | None:
        """When the soonest retired secret still valid stops being valid (L{None}: none is)."""
        times = [old["until"] for record in self.keys.values() for old in record.get("retired", ()) if old["until"] > now]
        return min(times) if times else None


def overlaid(config: Any, registry: Registry, now: float) -> Any:
    """
    C{config} (a L{txgateway.config.gateway.GatewayConfig}) with the keys and
    teams of C{registry} added to its own (theirs win nothing: a name
    gateway.ini already has is never made by the admin API); a retired
    secret is valid until its time.
    """
    if not registry.keys and not registry.teams:
        return config
    teams = {**{name: _team_of(record) for name, record in registry.teams.items()}, **config.teams}
    keys = config.auth.keys + tuple(
        _key_of(record, now) for name, record in sorted(registry.keys.items())
        if all(key.name != name for key in config.auth.keys)
    )
    return attrs.evolve(config, auth=attrs.evolve(config.auth, keys=keys), teams=teams)


def public_key(record: Mapping[str, Any]) -> dict:
    """What the admin API says of a key it made: its fields and state, never a secret (nor its digest)."""
    fields = {name: record["fields"].get(name, default) for name, (_, default) in KEY_FIELDS.items()}
    return {
        "name": record["name"], **fields, "disabled": bool(record.get("disabled")), "source": "admin",
        "read_only": False, "retired_secrets_valid_until": [old["until"] for old in record.get("retired", ())],
        "created_at": record.get("created_at"), "updated_at": record.get("updated_at"),
    }


def public_team(record: Mapping[str, Any]) -> dict:
    """What the admin API says of a team it made."""
    fields = {name: record["fields"].get(name, default) for name, (_, default) in TEAM_FIELDS.items()}
    return {"name": record["name"], **fields, "source": "admin", "read_only": False,
            "created_at": record.get("created_at"), "updated_at": record.get("updated_at")}


def configured_key(key: ApiKey, source: str) -> dict:
    """What the admin API says of a key of gateway.ini or its keys file (read-only; C{source}: which)."""
    return {
        "name": key.name, "team": key.team, "models": list(key.models), "services": list(key.services),
        "requests_per_minute": key.requests_per_minute, "tokens_per_minute": key.tokens_per_minute,
        "max_parallel": key.max_parallel, "budget_usd": key.budget_usd, "budget_period": key.budget_period,
        "user_budget_usd": key.user_budget_usd, "user_tokens_per_minute": key.user_tokens_per_minute,
        "user_requests_per_minute": key.user_requests_per_minute, "disabled": False, "source": source, "read_only": True,
    }


def configured_team(team: TeamLimits, source: str) -> dict:
    """What the admin API says of a team of gateway.ini (read-only)."""
    return {
        "name": team.name, "tokens_per_minute": team.tokens_per_minute, "requests_per_minute": team.requests_per_minute,
        "budget_usd": team.budget_usd, "budget_period": team.budget_period, "source": source, "read_only": True,
    }
