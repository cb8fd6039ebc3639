"""
One daemon's view from its workers' views: the Prometheus expositions and
the C{/health} documents of every worker, merged.  Pure: text and dicts in,
text and dicts out.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from txgateway.admin.documents import circuit_of

__all__ = ["merge_expositions", "merge_health"]

#: Families whose samples add up across workers; every other (gauges) is labelled by worker.
_SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

_WORST = {"ok": 0, "degraded": 1, "shutting_down": 2}
_CIRCUIT_ORDER = {"closed": 0, "half_open": 1, "open": 2}


class _Families:
    """Already-built families, handed to C{generate_latest} as a collector."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(expositions: Iterable[tuple[int, str]], extra: Iterable[Metric] = ()) -> bytes:
    """
    The exposition of one daemon from C{(worker, text)} pairs: counters,
    histograms and summaries summed over workers (same name and labels),
    gauges kept per worker with a C{worker} label; then C{extra} families
    (the supervisor's own).
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple, list]] = {}
    for worker, text in expositions:
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            if family.type in _SUMMED:
                by_labels = sums[family.name]
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    held = by_labels.get(key)
                    if held is None:
                        by_labels[key] = [sample.name, dict(sample.labels), sample.value]
                    else:
                        held[2] += sample.value
            else:
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "worker": str(worker)}, sample.value)
    for name, by_labels in sums.items():
        for sample_name, labels, value in by_labels.values():
            merged[name].add_sample(sample_name, labels, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), *extra]))
    return generate_latest(registry)


def _merge_endpoint(endpoints: list[dict]) -> dict:
    """One endpoint as every worker sees it: the most open circuit, the most failures, the soonest trial, all in flight."""
    circuit = max((endpoint["circuit"] for endpoint in endpoints), key=_CIRCUIT_ORDER.__getitem__)
    same = [endpoint for endpoint in endpoints if endpoint["circuit"] == circuit]
    trials = [endpoint["trial_in_s"] for endpoint in same if endpoint.get("trial_in_s") is not None]
    return {
        **endpoints[0],
        "circuit": circuit,
        "consecutive_failures": max(endpoint["consecutive_failures"] for endpoint in same),
        "trial_in_s": min(trials) if trials else None,
        "in_flight": sum(endpoint.get("in_flight", 0) for endpoint in endpoints),
    }


def merge_health(documents: list[dict], uptime: float) -> dict:
    """
    One C{/health} document from every worker's: each endpoint's circuit
    is the most open any worker holds, the stores are healthy when healthy
    in every worker, the status is the worst, the uptime the daemon's.
    """
    first = documents[0]
    body = {**first, "uptime_s": round(uptime, 3)}
    services = {}
    for name, service in first["services"].items():
        views = [document["services"][name] for document in documents if name in document.get("services", {})]
        endpoints = []
        for position, endpoint in enumerate(service["endpoints"]):
            endpoints.append(_merge_endpoint([
                view["endpoints"][position] for view in views
                if position < len(view["endpoints"]) and view["endpoints"][position]["url"] == endpoint["url"]
            ]))
        circuit = circuit_of(endpoint["circuit"] for endpoint in endpoints)
        same = [endpoint for endpoint in endpoints if endpoint["circuit"] == circuit]
        trials = [endpoint["trial_in_s"] for endpoint in same if endpoint["trial_in_s"] is not None]
        services[name] = {
            **service,
            "circuit": circuit,
            "consecutive_failures": min(endpoint["consecutive_failures"] for endpoint in same),
            "trial_in_s": min(trials) if trials else None,
            "endpoints": endpoints,
        }
    body["services"] = services
    if "models" in first:
        models = {}
        for name, model in first["models"].items():
            targets = []
            for position, target in enumerate(model["targets"]):
                states = [
                    document["models"][name]["targets"][position]["circuit"]
                    for document in documents
                    if name in document.get("models", {}) and position < len(document["models"][name]["targets"])
                ]
                targets.append({**target, "circuit": max(states, key=_CIRCUIT_ORDER.__getitem__)})
            models[name] = {**model, "targets": targets}
        body["models"] = models
    for part in ("cache", "ratelimit", "budgets"):
        if part in first:
            healthy = all(document.get(part, {}).get("healthy", True) for document in documents)
            body[part] = {**first[part], "healthy": healthy}
    body["status"] = max((document["status"] for document in documents), key=lambda status: _WORST.get(status, 1))
    if body["status"] == "ok" and any(
        endpoint["circuit"] != "closed" for service in services.values() for endpoint in service["endpoints"]
    ):
        body["status"] = "degraded"
    return body
