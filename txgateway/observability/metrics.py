"""
Prometheus metrics, all named C{txgateway_*}, in a registry of the
gateway's own (so that tests and several gateways in one process do not
share counters).  Circuit states and the rate-limit store's health are read
when scraped, so they are never stale.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.internet.interfaces import IReactorTime

from txgateway.observability.window import LATENCY_BUCKETS, EventRing, RecentSpenders, RecentWindow, SecondCounts

#: The classic text format, which every Prometheus scrapes (the names here
#: need none of the newer format's escaping).
CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["GatewayMetrics", "RecentWindows", "CONTENT_TYPE_LATEST", "method_label", "status_class"]

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CIRCUIT_STATES = ("closed", "open", "half_open")


def status_class(status: int) -> str:
    """C{"2xx"} for 204, C{"5xx"} for 502; C{"499"} stays itself (the client left)."""
    return "499" if status == 499 else f"{status // 100}xx"


def method_label(method: str) -> str:
    """The method, or C{"other"}: a client cannot grow the label set."""
    return method if method in _KNOWN_METHODS else "other"


#: The most distinct model names that label metric series (see L{GatewayMetrics.model_label}).
MAX_MODEL_LABELS = 1000
#: The label of every model name past L{MAX_MODEL_LABELS}.
OTHER_MODELS = "other"

class _ScrapeTimeCollector:
    """
    Gauges computed when scraped, from whatever C{circuits} and
    C{store_health} are set to (the current gateway's, after a reload too).
    """

    def __init__(self) -> None:
        self.circuits: Callable[[], Iterable[tuple[str, str, str]]] = list
        self.store_health: Callable[[], tuple[str, bool] | None] = lambda: None
        self.spans_dropped: Callable[[], int | None] = lambda: None

    def collect(self):
        state = GaugeMetricFamily(
            "txgateway_circuit_state",
            "1 for each endpoint's current circuit state (closed, open, half_open), 0 for the others.",
            labels=["service", "endpoint", "state"],
        )
        for service, endpoint, current in self.circuits():
            for name in _CIRCUIT_STATES:
                state.add_metric([service, endpoint, name], 1.0 if name == current else 0.0)
        yield state
        health = self.store_health()
        if health is not None:
            backend, healthy = health
            store = GaugeMetricFamily(
                "txgateway_ratelimit_store_healthy",
                "1 while the rate-limit store answers (Redis reachable, or memory), 0 while falling back.",
                labels=["backend"],
            )
            store.add_metric([backend], 1.0 if healthy else 0.0)
            yield store
        dropped = self.spans_dropped()
        if dropped is not None:
            yield CounterMetricFamily(
                "txgateway_spans_dropped", "Spans that never reached the OTLP collector (queue full, or the export failed).",
                value=dropped,
            )


class _RequestCounts:
    """
    The per-request series as plain numbers, turned into metric families
    when scraped: a request costs a few dictionary updates, not the
    locks and label checks of C{prometheus_client}'s children (measured at
    a twentieth of a proxied request's CPU time).
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.attempts: dict[tuple[str, str, str], int] = {}
        self.request_seconds: dict[tuple[str, ...], list] = {}
        self.upstream_seconds: dict[tuple[str, ...], list] = {}
        self.in_flight = 0

    def collect(self):
        requests = CounterMetricFamily(
            "txgateway_requests", "Requests answered, by service, method and status class.",
            labels=["service", "method", "status_class"],
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        yield _histogram("txgateway_request_duration_seconds", "Whole request time in the gateway, by service.",
                         ["service"], self.request_seconds)
        yield _histogram("txgateway_upstream_duration_seconds",
                         "Time from sending an attempt to its response headers, by service and endpoint.",
                         ["service", "endpoint"], self.upstream_seconds)
        attempts = CounterMetricFamily(
            "txgateway_upstream_attempts", "Attempts sent to backends, by service, endpoint and outcome "
            "(answered, http_5xx, timeout, connection_error, abandoned).",
            labels=["service", "endpoint", "outcome"],
        )
        for labels, count in sorted(self.attempts.items()):
            attempts.add_metric(list(labels), count)
        yield attempts
        yield GaugeMetricFamily("txgateway_in_flight_requests", "Requests being handled now.", value=self.in_flight)


class _SpendCounts:
    """
    The governed keys' settled spend and tokens as plain numbers (a settle
    costs dictionary updates), turned into counters when scraped.
    """

    def __init__(self) -> None:
        self.spend: dict[tuple[str, str, str], float] = {}
        self.tokens: dict[tuple[str, str], int] = {}

    def collect(self):
        spend = CounterMetricFamily(
            "txgateway_spend_usd", "Settled spend of governed keys in US dollars, by key, team and model (as sent).",
            labels=["key", "team", "model"],
        )
        for labels, usd in sorted(self.spend.items()):
            spend.add_metric(list(labels), usd)
        yield spend
        tokens = CounterMetricFamily(
            "txgateway_key_tokens", "Tokens settled for governed keys, by key and kind (prompt or completion).",
            labels=["key", "kind"],
        )
        for labels, count in sorted(self.tokens.items()):
            tokens.add_metric(list(labels), count)
        yield tokens


def _histogram(name: str, documentation: str, labels: list[str], by_labels: dict[tuple[str, ...], list]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, (counts, total) in sorted(by_labels.items()):
        cumulative, running = [], 0
        for bound, count in zip(_BUCKET_NAMES, counts):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(values), cumulative, total)
    return family


def _observe(by_labels: dict[tuple[str, ...], list], labels: tuple[str, ...], seconds: float) -> None:
    entry = by_labels.get(labels)
    if entry is None:
        entry = by_labels[labels] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
    entry[0][bisect_left(LATENCY_BUCKETS, seconds)] += 1
    entry[1] += seconds


_BUCKET_NAMES = [repr(float(bound)) for bound in LATENCY_BUCKETS] + ["+Inf"]


# No *_created series: one more line per counter that no dashboard reads.
disable_created_metrics()


class RecentWindows:
    """
    What the status page reads of the metrics: each endpoint's and model's
    last 60 s, tokens and refusals per second, the last events; one
    process's (L{GatewayMetrics}), or several processes' summed by L{absorb}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.recent = RecentWindow(clock)
        #: Each configured model's requests over the last 60 s (errors are 5xx answers; times to the answer's start).
        self.recent_models = RecentWindow(clock)
        #: Tokens settled per model, and governance refusals per reason, over the last 60 s (the status page's charts).
        self.recent_tokens = SecondCounts(clock)
        self.recent_refusals = SecondCounts(clock)
        #: What each end user spent over the last hour (the status page's top spenders).
        self.recent_spenders = RecentSpenders(clock)
        self.events = EventRing(clock)

    def window_state(self) -> dict:
        """The windows and events, JSON-able, for another process to L{absorb}."""
        return {
            "recent": self.recent.state(),
            "recent_models": self.recent_models.state(),
            "recent_tokens": self.recent_tokens.state(),
            "recent_refusals": self.recent_refusals.state(),
            "recent_spenders": self.recent_spenders.state(),
            "events": self.events.recent(),
        }

    def absorb(self, state: dict) -> None:
        """Add one process's L{window_state}."""
        self.recent.absorb(state["recent"])
        self.recent_models.absorb(state["recent_models"])
        self.recent_tokens.absorb(state["recent_tokens"])
        self.recent_refusals.absorb(state["recent_refusals"])
        self.recent_spenders.absorb(state["recent_spenders"])
        self.events.absorb(state["events"])


class GatewayMetrics(RecentWindows):
    """
    Every metric the gateway exports, and the text that C{/metrics} serves;
    also what the status page reads: each endpoint's last 60 seconds and
    the last circuit transitions and fallbacks, on C{clock}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__(clock)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._counts = _RequestCounts()
        r.register(self._counts)
        self.retries = Counter("txgateway_retries", "Retries scheduled, by service.", ["service"], registry=r)
        self.circuit_transitions = Counter(
            "txgateway_circuit_transitions", "Circuit breaker transitions, by service, endpoint, from and to state.",
            ["service", "endpoint", "from_state", "to_state"], registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "txgateway_retry_budget_exhausted", "Retries refused by the service's retry budget, by service.",
            ["service"], registry=r,
        )
        self.fallbacks = Counter(
            "txgateway_fallbacks", "Requests a service gave up on and passed to its fallback, by service and fallback.",
            ["service", "to"], registry=r,
        )
        self.rate_limited = Counter(
            "txgateway_rate_limited", "Requests refused with 429, by service.", ["service"], registry=r,
        )
        self.tokens = Counter(
            "txgateway_tokens", "Tokens the backends reported using, by service, model and kind (prompt or completion).",
            ["service", "model", "kind"], registry=r,
        )
        self.cache_requests = Counter(
            "txgateway_cache_requests", "Requests to cached services, by service and result (hit, miss, bypass, coalesced).",
            ["service", "result"], registry=r,
        )
        self._cache_children: dict[tuple[str, str], Any] = {}
        self.cache_bytes = Gauge("txgateway_cache_bytes", "Bytes the memory cache store holds.", registry=r)
        self.client_connections = Gauge(
            "txgateway_client_connections",
            "Client connections served now (those past max_connections, answered gateway_busy, are not).", registry=r,
        )
        self.client_connections_limit = Gauge(
            "txgateway_client_connections_limit",
            "The most client connections served at once ([gateway] max_connections, or what the open files allow).",
            registry=r,
        )
        self._token_children: dict[tuple[str, str, str], Any] = {}
        self.stream_resumes = Counter(
            "txgateway_stream_resumes",
            "Broken streams asked of a backend again with their text so far, by service asked and outcome.",
            ["service", "outcome"], registry=r,
        )
        self._spend = _SpendCounts()
        r.register(self._spend)
        self.governance_refusals = Counter(
            "txgateway_governance_refusals",
            "Requests refused by a key's or team's limits before any backend was called, by key and reason.",
            ["key", "reason"], registry=r,
        )
        self._model_labels: set[str] = set()
        self.usage_clamped = Counter(
            "txgateway_usage_clamped",
            "Settles of a governed key whose backend reported a token count out of bounds (negative, huge, "
            "not a number), clamped before it was charged, by key.",
            ["key"], registry=r,
        )
        self.over_bound = Counter(
            "txgateway_completion_over_bound",
            "Calls of a governed key whose backend went past the completion tokens reserved (ignoring "
            "max_tokens), by key and how: stream_cut (cut at the bound), json_over (settled at what it reported).",
            ["key", "how"], registry=r,
        )
        self._scraped = _ScrapeTimeCollector()
        r.register(self._scraped)

    def watch(
        self,
        circuits: Callable[[], Iterable[tuple[str, str, str]]],
        store_health: Callable[[], tuple[str, bool] | None],
        spans_dropped: Callable[[], int | None] = lambda: None,
    ) -> None:
        """Report circuit states, store health and dropped spans from these callables (the current gateway's)."""
        self._scraped.circuits = circuits
        self._scraped.store_health = store_health
        self._scraped.spans_dropped = spans_dropped

    def request_started(self) -> None:
        """One more request in flight."""
        self._counts.in_flight += 1

    def request_ended(self) -> None:
        """One fewer in flight: a request that is not counted (a probe, /metrics, /status)."""
        self._counts.in_flight -= 1

    def observe_request(self, service: str | None, method: str, status: int, seconds: float) -> None:
        """Count one finished request (and one fewer in flight)."""
        counts = self._counts
        counts.in_flight -= 1
        label = service or "none"
        key = (label, method_label(method), status_class(status))
        counts.requests[key] = counts.requests.get(key, 0) + 1
        _observe(counts.request_seconds, (label,), seconds)

    def observe_model(self, model: str, failed: bool, seconds_to_answer: float) -> None:
        """One finished request routed by the C{[model:NAME]} section C{model}, for the status page."""
        recent = self.recent_models
        recent.observe(model, "", failed)
        recent.time(model, "", seconds_to_answer)

    def count_cache(self, service: str, result: str) -> None:
        """One request to a cached service, by the cache's verdict."""
        key = (service, result)
        child = self._cache_children.get(key)
        if child is None:
            child = self._cache_children[key] = self.cache_requests.labels(service, result)
        child.inc()

    def model_label(self, model: str) -> str:
        """
        C{model} as a metric label: the first L{MAX_MODEL_LABELS} model
        names seen keep theirs, any later one is C{other} (under
        C{[model:*]} clients choose the names: each would be new series).
        """
        labels = self._model_labels
        if model in labels:
            return model
        if len(labels) < MAX_MODEL_LABELS:
            labels.add(model)
            return model
        return OTHER_MODELS

    def count_tokens(self, service: str, model: str, kind: str, tokens: int) -> None:
        """Add the tokens one backend answer reported."""
        model = self.model_label(model)
        key = (service, model, kind)
        child = self._token_children.get(key)
        if child is None:
            child = self._token_children[key] = self.tokens.labels(service, model, kind)
        child.inc(tokens)

    def count_spend(self, key: str, team: str, model: str, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        """One model's share of a governed request, settled: its cost and tokens, by key."""
        model = self.model_label(model)
        counts = self._spend
        if usd:
            labels = (key, team, model)
            counts.spend[labels] = counts.spend.get(labels, 0.0) + usd
        tokens = counts.tokens
        prompt, completion = (key, "prompt"), (key, "completion")
        tokens[prompt] = tokens.get(prompt, 0) + prompt_tokens
        tokens[completion] = tokens.get(completion, 0) + completion_tokens
        self.recent_tokens.add(model, prompt_tokens + completion_tokens)

    def count_end_user_spend(self, key: str, end_user: str, cost_nano: int, tokens: int) -> None:
        """
        A settled call that named its end user: for the status page's top
        spenders only (an end user is no metric label: they are unbounded).
        """
        self.recent_spenders.add(key, end_user, cost_nano, tokens)

    def count_refusal(self, key: str, reason: str) -> None:
        """A governed key's request refused by its limits (before any backend was called)."""
        self.governance_refusals.labels(key, reason).inc()
        self.recent_refusals.add(reason)

    def count_over_bound(self, key: str, how: str) -> None:
        """A governed key's call whose backend went past the completion it reserved."""
        self.over_bound.labels(key, how).inc()

    def count_clamped_usage(self, key: str) -> None:
        """A governed key's settle whose backend reported a token count out of bounds."""
        self.usage_clamped.labels(key).inc()

    def observe_attempt(self, service: str, endpoint: str, outcome: str) -> None:
        """Count one upstream attempt by its outcome."""
        attempts = self._counts.attempts
        key = (service, endpoint, outcome)
        attempts[key] = attempts.get(key, 0) + 1
        self.recent.observe(service, endpoint, outcome not in ("answered", "abandoned"))

    def observe_upstream_time(self, service: str, endpoint: str, seconds: float) -> None:
        """Time one attempt took until the backend's headers."""
        _observe(self._counts.upstream_seconds, (service, endpoint), seconds)
        self.recent.time(service, endpoint, seconds)

    def circuit_transition(
        self, endpoint: str, service: str, from_state: str, to_state: str, reason: str, request_id: str | None
    ) -> None:
        """A breaker changed state: counted, and kept for the status page."""
        self.circuit_transitions.labels(service, endpoint, from_state, to_state).inc()
        self.events.add("circuit", f"{service} {endpoint}", from_state, to_state, reason, request_id)
        self.recent.transition(service, endpoint, from_state, to_state)

    def fallback(self, service: str, to_service: str, gave_up: str, to: str, reason: str, request_id: str) -> None:
        """
        A service (or a model's target, C{gave_up}) gave up and the next one
        (C{to}, of C{to_service}) is tried.
        """
        self.fallbacks.labels(service, to_service).inc()
        self.events.add("fallback", service, gave_up, to, reason, request_id)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
