"""
The operator's JSON documents: what C{GET /health} and C{GET /status.json}
answer, built from the broker's routes, the models' deployments, the
stores and the recent window.
"""

from __future__ import annotations

from typing import Any, Iterable

from txgateway.observability.metrics import GatewayMetrics
from txgateway.routing.broker import ServiceBroker
from txgateway.routing.model import ServiceRoute

__all__ = ["circuit_of", "health_document", "status_document"]


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
    stores = []
    if rate_limit_store is not None:
        stores.append({"name": "rate limit", **_store_health(rate_limit_store.description)})
    if "cache" in body:
        stores.append({"name": "cache", **body["cache"]})
    body["stores"] = stores
    body["events"] = metrics.events.recent()
    body["config"] = config_source
    body["last_reload"] = last_reload
    return body
