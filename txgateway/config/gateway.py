"""
gateway.ini and the environment, turned into one frozen configuration value.

Every key is an attrs field carrying its own parser (L{_key}); adding a key
is one line in the class of its section.  A problem anywhere becomes a
L{ConfigError} whose message names where the value came from (the file or
the environment variable), the section and the key.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs

from txgateway.errors import without_credentials

from txgateway.config.keys import BUDGET_PERIODS, ApiKey, ModelPrice, TeamLimits, check_key_name
from txgateway.redispool import parse_redis_url

__all__ = [
    "AuthConfig",
    "BudgetsConfig",
    "ResponsesConfig",
    "TracingConfig",
    "CacheConfig",
    "StatusConfig",
    "ConfigError",
    "GatewayConfig",
    "GatewaySettings",
    "LoggingConfig",
    "ModelConfig",
    "ModelTarget",
    "RateLimitConfig",
    "ServiceConfig",
    "DEFAULT_INI",
    "load_config",
    "parse_config",
]

#: The configuration the daemon runs on when no --config is given; the sample
#: gateway.ini at the top of the repository says the same.
DEFAULT_INI = """\
[gateway]
listen = tcp:3000
max_body_size = 10485760

[logging]
level = info
file = logs/combined.log

[ratelimit]
backend = memory
requests = 100
window = 60
key = ip

[service:ai]
url = http://localhost:8000

[service:data]
url = http://localhost:8001

[service:rag]
url = http://localhost:8002

[service:ai-openai]
url = http://localhost:8000/v1
api = openai

