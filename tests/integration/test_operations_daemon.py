"""Metrics, trace context and API keys through the running daemon."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_daemon import ini_for

pytestmark = pytest.mark.integration

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def gateway(start_gateway, backend):
    return start_gateway(ini_for(backend.url) + "[auth]\nkeys = ops:ops-secret-1\n")


def test_api_keys_trace_context_and_metrics(gateway):
    assert gateway.request("GET", "/api/data/echo").status == 401
    assert gateway.request("GET", "/health").status == 200
    answer = gateway.request("GET", "/api/data/echo", headers={
        "Authorization": "Bearer ops-secret-1", "traceparent": f"00-{TRACE}-b7ad6b7169203331-01", "X-Request-ID": "ops-1",
    })
    assert answer.status == 200
    echoed = answer.json()["headers"]
    assert "authorization" not in echoed
    assert echoed["traceparent"][0].startswith(f"00-{TRACE}-")
    assert not echoed["traceparent"][0].startswith(f"00-{TRACE}-b7ad6b7169203331")
    lines = gateway.story("ops-1")
    assert lines and all(e["trace_id"] == TRACE and e["api_key_name"] == "ops" for e in lines)
    assert "ops-secret-1" not in gateway.log_file.read_text()

    metrics = gateway.request("GET", "/metrics")
    assert metrics.status == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
    assert {"txgateway_requests", "txgateway_request_duration_seconds", "txgateway_upstream_duration_seconds",
            "txgateway_upstream_attempts", "txgateway_retries", "txgateway_circuit_state",
            "txgateway_circuit_transitions", "txgateway_rate_limited", "txgateway_in_flight_requests",
            "txgateway_ratelimit_store_healthy"} <= set(families)
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["txgateway_requests"].samples if s.name.endswith("_total")}
    assert requests[(("method", "GET"), ("service", "data"), ("status_class", "2xx"))] == 1
    assert requests[(("method", "GET"), ("service", "none"), ("status_class", "4xx"))] == 1
