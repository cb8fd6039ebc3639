"""
The operator's surfaces to operators only: C{/metrics} and the detail of
C{/health} follow C{[status] allow} like C{/status}; a request forwarded by
a proxy the gateway was not told of is never local; no configuration error
echoes a credential.
"""

from __future__ import annotations

import json

import pytest
import treq
from treq.client import HTTPClient
from treq.testing import _SynchronousProducer

from tests.fakes import SERVICE_INI, DataPlaneAgent, Harness, result_of
from txgateway.config.gateway import ConfigError, parse_config

GOVERNED = SERVICE_INI + """
[key:alice]
secret = alice-secret
budget_usd = 5
"""


def from_peer(h: Harness, peer: str, path: str, headers: dict | None = None):
    agent = DataPlaneAgent(h.server_factory, peer=peer)
    client = HTTPClient(agent, data_to_body_producer=_SynchronousProducer)
    d = client.request("GET", "http://gateway.test" + path, headers=headers)
    agent.flush()
    response = result_of(d)
    body = treq.content(response)
    agent.flush()
    return response.code, result_of(body)


@pytest.mark.parametrize("path", ["/metrics", "/status", "/status.json", "/spend.json"])
def test_the_operators_documents_are_not_found_from_outside_status_allow(path):
    h = Harness(GOVERNED)
    assert from_peer(h, "10.1.2.3", path)[0] == 404
    assert from_peer(h, "127.0.0.1", path)[0] == 200


def test_health_from_outside_status_allow_says_its_status_and_nothing_else():
    h = Harness(GOVERNED)
    code, body = from_peer(h, "10.1.2.3", "/health")
    assert code == 200 and json.loads(body) == {"status": "ok"}
    code, body = from_peer(h, "127.0.0.1", "/health")
    assert "services" in json.loads(body) and "budgets" in json.loads(body)


@pytest.mark.parametrize("header", [{"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}])
@pytest.mark.parametrize("path", ["/metrics", "/status.json", "/spend.json"])
def test_a_request_forwarded_by_an_untrusted_local_proxy_is_not_local(path, header):
    h = Harness(GOVERNED)
    assert from_peer(h, "127.0.0.1", path, header)[0] == 404


def test_a_request_forwarded_by_a_trusted_proxy_is_judged_by_its_client():
    h = Harness(GOVERNED.replace("[ratelimit]", "[ratelimit]\ntrusted_proxies = 127.0.0.1/32"))
    assert from_peer(h, "127.0.0.1", "/metrics", {"X-Forwarded-For": "127.0.0.5"})[0] == 200
    assert from_peer(h, "127.0.0.1", "/metrics", {"X-Forwarded-For": "203.0.113.9"})[0] == 404


def test_the_live_and_ready_probes_answer_anyone():
    h = Harness(GOVERNED)
    assert from_peer(h, "10.1.2.3", "/health/live")[0] == 200
    assert from_peer(h, "10.1.2.3", "/health/ready", {"X-Forwarded-For": "203.0.113.9"})[0] == 200


def test_a_configuration_error_never_echoes_a_urls_password():
    with pytest.raises(ConfigError) as raised:
        parse_config("[service:a]\nurl = http://user:hunter2@backend:99999/x\n", "gateway.ini", {})
    assert "hunter2" not in str(raised.value) and "user:***@" in str(raised.value)


def test_the_root_says_what_is_served_here_to_a_probe():
    h = Harness(SERVICE_INI)
    for method in ("GET", "HEAD"):
        response = result_of(h.request(method, "/"))
        assert response.code == 200
    body = json.loads(result_of(treq.content(result_of(h.request("GET", "/")))))
    assert body["name"] == "txgateway" and "/v1/messages" in body["apis"]["anthropic"]
