"""
The operator's JSON documents: what C{GET /health}, C{GET /status.json}
and C{GET /spend.json} answer, built from the broker's routes, the models'
deployments, the stores, the recent window and the governor's ledger.
"""

from __future__ import annotations

from typing import Any, Iterable

from txgateway.config.keys import NANO_PER_USD, ApiKey
from txgateway.governance.governor import Governor
from txgateway.governance.interface import ScopeSpend, SpendReport
from txgateway.observability.metrics import GatewayMetrics
from txgateway.observability.window import add_counts
from txgateway.routing.broker import ServiceBroker
from txgateway.routing.model import ServiceRoute

__all__ = ["TOP_SPENDERS_SHOWN", "circuit_of", "end_user_document", "health_document", "spend_document", "status_document"]

#: The end users C{/status.json} names among the last hour's spenders.
TOP_SPENDERS_SHOWN = 20


def circuit_of(states: Iterable[str]) -> str:
    """
    The circuit of a service or model target from its endpoints': closed if
    any is closed (or none is known yet), else half_open if any is, else open.
    """
    states = set(states)
    if not states or "closed" in states:
        return "closed"
    return "half_open" if "half_open" in states else "open"


def _service_health(route: ServiceRoute) -> dict:
    endpoints = []
    for endpoint in route.endpoints:
        status = endpoint.breaker.status()
        endpoints.append({
            "url": endpoint.url,
            "circuit": status.state,
            "consecutive_failures": status.consecutive_failures,
            "trial_in_s": None if status.trial_in is None else round(status.trial_in, 3),
            "in_flight": endpoint.in_flight,
        })
    circuit = circuit_of(endpoint["circuit"] for endpoint in endpoints)
    # The failures and trial time of the endpoints in the service's state (the fewest, the soonest).
    same = [endpoint for endpoint in endpoints if endpoint["circuit"] == circuit]
    trials = [endpoint["trial_in_s"] for endpoint in same if endpoint["trial_in_s"] is not None]
    service = {
        "url": route.config.url,
        "circuit": circuit,
        "consecutive_failures": min(endpoint["consecutive_failures"] for endpoint in same),
        "trial_in_s": min(trials) if trials else None,
        "endpoints": endpoints,
    }
    return service


def _store_health(description: dict) -> dict:
    return {"backend": description["backend"], "healthy": bool(description.get("healthy", True))}


def health_document(broker: ServiceBroker, rate_limit_store: Any, uptime: float, accepting: bool) -> dict:
    """What C{GET /health} answers."""
    services = {}
    degraded = False
    for name, route in sorted(broker.routes.items()):
        services[name] = _service_health(route)
        degraded = degraded or any(endpoint["circuit"] != "closed" for endpoint in services[name]["endpoints"])
    body: dict[str, Any] = {"status": "ok", "uptime_s": round(uptime, 3), "services": services}
    if broker.models.models:
        body["models"] = {
            name: {"targets": [
                {"service": target["service"], "model": target["model"], "circuit": circuit_of(target["states"])}
                for target in targets
            ]}
            for name, targets in broker.models.target_states().items()
        }
    cache = broker.cache
    if cache is not None and cache.stores:
        descriptions = [store.description for _, store in sorted(cache.stores.items())]
        body["cache"] = {
            "backend": ", ".join(d["backend"] for d in descriptions),
            "healthy": all(d["healthy"] for d in descriptions),
        }
        degraded = degraded or not body["cache"]["healthy"]
    if rate_limit_store is not None:
        body["ratelimit"] = rate_limit_store.description
        degraded = degraded or not body["ratelimit"].get("healthy", True)
    if broker.governor is not None:
        body["budgets"] = broker.governor.store.description
        degraded = degraded or not body["budgets"].get("healthy", True)
    if degraded:
        body["status"] = "degraded"
    if not accepting:
        body["status"] = "shutting_down"
    return body


def status_document(
    health: dict, metrics: GatewayMetrics, rate_limit_store: Any, config_source: str, last_reload: dict | None
) -> dict:
    """What C{GET /status.json} answers: C{health} with each endpoint's last 60 s, the stores and the events."""
    body = health
    recent = metrics.recent
    for name, service in body["services"].items():
        for endpoint in service["endpoints"]:
            endpoint.update(recent.summary(name, endpoint["url"]))
        service["last_60s"] = recent.series(name, {endpoint["url"]: endpoint["circuit"] for endpoint in service["endpoints"]})
    for name, model in body.get("models", {}).items():
        # Circuits are the services' (their charts show the band): a model's window has none of its own.
        model["last_60s"] = metrics.recent_models.series(name, {"": "closed"})
    stores = []
    if rate_limit_store is not None:
        stores.append({"name": "rate limit", **_store_health(rate_limit_store.description)})
    if "cache" in body:
        stores.append({"name": "cache", **body["cache"]})
    if "budgets" in body:
        stores.append({"name": "budgets", **_store_health(body["budgets"])})
        refusals = sum(sum(metrics.recent_refusals.series(reason)) for reason in metrics.recent_refusals.names())
        body["governance"] = {
            "refusals_last_minute": refusals,
            "tokens_per_second": {model: metrics.recent_tokens.series(model) for model in metrics.recent_tokens.names()},
            "top_end_users_last_hour": [
                {"key": key, "end_user": end_user, "cost_usd": _usd(cost), "tokens": tokens, "requests": requests}
                for key, end_user, cost, tokens, requests in metrics.recent_spenders.top(TOP_SPENDERS_SHOWN)
            ],
        }
    body["stores"] = stores
    body["events"] = metrics.events.recent()
    body["config"] = config_source
    body["last_reload"] = last_reload
    return body