[model:*]
targets = ai-openai
"""

SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: A model's name, as clients send it and backends know it.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,255}$")
#: The catch-all model section, C{[model:*]}: every model no section names.
ANY_MODEL = "*"
#: How a service spreads attempts over its endpoints (see L{txgateway.routing.balance}).
BALANCE_MODES = ("least_requests", "round_robin", "ordered")


class ConfigError(Exception):
    """
    The configuration cannot be used; the message is one line naming the
    origin (file or environment variable), the section and the key (a
    URL's password in it masked: the message goes to logs and C{/status.json}).
    """

    def __init__(self, message: str) -> None:
        super().__init__(without_credentials(message))


# -- value parsers: each takes the raw string and returns a value or raises
# -- ValueError with a message that says what was expected.


def _seconds(raw: str, zero_allowed: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not (0 <= value < float("inf")) or (value == 0 and not zero_allowed):
        expected = "of 0 or more" if zero_allowed else "above 0"
        raise ValueError(f"expected a number of seconds {expected}, got {raw!r}")
    return value


def _non_negative_seconds(raw: str) -> float:
    return _seconds(raw, zero_allowed=True)


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"expected a whole number of at least {minimum}, got {raw!r}")
        return value

    return parse


def _number(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not (minimum <= value <= maximum):
            raise ValueError(
                f"expected a number from {minimum:g} to {maximum:g}, got {raw!r}"
            )
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _http_url(raw: str) -> str:
    value = raw.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r} ({error})") from None
    if not value.isascii():
        raise ValueError(f"expected an ASCII URL (punycode for international names), got {raw!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"expected a URL without query, fragment or credentials, got {raw!r}")
    if any(c.isspace() or c in "<>\"{}|\\^`" for c in value) or not _HOST.match(parts.hostname):
        raise ValueError(f"expected a host name or address without spaces or symbols, got {parts.hostname!r} in {raw!r}")
    return value.rstrip("/")


#: A host name (letters, digits, '-', '.', '_'), an IPv4 address, or an IPv6 address (urlsplit takes its brackets off).
_HOST = re.compile(r"^(?:[A-Za-z0-9_.-]+|[0-9A-Fa-f:.%]+)$")


def _http_urls(raw: str) -> str:
    """One base URL, or several (a service's endpoints) separated by commas."""
    urls = [part.strip() for part in raw.split(",")]
    if not all(urls):
        raise ValueError(f"expected http:// or https:// URLs separated by commas, got {raw!r}")
    checked = [_http_url(url) for url in urls]
    if len(set(checked)) != len(checked):
        raise ValueError(f"a URL is given twice in {raw!r}")
    return ", ".join(checked)


def _service_names(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    for name in names:
        if not SERVICE_NAME.match(name):
            raise ValueError(f"expected service names separated by commas, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"a service is named twice in {raw!r}")
    return names


def _model_targets(raw: str) -> tuple["ModelTarget", ...]:
    """C{SERVICE[:MODEL], ...}: the first is the primary, the rest its fallbacks in order."""
    targets = []
    for part in (part.strip() for part in raw.split(",")):
        if not part:
            raise ValueError(f"expected SERVICE[:MODEL] separated by commas, got {raw!r}")
        service, _, model = part.partition(":")
        if not SERVICE_NAME.match(service):
            raise ValueError(f"expected SERVICE[:MODEL], got {part!r} (a service name is letters, digits, '-' or '_')")
        if model and not MODEL_NAME.match(model):
            raise ValueError(f"expected SERVICE[:MODEL], got {part!r} (a model name is letters, digits and -_.:/@)")
        targets.append(ModelTarget(service, model or None))
    if len(set(targets)) != len(targets):
        raise ValueError(f"a target is given twice in {raw!r}")
    return tuple(targets)


def _methods(raw: str) -> tuple[bytes, ...]:
    methods = tuple(part.strip().upper() for part in raw.split(",") if part.strip())
    if not methods or not all(re.fullmatch(r"[A-Z]+", method) for method in methods):
        raise ValueError(f"expected HTTP methods separated by commas, got {raw!r}")
    return tuple(method.encode("ascii") for method in methods)


def _bearer_key(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[\x21-\x7e]+", value):
        # The message never repeats the key.
        raise ValueError("expected a key of printable ASCII characters without spaces")
    return value


def _environment_variable(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"expected the name of an environment variable, got {raw!r}")
    return value


def _redis_url(raw: str) -> str:
    value = raw.strip()
    parse_redis_url(value)  # says what is expected when it is not a Redis URL
    return value


def _text(raw: str) -> str:
    return raw.strip()


def _header_name(raw: str) -> str:
    """An HTTP header's name (a token), in lower case; empty for none."""
    value = raw.strip().lower()
    if value and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", value):
        raise ValueError(f"expected an HTTP header's name, got {raw!r}")
    return value


def _listen(raw: str) -> str:
    value = raw.strip()
    if not value or ":" not in value:
        raise ValueError(f"expected a Twisted server endpoint such as tcp:3000, got {raw!r}")
    return value


def _workers(raw: str) -> int:
    """C{auto} (the cores this process may run on) or a whole number from 1 to 256."""
    value = raw.strip().lower()
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"expected auto or a whole number of processes, got {raw!r}") from None
    if not 1 <= count <= 256:
        raise ValueError(f"expected auto or a whole number from 1 to 256, got {raw!r}")
    return count


def _connections(raw: str) -> int | None:
    """C{auto} (L{None}: what the open files allow, decided at start) or a whole number of at least 1."""
    if raw.strip().lower() == "auto":
        return None
    try:
        return _integer(1)(raw)
    except ValueError:
        raise ValueError(f"expected auto or a whole number of connections of at least 1, got {raw!r}") from None


def _rate_key(raw: str) -> str:
    value = raw.strip()
    if value in ("ip", "api_key"):
        return value
    if value.lower().startswith("header:"):
        name = value[len("header:"):].strip()
        if re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            return "header:" + name
    raise ValueError(f"expected ip, api_key or header:<Name>, got {raw!r}")


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _api_keys(raw: str) -> tuple[ApiKey, ...]:
    keys = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        keys.append(ApiKey.parse(entry))
    return tuple(keys)


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"expected IP addresses or networks, got {item!r}") from None
    return tuple(networks)


def _key(parse: Callable[[str], Any], default: Any = attrs.NOTHING) -> Any:
    """
    Declare one gateway.ini key: an attrs field whose metadata holds the
    parser for its raw string.
    """
    return attrs.field(default=default, metadata={"parse": parse})


# -- the configuration value


@attrs.frozen
class GatewaySettings:
    """The C{[gateway]} section."""

    listen: str = _key(_listen, "tcp:3000")
    max_body_size: int = _key(_integer(1), 10 * 1024 * 1024)
    deadline: float = _key(_seconds, 120.0)
    header_timeout: float = _key(_seconds, 10.0)
    client_idle_timeout: float = _key(_seconds, 60.0)
    drain_timeout: float = _key(_non_negative_seconds, 30.0)
    #: Seconds the listener keeps accepting at stop, /health/ready at 503, before it closes.
    drain_delay: float = _key(_non_negative_seconds, 0.0)
    #: Worker processes (C{auto}: one per core); more than one makes the daemon a supervisor.
    workers: int = _key(_workers, 1)
    #: The most messages (or C{input} items) a request read as a model call may hold.
    max_messages: int = _key(_integer(1), 10_000)
    #: The most request body bytes held at once across every connection (per process).
    max_bodies_in_flight: int = _key(_integer(1), 256 * 1024 * 1024)
    #: The most client connections open at once (per process); past it one is answered 503 C{gateway_busy}.
    #: L{None} (C{auto}): what the open files allow, each with its backend connection.
    max_connections: int | None = _key(_connections, None)


@attrs.frozen
class LoggingConfig:
    """The C{[logging]} section."""

    level: str = _key(_choice("debug", "info", "warning", "error", "critical"), "info")
    file: str = _key(_text, "logs/combined.log")


@attrs.frozen
class RateLimitConfig:
    """The C{[ratelimit]} section: the default bucket for every client key."""

    backend: str = _key(_choice("memory", "redis"), "memory")
    requests: int = _key(_integer(1), 100)
    window: float = _key(_seconds, 60.0)
    key: str = _key(_rate_key, "ip")
    redis_url: str = _key(_redis_url, "redis://127.0.0.1:6379/0")
    redis_timeout: float = _key(_seconds, 0.5)
    redis_retry_interval: float = _key(_seconds, 5.0)
    trusted_proxies: tuple = _key(_networks, ())


@attrs.frozen
class StatusConfig:
    """The C{[status]} section: who may see C{/status} and C{/status.json}."""

    allow: tuple = _key(_networks, _networks("127.0.0.1/8, ::1"))


@attrs.frozen
class CacheConfig:
    """The C{[cache]} section: the stores of the services' C{cache} key."""

    max_bytes: int = _key(_integer(1), 64 * 1024 * 1024)
    max_entry_bytes: int = _key(_integer(1), 1024 * 1024)
    #: Empty: the rate limiter's C{redis_url}.
    redis_url: str = _key(_redis_url, "")
    redis_timeout: float = _key(_seconds, 0.5)


@attrs.frozen
class AuthConfig:
    """
    The C{[auth]} section: API keys for C{/api/*}.  C{keys} holds the keys of
    both C{keys} and C{keys_file}, as digests.
    """

    keys: tuple = _key(_api_keys, ())
    keys_file: str = _key(_text, "")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


def _optional_usd(raw: str) -> float:
    value = _number(0.0, 1e9)(raw)
    return value


def _patterns(raw: str) -> tuple[str, ...]:
    items = tuple(filter(None, (part.strip() for part in raw.split(","))))
    for item in items:
        if not all(c.isalnum() or c in "-_.:/@*?[]!" for c in item):
            raise ValueError(f"expected model names or shell-style patterns, got {item!r}")
    return items


def _key_name(raw: str) -> str:
    return check_key_name(raw.strip())


def _secret(raw: str) -> str:
    if not raw.strip():
        raise ValueError("the secret is empty")
    return raw.strip()


@attrs.frozen
class _KeySection:
    """One C{[key:NAME]} section as written (made into an L{ApiKey})."""

    secret: str = attrs.field(default="", repr=False, metadata={"parse": _secret})
    secret_sha256: str = _key(_text, "")
    team: str = _key(_key_name, "")
    models: tuple = _key(_patterns, ())
    services: tuple = _key(_service_names, ())
    requests_per_minute: int | None = _key(_integer(1), None)
    tokens_per_minute: int | None = _key(_integer(1), None)
    max_parallel: int | None = _key(_integer(1), None)
    budget_usd: float | None = _key(_optional_usd, None)
    budget_period: str = _key(_choice(*BUDGET_PERIODS), "month")
    user_budget_usd: float | None = _key(_optional_usd, None)
    user_tokens_per_minute: int | None = _key(_integer(1), None)
    user_requests_per_minute: int | None = _key(_integer(1), None)


@attrs.frozen
class _TeamSection:
    """One C{[team:NAME]} section."""

    tokens_per_minute: int | None = _key(_integer(1), None)
    requests_per_minute: int | None = _key(_integer(1), None)
    budget_usd: float | None = _key(_optional_usd, None)
    budget_period: str = _key(_choice(*BUDGET_PERIODS), "month")


@attrs.frozen
class _PriceSection:
    """One C{[price:MODEL]} section: US dollars per million tokens."""

    prompt: float = _key(_number(0.0, 1e6), 0.0)
    completion: float = _key(_number(0.0, 1e6), 0.0)
    cached_prompt: float | None = _key(_number(0.0, 1e6), None)


def _otlp_endpoint(raw: str) -> str:
    return _http_url(raw) if raw.strip() else ""


def _otlp_headers(raw: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not all(c.isalnum() or c in "-_" for c in name.strip()):
            raise ValueError("expected name=value pairs separated by commas (the values are never logged)")
        headers.append((name.strip().lower(), value.strip()))
    return tuple(headers)


@attrs.frozen
class TracingConfig:
    """
    The C{[tracing]} section: OpenTelemetry spans exported over OTLP/HTTP
    (protobuf) to C{otlp_endpoint}; empty: no export.
    """

    otlp_endpoint: str = _key(_otlp_endpoint, "")
    #: Headers sent with every export (an API key for a hosted backend); never logged or shown.
    otlp_headers: tuple = attrs.field(default=(), repr=False, metadata={"parse": _otlp_headers})
    service_name: str = _key(_text, "txgateway")
    sample_ratio: float = _key(_number(0.0, 1.0), 1.0)
    timeout: float = _key(_seconds, 10.0)

    @property
    def enabled(self) -> bool:
        """Whether spans are exported."""
        return bool(self.otlp_endpoint)


@attrs.frozen
class BudgetsConfig:
    """
    The C{[budgets]} section: where governed keys' spend and reservations
    live.  C{state_file} empty: C{state/txgateway.db} next to the log
    directory; C{redis_url} empty: the rate limiter's.
    """

    store: str = _key(_choice("sqlite", "redis"), "sqlite")
    state_file: str = _key(_text, "")
    redis_url: str = _key(_redis_url, "")
    redis_timeout: float = _key(_seconds, 0.5)
    #: Seconds past a call's deadline its reservation lapses when never settled.
    reservation_margin: float = _key(_non_negative_seconds, 5.0)
    #: A call whose worst case is more than its budget has left: C{refuse}, or C{cap} its completion.
    when_short: str = _key(_choice("refuse", "cap"), "refuse")


def _optional_listen(raw: str) -> str:
    return _listen(raw) if raw.strip() else ""


@attrs.frozen
class AdminConfig:
    """
    The C{[admin]} section: the admin API's keys (written like C{[auth]
    keys}; none: no admin API), and where it listens (empty: on the
    gateway's own address, under C{/admin/}).
    """

    keys: tuple = _key(_api_keys, ())
    listen: str = _key(_optional_listen, "")

    @property
    def enabled(self) -> bool:
        """Whether the admin API is served (some admin key is set)."""
        return bool(self.keys)


@attrs.frozen
class ResponsesConfig:
    """
    The C{[responses]} section: where the gateway keeps the Responses it
    answers (OpenAI's Responses API with C{store}), so that conversations
    go on by C{previous_response_id} on any target.  C{store = sqlite}
    keeps them in C{state_file} (empty: C{responses.db} beside the
    budgets' state file), shared by the workers of one machine; C{redis}
    in C{redis_url} (empty: the rate limiter's), shared by every gateway;
    C{memory} in the one process; C{off} keeps none (a call going on from
    a response is refused).
    """

    store: str = _key(_choice("sqlite", "redis", "memory", "off"), "sqlite")
    state_file: str = _key(_text, "")
    redis_url: str = _key(_redis_url, "")
    redis_timeout: float = _key(_seconds, 0.5)
    #: Seconds a kept Response lives (30 days); a conversation going on keeps its earlier turns with it.
    ttl: float = _key(_seconds, 30 * 24 * 3600.0)
    #: One kept Response (its own input and the Response itself) at most; a larger one is not kept.
    max_response_bytes: int = _key(_integer(1024), 4 * 1024 * 1024)
    #: Responses kept at most by the memory and SQLite stores (the oldest go first).
    max_entries: int = _key(_integer(1), 100_000)


@attrs.frozen
class ServiceConfig:
    """One C{[service:NAME]} section: a backend served under C{/api/NAME/}."""

    name: str
    url: str = _key(_http_urls)
    deadline: float = _key(_seconds)
    balance: str = _key(_choice(*BALANCE_MODES), "least_requests")
    timeout: float = _key(_seconds, 30.0)
    first_byte_timeout: float = _key(_seconds, 30.0)
    idle_timeout: float = _key(_seconds, 60.0)
    retries: int = _key(_integer(0), 3)
    retry_delay: float = _key(_non_negative_seconds, 1.0)
    retry_multiplier: float = _key(_number(1.0, 100.0), 2.0)
    retry_max_delay: float = _key(_non_negative_seconds, 30.0)
    retry_jitter: float = _key(_number(0.0, 1.0), 0.0)
    breaker_threshold: int = _key(_integer(1), 5)
    breaker_cooldown: float = _key(_seconds, 60.0)
    ratelimit_requests: int | None = _key(_integer(1), None)
    ratelimit_window: float | None = _key(_seconds, None)
    forward_api_key: bool = _key(_boolean, False)
    fallback: tuple = _key(_service_names, ())
    retry_timeouts: str = _key(_choice("idempotent", "always", "never"), "idempotent")
    retry_budget: float = _key(_number(0.0, 100.0), 20.0)
    retry_budget_min: int = _key(_integer(0), 3)
    #: C{openai}: the backend speaks OpenAI's wire format (implied for services a model
    #: names, unless they say C{anthropic}: Anthropic's Messages API).
    api: str = _key(_choice("http", "openai", "anthropic"), "http")
    #: C{max_tokens} sent to an C{api = anthropic} service for an OpenAI request that names none.
    max_tokens: int = _key(_integer(1), 4096)
    #: The C{anthropic-version} header sent to an C{api = anthropic} service (a Messages client's own wins).
    anthropic_version: str = _key(_text, "2023-06-01")
    #: How an C{api = openai} service takes OpenAI's Responses API: C{chat}, translated to
    #: chat completions (which every OpenAI-compatible server speaks), or C{native}, as it is.
    responses: str = _key(_choice("chat", "native"), "chat")
    #: What becomes of the Responses API's built-in tools (web search...) in a call translated for
    #: this service, which runs none of them: C{drop} (left out, named in C{X-Gateway-Dropped-Tools})
    #: or C{refuse} (the target is left out, or the call refused by name).
    builtin_tools: str = _key(_choice("drop", "refuse"), "drop")
    #: What a Messages call's thinking becomes for this C{api = openai} service: C{send}, a
    #: C{reasoning_effort} (by its budget or C{output_config.effort}), or C{drop} (a backend whose
    #: models take no C{reasoning_effort}, such as OpenAI's gpt-4o, refuses it).
    reasoning_effort: str = _key(_choice("send", "drop"), "send")
    #: A Messages call's C{top_k} for this C{api = openai} service: C{drop} (OpenAI refuses it) or
    #: C{pass} (vLLM, llama.cpp and SGLang take it).
    top_k: str = _key(_choice("drop", "pass"), "drop")
    #: A request header naming the end user a call is for (an application's own), which wins
    #: over what the call's body says; empty: none.
    end_user_header: str = _key(_header_name, "")
    #: The backend's own key, sent as C{Authorization: Bearer}; never logged or shown.
    api_key: str = attrs.field(default="", repr=False, metadata={"parse": _bearer_key})
    #: The environment variable C{api_key} is read from.
    api_key_env: str = _key(_environment_variable, "")
    first_token_timeout: float | None = _key(_seconds, None)
    resume: str = _key(_choice("off", "prefill"), "off")
    cache: str = _key(_choice("off", "memory", "redis"), "off")
    cache_ttl: float = _key(_seconds, 300.0)
    cache_methods: tuple = _key(_methods, (b"GET", b"HEAD"))
    coalesce_wait: float | None = _key(_seconds, None)
    #: What a governed key is charged for a request the gateway does not read as a model
    #: call (L{None}: on a model API's service, such a request of a governed key is refused).
    request_price_usd: float | None = _key(_number(0.0, 1e6), None)

    def speaks(self, client_api: str) -> str:
        """
        The API this service is spoken to in for a call of C{client_api}:
        its C{api}, or the Responses API itself for a Responses call to an
        C{api = openai} service that takes it natively (C{responses = native};
        else the call is translated to its chat completions).
        """
        if client_api == "responses" and self.api == "openai" and self.responses == "native":
            return "responses"
        return self.api

    @property
    def coalesce_timeout(self) -> float:
        """Seconds a request waits for an identical one in flight: C{coalesce_wait}, else C{timeout}."""
        return self.timeout if self.coalesce_wait is None else self.coalesce_wait

    @property
    def endpoint_urls(self) -> tuple[str, ...]:
        """The service's endpoints: the base URLs of C{url}, in order."""
        return tuple(self.url.split(", "))

    @property
    def speaks_openai(self) -> bool:
        """Whether the gateway reads this service's requests and answers as OpenAI's."""
        return self.api == "openai"

    @property
    def reads_answers(self) -> bool:
        """Whether the gateway reads this service's answers as they pass (OpenAI's or Anthropic's API)."""
        return self.api != "http"

    @property
    def token_timeout(self) -> float:
        """Seconds a stream may take to its first token: C{first_token_timeout}, else C{first_byte_timeout}."""
        return self.first_byte_timeout if self.first_token_timeout is None else self.first_token_timeout


@attrs.frozen
class ModelTarget:
    """
    One target of a model: a service, and the model name sent to it
    (L{None}: the client's own, only under C{[model:*]}).
    """

    service: str
    model: str | None

    def model_for(self, asked: str) -> str:
        """The C{model} value sent to this target for a request that asked for C{asked}."""
        return asked if self.model is None else self.model


@attrs.frozen
class ModelConfig:
    """One C{[model:NAME]} section: where requests naming the model go."""

    name: str
    targets: tuple = _key(_model_targets)
    #: Completion tokens reserved for a request that names no C{max_tokens}.
    reserve_completion_tokens: int = _key(_integer(1), 1024)
    #: Prompt tokens reserved for each image a request carries (the providers' largest
    #: published count by default; more for a model that counts images as more tokens).
    image_tokens: int = _key(_integer(1), 2_700)


@attrs.frozen
class GatewayConfig:
    """The whole configuration: a value, replaced whole on reload."""

    gateway: GatewaySettings
    logging: LoggingConfig
    ratelimit: RateLimitConfig
    services: Mapping[str, ServiceConfig]
    auth: AuthConfig = AuthConfig()
    models: Mapping[str, ModelConfig] = attrs.Factory(dict)
    cache: CacheConfig = CacheConfig()
    status: StatusConfig = StatusConfig()
    teams: Mapping[str, TeamLimits] = attrs.Factory(dict)
    prices: Mapping[str, ModelPrice] = attrs.Factory(dict)
    budgets: BudgetsConfig = BudgetsConfig()
    tracing: TracingConfig = TracingConfig()
    responses: ResponsesConfig = ResponsesConfig()
    admin: AdminConfig = AdminConfig()
    source: str = "<embedded defaults>"

    @property
    def governed(self) -> bool:
        """
        Whether any key or team has a limit, or any model a price, or the
        admin API may give them some at any time: spend is counted.
        """
        return bool(self.prices) or self.admin.enabled or any(key.governed for key in self.auth.keys) or any(
            team.governed for team in self.teams.values()
        )

    @property
    def end_user_budget_periods(self) -> dict[str, str]:
        """The budget period of each key whose end users have budgets of their own, by the key's name."""
        return {key.name: key.budget_period for key in self.auth.keys if key.user_budget_usd is not None}

    def reserve_completion_tokens(self, model: str) -> int:
        """The completion tokens reserved for C{model} when a request names no maximum."""
        config = self.models.get(model) or self.models.get(ANY_MODEL)
        return config.reserve_completion_tokens if config is not None else 1024

    def image_tokens(self, model: str) -> int:
        """The prompt tokens reserved for each image of a request to C{model}."""
        config = self.models.get(model) or self.models.get(ANY_MODEL)
        return config.image_tokens if config is not None else 2_700


# -- parsing


@attrs.frozen
class _Raw:
    """One raw value and where it came from, for error messages."""

    value: str
    origin: str


def _build(cls: type, origin: str, section: str, raw: dict[str, _Raw], **given: Any) -> Any:
    """
    Make an instance of the frozen section class C{cls} from raw strings,
    rejecting unknown keys and naming the section and key of any bad value.
    """
    keys = {field.name: field for field in attrs.fields(cls) if "parse" in field.metadata}
    for key in raw:
        if key not in keys:
            first = key.split()[0] if key.split() else key
            if first in keys and first != key:
                # "url http://..." reads as the key "url http" (':' separates too).
                raise ConfigError(
                    f"{raw[key].origin}: [{section}] {first}: a key and its value need '=' between them "
                    f"(write {first} = ...)"
                )
            known = ", ".join(sorted(keys))
            raise ConfigError(f"{raw[key].origin}: [{section}] {key}: unknown key (known keys: {known})")
    values = dict(given)
    for name, field in keys.items():
        if name in raw:
            try:
                values[name] = field.metadata["parse"](raw[name].value)
            except ValueError as error:
                raise ConfigError(f"{raw[name].origin}: [{section}] {name}: {error}") from None
        elif field.default is attrs.NOTHING and name not in values:
            raise ConfigError(f"{origin}: [{section}] {name}: missing (this key is required)")
    return cls(**values)


def _env_name(service: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", service).upper() + "_SERVICE_URL"


def _environment_overrides(
    sections: dict[str, dict[str, _Raw]], environ: Mapping[str, str], defaults: bool = False
) -> None:
    """
    Apply the seed-compatible environment variables onto the raw sections.
    On the embedded defaults, C{AI_SERVICE_URL} moves C{ai-openai} (OpenAI's
    API of the same backend, under C{/v1}) with C{ai}, unless
    C{AI_OPENAI_SERVICE_URL} says otherwise.
    """

    def put(section: str, key: str, value: str, variable: str) -> None:
        sections.setdefault(section, {})[key] = _Raw(value, f"environment variable {variable}")

    if "PORT" in environ:
        port = environ["PORT"].strip()
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"environment variable PORT: expected a TCP port number, got {port!r}")
        current = sections.get("gateway", {}).get("listen")
        listen = f"tcp:{port}"
        if current is not None and current.value.strip().startswith("tcp:"):
            # Keep the options (interface=..., backlog=...) of the configured endpoint.
            fields = current.value.strip().split(":")
            options = [f for f in fields[2:] if "=" in f]
            listen = ":".join(["tcp", port, *options])
        put("gateway", "listen", listen, "PORT")
    if "LOG_LEVEL" in environ:
        put("logging", "level", environ["LOG_LEVEL"], "LOG_LEVEL")
    if "RATE_LIMIT_MAX_REQUESTS" in environ:
        put("ratelimit", "requests", environ["RATE_LIMIT_MAX_REQUESTS"], "RATE_LIMIT_MAX_REQUESTS")
    if "RATE_LIMIT_WINDOW_MS" in environ:
        raw = environ["RATE_LIMIT_WINDOW_MS"].strip()
        try:
            seconds = repr(float(raw) / 1000.0)
        except ValueError:
            raise ConfigError(
                f"environment variable RATE_LIMIT_WINDOW_MS: expected milliseconds, got {raw!r}"
            ) from None
        put("ratelimit", "window", seconds, "RATE_LIMIT_WINDOW_MS")
    for section in list(sections):
        if section.startswith("service:"):
            variable = _env_name(section[len("service:"):])
            if variable in environ:
                put(section, "url", environ[variable], variable)
    if defaults and "AI_SERVICE_URL" in environ and "AI_OPENAI_SERVICE_URL" not in environ:
        urls = [url.strip().rstrip("/") + "/v1" for url in environ["AI_SERVICE_URL"].split(",") if url.strip()]
        put("service:ai-openai", "url", ", ".join(urls), "AI_SERVICE_URL")


def parse_config(
    text: str, origin: str = "gateway.ini", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """
    Parse gateway.ini text, apply environment overrides and return the frozen
    configuration, or raise L{ConfigError}.
    """
    environ = os.environ if environ is None else environ
    sections = _sections(text, origin)
    _environment_overrides(sections, environ, defaults=text is DEFAULT_INI)
    gateway = _build(GatewaySettings, origin, "gateway", sections.get("gateway", {}))
    services = _services(sections, origin, gateway, environ)
    models = _models(sections, origin, services)
    _check_fallbacks(sections, services)
    teams = _teams(sections, origin)
    auth = _auth(sections, origin, teams)
    services_named = set(services)
    for key in auth.keys:
        unknown = [name for name in key.services if name not in services_named]
        if unknown:
            raise ConfigError(f"{origin}: [key:{key.name}] services: no service is named {unknown[0]!r}")
    ratelimit = _build(RateLimitConfig, origin, "ratelimit", sections.get("ratelimit", {}))
    if ratelimit.key == "api_key" and not auth.enabled:
        raise ConfigError(f"{origin}: [ratelimit] key: api_key needs API keys in [auth] keys or keys_file")
    responses = _build(ResponsesConfig, origin, "responses", sections.get("responses", {}))
    admin = _build(AdminConfig, origin, "admin", sections.get("admin", {}))
    for admin_key in admin.keys:
        if any(key.digest == admin_key.digest for key in auth.keys):
            raise ConfigError(f"{origin}: [admin] keys: the admin key {admin_key.name!r} has the same secret as a caller key")
    if responses.store == "memory" and gateway.workers > 1:
        raise ConfigError(
            f"{origin}: [responses] store: memory keeps each worker's own responses, and a conversation moves "
            "between workers: use sqlite or redis with [gateway] workers above 1"
        )
    return GatewayConfig(
        gateway=gateway,
        logging=_build(LoggingConfig, origin, "logging", sections.get("logging", {})),
        ratelimit=ratelimit,
        services=services,
        auth=auth,
        models=models,
        cache=_build(CacheConfig, origin, "cache", sections.get("cache", {})),
        status=_build(StatusConfig, origin, "status", sections.get("status", {})),
        teams=teams,
        prices=_prices(sections, origin),
        budgets=_build(BudgetsConfig, origin, "budgets", sections.get("budgets", {})),
        tracing=_build(TracingConfig, origin, "tracing", sections.get("tracing", {})),
        responses=responses,
        admin=admin,
        source=origin,
    )


def _sections(text: str, origin: str) -> dict[str, dict[str, _Raw]]:
    """The ini's sections and their raw values; an unknown or misnamed section is refused."""
    # No DEFAULT section magic: a [DEFAULT] section is an unknown section.
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,
        default_section="\x00no default section",
        empty_lines_in_values=False,
    )
    try:
        parser.read_string(text, source=origin)
    except configparser.Error as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"{origin}: {message}") from None
    sections: dict[str, dict[str, _Raw]] = {}
    for section in parser.sections():
        known = section in ("gateway", "logging", "ratelimit", "auth", "cache", "status", "budgets", "tracing", "responses", "admin")
        if not known and not section.startswith(("service:", "model:", "key:", "team:", "price:")):
            raise ConfigError(
                f"{origin}: [{section}]: unknown section (known: gateway, logging, ratelimit, auth, cache, "
                "status, budgets, tracing, responses, service:NAME, model:NAME, key:NAME, team:NAME, price:MODEL)"
            )
        _check_section_name(section, origin)
        if section.startswith("service:") and not SERVICE_NAME.match(section[len("service:"):]):
            raise ConfigError(
                f"{origin}: [{section}]: a service name is 1 to 64 letters, digits, '-' or '_'"
            )
        model = section[len("model:"):]
        if section.startswith("model:") and model != ANY_MODEL and not MODEL_NAME.match(model):
            raise ConfigError(
                f"{origin}: [{section}]: a model name is letters, digits and -_.:/@ (or * for every other model)"
            )
        sections[section] = {
            key: _Raw(value, origin) for key, value in parser.items(section, raw=True)
        }
    return sections


def _check_section_name(section: str, origin: str) -> None:
    """The name in a C{[key:NAME]}, C{[team:NAME]} or C{[price:MODEL]} section is one they may have."""
    kind, _, name = section.partition(":")
    try:
        if kind in ("key", "team"):
            check_key_name(name)
    except ValueError as error:
        raise ConfigError(f"{origin}: [{section}]: {error}") from None
    if kind == "price" and name != ANY_MODEL and not MODEL_NAME.match(name):
        raise ConfigError(f"{origin}: [{section}]: a model name is letters, digits and -_.:/@ (or * for every other model)")


def _services(
    sections: dict[str, dict[str, _Raw]], origin: str, gateway: GatewaySettings, environ: Mapping[str, str]
) -> dict[str, ServiceConfig]:
    """The C{[service:NAME]} sections, with their backend keys read; at least one."""
    services = {}
    for section, raw in sections.items():
        if section.startswith("service:"):
            name = section[len("service:"):]
            service = _build(ServiceConfig, origin, section, raw, name=name, deadline=gateway.deadline)
            services[name] = _with_api_key(service, raw, environ)
    if not services:
        raise ConfigError(f"{origin}: no [service:NAME] section: nothing to route to")
    return services


def _models(sections: dict[str, dict[str, _Raw]], origin: str, services: dict[str, ServiceConfig]) -> dict[str, ModelConfig]:
    """The C{[model:NAME]} sections; every service they name is marked C{api = openai} in C{services}."""
    models = {}
    for section, raw in sections.items():
        if not section.startswith("model:"):
            continue
        model = _build(ModelConfig, origin, section, raw, name=section[len("model:"):])
        if model.name != ANY_MODEL:
            # A named model's targets get its own name unless they say another.
            targets = tuple(attrs.evolve(t, model=t.model or model.name) for t in model.targets)
            model = attrs.evolve(model, targets=targets)
        for target in model.targets:
            if target.service not in services:
                where = raw["targets"].origin
                raise ConfigError(f"{where}: [{section}] targets: no service is named {target.service!r}")
            # A service a model routes to speaks OpenAI, unless it says Anthropic.
            if services[target.service].api == "http":
                services[target.service] = attrs.evolve(services[target.service], api="openai")
        models[model.name] = model
    return models


def _check_fallbacks(sections: dict[str, dict[str, _Raw]], services: dict[str, ServiceConfig]) -> None:
    """Every C{fallback} names another service that exists."""
    for name, service in services.items():
        for other in service.fallback:
            where = sections[f"service:{name}"]["fallback"].origin
            if other == name:
                raise ConfigError(f"{where}: [service:{name}] fallback: a service cannot be its own fallback")
            if other not in services:
                raise ConfigError(f"{where}: [service:{name}] fallback: no service is named {other!r}")


def _auth(sections: dict[str, dict[str, _Raw]], origin: str, teams: dict[str, TeamLimits]) -> AuthConfig:
    """
    C{[auth]}, with the C{[key:NAME]} sections and the keys of its
    C{keys_file} (lines, or key and team sections); no key name or secret
    twice, no team a key names missing.
    """
    auth = _build(AuthConfig, origin, "auth", sections.get("auth", {}))
    keys = auth.keys + _key_sections(sections, teams, origin)
    if auth.keys_file:
        keys += tuple(attrs.evolve(key, origin=f"keys_file {auth.keys_file}") for key in _read_keys_file(auth.keys_file, origin, teams))
    names = [key.name for key in keys]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"{origin}: [auth] keys: the key name {duplicated[0]!r} is given twice")
    digests: dict[bytes, str] = {}
    for key in keys:
        if key.digest in digests:
            raise ConfigError(f"{origin}: [key:{key.name}] secret: the same secret as key {digests[key.digest]!r}")
        digests[key.digest] = key.name
    return attrs.evolve(auth, keys=keys)


def _key_sections(sections: dict[str, dict[str, _Raw]], teams: Mapping[str, TeamLimits], origin: str) -> tuple[ApiKey, ...]:
    """The C{[key:NAME]} sections (of the file C{origin}) as keys."""
    keys = []
    for section, raw in sections.items():
        if not section.startswith("key:"):
            continue
        name = section[len("key:"):]
        written = _build(_KeySection, origin, section, raw)
        if bool(written.secret) == bool(written.secret_sha256):
            raise ConfigError(f"{origin}: [{section}] secret: give secret or secret_sha256 (one of them)")
        try:
            digest = ApiKey.digest_of(written.secret) if written.secret else ApiKey.digest_from_hex(written.secret_sha256)
        except ValueError as error:
            raise ConfigError(f"{raw['secret_sha256'].origin}: [{section}] secret_sha256: {error}") from None
        if written.team and written.team not in teams:
            raise ConfigError(f"{raw['team'].origin}: [{section}] team: no [team:{written.team}] section")
        keys.append(
            ApiKey(
                name, digest, written.team or None, written.models, written.services, written.requests_per_minute,
                written.tokens_per_minute, written.max_parallel, written.budget_usd, written.budget_period,
                written.user_budget_usd, written.user_tokens_per_minute, written.user_requests_per_minute,
            )
        )
    return tuple(keys)


def _teams(sections: dict[str, dict[str, _Raw]], origin: str) -> dict[str, TeamLimits]:
    """The C{[team:NAME]} sections (those of C{[auth] keys_file} too)."""
    teams = {}
    for section, raw in _with_keys_file_sections(sections, origin).items():
        if section.startswith("team:"):
            name = section[len("team:"):]
            written = _build(_TeamSection, origin, section, raw)
            teams[name] = TeamLimits(name, **attrs.asdict(written))
    return teams


def _prices(sections: dict[str, dict[str, _Raw]], origin: str) -> dict[str, ModelPrice]:
    """The C{[price:MODEL]} sections."""
    prices = {}
    for section, raw in sections.items():
        if section.startswith("price:"):
            model = section[len("price:"):]
            prices[model] = ModelPrice(model, **attrs.asdict(_build(_PriceSection, origin, section, raw)))
    return prices


def _with_api_key(service: ServiceConfig, raw: dict[str, _Raw], environ: Mapping[str, str]) -> ServiceConfig:
    """The service with C{api_key} read from the environment variable C{api_key_env} names."""
    section = f"service:{service.name}"
    if not service.api_key_env:
        return service
    where = raw["api_key_env"].origin
    if service.api_key:
        raise ConfigError(f"{where}: [{section}] api_key_env: give api_key or api_key_env, not both")
    key = environ.get(service.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"{where}: [{section}] api_key_env: the environment variable {service.api_key_env} is not set"
        )
    try:
        _bearer_key(key)
    except ValueError as error:
        raise ConfigError(f"{where}: [{section}] api_key_env: {service.api_key_env}: {error}") from None
    return attrs.evolve(service, api_key=key)


def _keys_file_text(path: str, origin: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"{origin}: [auth] keys_file: cannot read {path}: {reason}") from None


def _is_ini(text: str) -> bool:
    """A keys file in ini syntax (key and team sections) rather than one key a line."""
    return any(line.lstrip().startswith("[") for line in text.splitlines())


def _keys_file_sections(path: str, origin: str) -> dict[str, dict[str, _Raw]]:
    """The C{[key:NAME]} and C{[team:NAME]} sections of a keys file in ini syntax."""
    sections = _sections(_keys_file_text(path, origin), path)
    for section in sections:
        if not section.startswith(("key:", "team:")):
            raise ConfigError(f"{path}: [{section}]: a keys file holds only [key:NAME] and [team:NAME] sections")
    return sections


def _with_keys_file_sections(sections: dict[str, dict[str, _Raw]], origin: str) -> dict[str, dict[str, _Raw]]:
    """C{sections} and, when C{[auth] keys_file} is in ini syntax, its sections too."""
    raw = sections.get("auth", {}).get("keys_file")
    if raw is None or not raw.value.strip() or not _is_ini(_keys_file_text(raw.value.strip(), origin)):
        return sections
    merged = dict(sections)
    for section, values in _keys_file_sections(raw.value.strip(), origin).items():
        if section in merged:
            raise ConfigError(f"{raw.value.strip()}: [{section}]: also in {origin}")
        merged[section] = values
    return merged


def _read_keys_file(path: str, origin: str, teams: Mapping[str, TeamLimits]) -> tuple[ApiKey, ...]:
    """
    The keys of a keys file: one C{name:secret} (or C{name:sha256:<hex>})
    a line, or C{[key:NAME]} sections.
    """
    text = _keys_file_text(path, origin)
    if _is_ini(text):
        return _key_sections(_keys_file_sections(path, origin), teams, path)
    lines = text.splitlines()
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(ApiKey.parse(line))
        except ValueError as error:
            raise ConfigError(f"{origin}: [auth] keys_file: {path} line {number}: {error}") from None
    return tuple(keys)


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """
    Read the file at C{path} (or the embedded defaults when C{path} is
    L{None}) and return the configuration, or raise L{ConfigError}.
    """
    if path is None:
        return parse_config(DEFAULT_INI, "<embedded defaults>", environ)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"{path}: cannot read the configuration: {reason}") from None
    return parse_config(text, path, environ)
