"""
The models of C{[model:NAME]} sections: each target of a model is a
I{deployment}, a service's endpoints with the model name sent to them and
breakers of their own, so that one model failing never opens the circuit
for another model on the same backend.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from txgateway.config.gateway import ANY_MODEL, MODEL_NAME, ModelConfig, ServiceConfig
from txgateway.resilience.breaker import CircuitBreaker
from txgateway.routing.model import Backend, ServiceRoute, Target

__all__ = ["ModelTable"]

#: Deployments made for models only C{[model:*]} names (the client's own
#: model name sent on) are kept up to this many; beyond, healthy ones go.
MAX_OPEN_DEPLOYMENTS = 1024

#: Makes a deployment's breaker: (service, endpoint URL, model).
BreakerFactory = Callable[[ServiceConfig, str, str], CircuitBreaker]


class ModelTable:
    """
    The configured models and their deployments.

    @param previous: the table before a reload: a deployment whose service,
        model and endpoint are unchanged keeps its breaker, with its state.
    """

    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        routes: Mapping[str, ServiceRoute],
        make_breaker: BreakerFactory,
        previous: "ModelTable | None" = None,
    ) -> None:
        self.models = dict(models)
        self._routes = routes
        self._make_breaker = make_breaker
        self._deployments: dict[tuple[str, str], ServiceRoute] = {}
        before = previous._deployments if previous is not None else {}
        for model in self.models.values():
            for target in model.targets:
                if target.model is not None:
                    self._deployment(target.service, target.model, before.get((target.service, target.model)))
        #: The targets of each model whose every target names the model it is sent (their deployments are
        #: never forgotten): made once, not a list and its targets a request.
        self._fixed_targets: dict[str, tuple[Target, ...]] = {
            name: tuple(Target(self._deployments[target.service, target.model], target.model) for target in model.targets)
            for name, model in self.models.items()
            if name != ANY_MODEL and all(target.model is not None for target in model.targets)
        }

    def names(self) -> list[str]:
        """The models clients may name, in configuration order (without C{*})."""
        return [name for name in self.models if name != ANY_MODEL]

    def targets_for(self, asked: str) -> Sequence[Target] | None:
        """
        The targets of the model C{asked}, primary first, or L{None} when
        no section (not even C{[model:*]}) routes it.
        """
        fixed = self._fixed_targets.get(asked)
        if fixed is not None:
            return fixed
        model = self.models.get(asked)
        if model is None:
            model = self.models.get(ANY_MODEL)
            if model is None or not MODEL_NAME.match(asked):
                return None
        return [
            Target(self._deployment(target.service, target.model_for(asked)), target.model_for(asked))
            for target in model.targets
        ]

    def _deployment(self, service: str, model: str, before: ServiceRoute | None = None) -> ServiceRoute:
        """The deployment of C{model} on C{service}, made now if need be (keeping C{before}'s breakers)."""
        key = (service, model)
        route = self._deployments.get(key)
        if route is not None:
            return route
        serving = self._routes[service]
        kept = {endpoint.url: endpoint for endpoint in before.endpoints} if before is not None else {}
        endpoints = []
        for endpoint in serving.endpoints:
            mine = kept.get(endpoint.url)
            if mine is not None:
                mine.breaker.retune(serving.config.breaker_threshold, serving.config.breaker_cooldown)
                mine.upstream = endpoint.upstream
            else:
                mine = Backend(endpoint.url, endpoint.upstream, self._make_breaker(serving.config, endpoint.url, model))
            endpoints.append(mine)
        if len(self._deployments) >= MAX_OPEN_DEPLOYMENTS:
            self._forget_healthy()
        route = self._deployments[key] = ServiceRoute(config=serving.config, endpoints=endpoints)
        return route

    def _forget_healthy(self) -> None:
        """Drop the oldest half of the deployments of C{[model:*]} whose circuits are closed and idle."""
        fixed = self._fixed_keys()
        forgettable = [
            key for key, route in self._deployments.items()
            if key not in fixed and route.in_flight == 0 and all(e.breaker.status().state == "closed" for e in route.endpoints)
        ]
        for key in forgettable[: max(1, len(forgettable) // 2)]:
            for endpoint in self._deployments.pop(key).endpoints:
                endpoint.breaker.stop()

    def deployments(self) -> list[ServiceRoute]:
        """Every deployment made so far."""
        return list(self._deployments.values())

    def circuits(self) -> list[tuple[str, str, str]]:
        """Each deployment endpoint's circuit (service, "URL model=NAME", state), for metrics."""
        return [
            (service, f"{endpoint.url} model={model}", endpoint.breaker.status().state)
            for (service, model), route in self._deployments.items()
            for endpoint in route.endpoints
        ]

    def target_states(self) -> dict[str, list[dict]]:
        """Each model's targets: their service, model and their endpoints' circuit states."""
        models = {}
        fixed = self._fixed_keys()
        for name, model in self.models.items():
            targets = []
            for target in model.targets:
                if target.model is not None:
                    routes = [self._deployments[(target.service, target.model)]]
                else:
                    # The client's own model names: every deployment made for them.
                    routes = [
                        route for key, route in self._deployments.items() if key[0] == target.service and key not in fixed
                    ]
                targets.append({
                    "service": target.service,
                    "model": target.model if target.model is not None else ANY_MODEL,
                    "states": [endpoint.breaker.status().state for route in routes for endpoint in route.endpoints],
                })
            models[name] = targets
        return models

    def _fixed_keys(self) -> set[tuple[str, str]]:
        return {(t.service, t.model) for m in self.models.values() for t in m.targets if t.model is not None}