def _usd(nano: int) -> float:
    return round(nano / NANO_PER_USD, 9)


def _quota(quota: Any) -> dict | None:
    if quota is None:
        return None
    return {"limit": quota.limit, "remaining": quota.remaining, "used": quota.used, "reset_s": round(quota.reset, 3)}


def spend_document(report: SpendReport, governor: Governor) -> dict:
    """
    What C{GET /spend.json} answers: each key's and team's spend and
    remaining budget in its current period, spend per model per day, and
    the end users who spent the most over those days.
    """
    scopes = {spend.scope: spend for spend in report.scopes}
    keys, teams = {}, {}
    worst = governor.worst_cases
    for key in governor.keys.values():
        keys[key.name] = _scope_document(scopes.get("key:" + key.name), key.budget_usd, key.budget_period, worst.get("key:" + key.name))
        keys[key.name]["team"] = key.team
        keys[key.name]["max_parallel"] = key.max_parallel
        if key.limits_users:
            keys[key.name]["per_end_user"] = {
                "budget_usd": key.user_budget_usd,
                "tokens_per_minute": key.user_tokens_per_minute,
                "requests_per_minute": key.user_requests_per_minute,
            }
    for team in governor.teams.values():
        teams[team.name] = _scope_document(
            scopes.get("team:" + team.name), team.budget_usd, team.budget_period, worst.get("team:" + team.name),
        )
    models: dict[tuple[str, str], list[int]] = {}
    for day, _key, _team, model, prompt, completion, cost, requests in report.days:
        add_counts(models, (day, model), (prompt, completion, cost, requests))
    return {
        "keys": keys,
        "teams": teams,
        "models_by_day": [
            {"day": day, "model": model, "prompt_tokens": p, "completion_tokens": c, "cost_usd": _usd(n), "requests": r}
            for (day, model), (p, c, n, r) in sorted(models.items())
        ],
        "by_day": [
            {"day": row[0], "key": row[1], "team": row[2] or None, "model": row[3], "prompt_tokens": row[4],
             "completion_tokens": row[5], "cost_usd": _usd(row[6]), "requests": row[7]}
            for row in report.days
        ],
        "end_users": [
            {"key": key, "end_user": end_user, "prompt_tokens": prompt, "completion_tokens": completion,
             "cost_usd": _usd(cost), "requests": requests}
            for key, end_user, prompt, completion, cost, requests in report.end_users
        ],
    }


def end_user_document(report: SpendReport, key: ApiKey, end_user: str) -> dict:
    """
    What C{GET /spend.json?key=NAME&end_user=ID} adds: C{end_user}'s own
    allowance within C{key} (its spend, what is left, its quotas now).
    """
    found = report.scopes[-1] if report.scopes else None
    document = _scope_document(found, key.user_budget_usd, key.budget_period)
    return {"key": key.name, "end_user": end_user, "limited": key.limits_users, **document}


def _scope_document(spend: ScopeSpend | None, budget_usd: float | None, period: str, worst_case: int | None = None) -> dict:
    """
    One scope's spend and limits; with C{worst_case} (the last request's,
    in nano-dollars), C{next_request_usd} and C{short}: whether what is
    left pays for another such request.
    """
    spent = spend.spent_nano if spend is not None else 0
    reserved = spend.reserved_nano if spend is not None else 0
    remaining = None
    extra = {}
    if budget_usd is not None:
        remaining = max(0.0, round(budget_usd - (spent + reserved) / NANO_PER_USD, 9))
        if worst_case is not None:
            extra = {"next_request_usd": _usd(worst_case), "short": remaining < _usd(worst_case)}
    return {**extra, 
        "budget_usd": budget_usd,
        "budget_period": period,
        "period": spend.period if spend is not None else None,
        "spent_usd": _usd(spent),
        "reserved_usd": _usd(reserved),
        "remaining_usd": remaining,
        "in_flight": spend.parallel if spend is not None else 0,
        "tokens_per_minute": _quota(spend.tokens) if spend is not None else None,
        "requests_per_minute": _quota(spend.requests) if spend is not None else None,
    }
