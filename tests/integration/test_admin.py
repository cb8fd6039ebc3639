"""
The admin API through the running daemon: keys and teams made, changed,
disabled, rotated and deleted at run time, served by every worker (SQLite)
and by every gateway sharing Redis within a second (measured); bad input
answered 400 naming its field; credentials checked; the audit trail; a
restart; C{[admin] listen}; and the admin page in headless Chromium.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.conftest import DAEMON_HEAD, request, wait_until
from tests.integration.test_governance import backend, redis  # noqa: F401 - the fixtures

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer root-secret", "Content-Type": "application/json"}




def admin_ini(url: str, more: str = "", workers: int = 2) -> str:
    return DAEMON_HEAD.replace("[gateway]", f"[gateway]\nworkers = {workers}") + f"""
[service:cloud]
url = {url}
retries = 0
[model:plain]
targets = cloud:plain-model
[price:*]
prompt = 1
completion = 1
[auth]
keys = caller:caller-secret
[admin]
keys = root:root-secret
{more}"""


def admin(gateway, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    return request(gateway.port, method, "/admin" + path, body=data, headers=ADMIN if headers is None else headers)


def call(port: int, secret: str) -> tuple[int, str | None]:
    body = json.dumps({"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).encode()
    answer = request(port, "POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    return answer.status, answer.error["type"] if answer.status >= 400 else None


def every_connection(port: int, secret: str, count: int = 12) -> set:
    """What C{count} new connections (spread over the workers by the kernel) are answered."""
    return {call(port, secret) for _ in range(count)}


def within(predicate, seconds: float) -> float:
    """How long until C{predicate} held (failing past C{seconds})."""
    started = time.monotonic()
    wait_until(predicate, timeout=seconds)
    return time.monotonic() - started


def test_a_key_made_at_run_time_is_served_by_every_worker_and_disabled_everywhere_within_a_second(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url))
    made = admin(gateway, "POST", "/keys", {"name": "alice", "models": ["plain"], "budget_usd": 5})
    assert made.status == 201, made.body
    secret = made.json()["secret"]
    assert secret.startswith("sk-gw-") and made.json()["source"] == "admin"
    took = within(lambda: every_connection(gateway.port, secret) == {(200, None)}, 1.0)
    assert took < 1.0
    assert admin(gateway, "PATCH", "/keys/alice", {"disabled": True}).status == 200
    took = within(lambda: every_connection(gateway.port, secret) == {(403, "key_disabled")}, 1.0)
    assert took < 1.0
    assert admin(gateway, "PATCH", "/keys/alice", {"disabled": False}).status == 200
    wait_until(lambda: every_connection(gateway.port, secret) == {(200, None)}, timeout=1.0)
    assert admin(gateway, "DELETE", "/keys/alice").status == 200
    wait_until(lambda: every_connection(gateway.port, secret) == {(401, "unauthorized")}, timeout=1.0)


def test_two_gateways_sharing_redis_serve_a_change_made_on_either_within_a_second(start_gateway, backend, redis):
    ini = admin_ini(backend.url, f"[budgets]\nstore = redis\nredis_url = {redis.url}\n", workers=1)
    first, second = start_gateway(ini), start_gateway(ini)
    made = admin(first, "POST", "/keys", {"name": "bob", "budget_usd": 5})
    assert made.status == 201, made.body
    secret = made.json()["secret"]
    assert within(lambda: call(second.port, secret) == (200, None), 1.0) < 1.0
    assert admin(second, "PATCH", "/keys/bob", {"disabled": True}).status == 200
    assert within(lambda: call(first.port, secret) == (403, "key_disabled"), 1.0) < 1.0
    # Both list it, from the one store.
    assert [key["name"] for key in admin(first, "GET", "/keys").json()["keys"]] == ["caller", "bob"]


def test_rotation_keeps_the_old_secret_for_the_grace_it_says(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    old = admin(gateway, "POST", "/keys", {"name": "carol"}).json()["secret"]
    rotated = admin(gateway, "POST", "/keys/carol/rotate", {"grace_seconds": 2})
    assert rotated.status == 200
    new = rotated.json()["secret"]
    assert rotated.json()["grace_seconds"] == 2 and rotated.json()["previous_secret_valid_until"] > time.time()
    assert call(gateway.port, new) == (200, None) and call(gateway.port, old) == (200, None)
    wait_until(lambda: call(gateway.port, old) == (401, "unauthorized"), timeout=4.0)
    assert call(gateway.port, new) == (200, None)
    # No grace: the old secret is refused at once.
    newest = admin(gateway, "POST", "/keys/carol/rotate", {"grace_seconds": 0}).json()["secret"]
    assert call(gateway.port, new) == (401, "unauthorized") and call(gateway.port, newest) == (200, None)


def test_a_budget_set_at_run_time_governs_the_key(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    secret = admin(gateway, "POST", "/keys", {"name": "dave", "budget_usd": 0.000001, "budget_period": "day"}).json()["secret"]
    assert call(gateway.port, secret) == (429, "budget_exceeded")
    assert admin(gateway, "PATCH", "/keys/dave", {"budget_usd": 1}).status == 200
    assert call(gateway.port, secret) == (200, None)
    wait_until(lambda: admin(gateway, "GET", "/spend").json()["keys"]["dave"]["spent_usd"] > 0)


def test_teams_are_made_used_and_kept_while_a_key_names_them(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    assert admin(gateway, "POST", "/teams", {"name": "ml", "budget_usd": 10}).status == 201
    assert admin(gateway, "POST", "/keys", {"name": "erin", "team": "ml"}).status == 201
    refused = admin(gateway, "DELETE", "/teams/ml")
    assert refused.status == 409 and refused.error["type"] == "conflict" and "erin" in refused.error["message"]
    assert admin(gateway, "PATCH", "/teams/ml", {"tokens_per_minute": 1000}).json()["tokens_per_minute"] == 1000
    assert admin(gateway, "GET", "/teams/ml").json()["budget_usd"] == 10
    assert admin(gateway, "DELETE", "/keys/erin").status == 200
    assert admin(gateway, "DELETE", "/teams/ml").status == 200
    assert admin(gateway, "GET", "/teams/ml").status == 404


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "colour": "red"}, "colour"),
    ({"name": "x", "budget_usd": -1}, "budget_usd"),
    ({"name": "x", "team": "nope"}, "team"),
    ({"name": "x", "tokens_per_minute": "many"}, "tokens_per_minute"),
    ({"name": "x", "budget_period": "fortnight"}, "budget_period"),
    ({"name": "no spaces"}, "name"),
    ({}, "name"),
])
def test_bad_admin_input_is_answered_400_naming_the_field(start_gateway, backend, body, field):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    answer = admin(gateway, "POST", "/keys", body)
    assert answer.status == 400 and answer.error["type"] == "bad_request"
    assert answer.error["message"].startswith(f"{field}: ")


def test_credentials_conflicts_and_read_only_keys(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    nobody = admin(gateway, "GET", "/keys", headers={})
    assert nobody.status == 401 and nobody.error["type"] == "unauthorized"
    caller = admin(gateway, "GET", "/keys", headers={"Authorization": "Bearer caller-secret"})
    assert caller.status == 403 and caller.error["type"] == "forbidden"
    listed = admin(gateway, "GET", "/keys").json()["keys"]
    assert listed == [dict(listed[0], name="caller", source="gateway.ini", read_only=True)]
    assert admin(gateway, "PATCH", "/keys/caller", {"budget_usd": 1}).status == 409
    assert admin(gateway, "POST", "/keys", {"name": "caller"}).status == 409
    assert admin(gateway, "POST", "/keys", {"name": "frank"}).status == 201
    assert admin(gateway, "POST", "/keys", {"name": "frank"}).status == 409
    assert admin(gateway, "GET", "/keys/nobody").status == 404
    not_json = request(gateway.port, "POST", "/admin/keys", body=b"{", headers=ADMIN)
    assert not_json.status == 400 and not_json.error["type"] == "bad_request"


def test_every_change_is_in_the_audit_trail_and_no_secret_anywhere(start_gateway, backend):
    gateway = start_gateway(admin_ini(backend.url, workers=1))
    secret = admin(gateway, "POST", "/keys", {"name": "gina", "budget_usd": 1}).json()["secret"]
    admin(gateway, "PATCH", "/keys/gina", {"budget_usd": 2})
    rotated = admin(gateway, "POST", "/keys/gina/rotate", {}).json()["secret"]
    admin(gateway, "DELETE", "/keys/gina")
    entries = admin(gateway, "GET", "/audit").json()["entries"]
    assert [(entry["action"], entry["actor"], entry["name"]) for entry in entries] == [
        ("delete", "root", "gina"), ("rotate", "root", "gina"), ("change", "root", "gina"), ("create", "root", "gina"),
    ]
    change = entries[2]
    assert change["before"]["budget_usd"] == 1 and change["after"]["budget_usd"] == 2 and change["time"] > 0
    everything = json.dumps(entries) + gateway.log_file.read_text()
    assert secret not in everything and rotated not in everything and "secret_sha256" not in everything
    assert len(gateway.logged("admin_changed")) == 4
    assert admin(gateway, "GET", "/audit?limit=0").status == 400


def test_keys_made_at_run_time_survive_a_restart(start_gateway, backend, tmp_path):
    ini = admin_ini(backend.url, f"[budgets]\nstate_file = {tmp_path / 'state.db'}\n", workers=1)
    gateway = start_gateway(ini)
    secret = admin(gateway, "POST", "/keys", {"name": "hal"}).json()["secret"]
    gateway.stop()
    again = start_gateway(ini)
    assert call(again.port, secret) == (200, None)


def test_the_admin_api_on_an_address_of_its_own(start_gateway, backend):
    from tests.integration.conftest import free_port

    port = free_port()
    gateway = start_gateway(admin_ini(backend.url, workers=1).replace(
        "keys = root:root-secret", f"keys = root:root-secret\nlisten = tcp:{port}:interface=127.0.0.1"))
    assert request(gateway.port, "GET", "/admin/keys", headers=ADMIN).status == 404
    made = request(port, "POST", "/admin/keys", body=json.dumps({"name": "ivy"}).encode(), headers=ADMIN)
    assert made.status == 201
    assert call(gateway.port, made.json()["secret"]) == (200, None)
    assert request(port, "GET", "/v1/models").status == 404  # only the admin API listens there


def test_the_admin_page_lists_keys_teams_and_the_audit_trail_in_chromium(start_gateway, backend, tmp_path):
    from tests.integration.test_status_page import render

    gateway = start_gateway(admin_ini(backend.url, workers=1))
    admin(gateway, "POST", "/teams", {"name": "ml", "budget_usd": 10})
    admin(gateway, "POST", "/keys", {"name": "jo", "team": "ml", "budget_usd": 2, "models": ["plain"]})
    admin(gateway, "PATCH", "/keys/jo", {"disabled": True})
    url = f"http://127.0.0.1:{gateway.port}/admin/#key=root-secret"
    page = render(url, tmp_path)
    assert 'data-loaded="1"' in page or 'data-loaded="2"' in page, page[-2000:]
    row = page.split('data-key="jo"', 1)[1].split("</tr>", 1)[0]
    assert "disabled" in row and "$2.0000" in row and "enable</button>" in row
    assert 'data-key="caller"' in page and "change it in gateway.ini" in page
    assert 'data-team="ml"' in page and 'data-audit="create"' in page
    assert "root-secret" not in page  # the key from the fragment is not left in the page
    render(url, tmp_path, screenshot=tmp_path / "admin.png")
    assert (tmp_path / "admin.png").stat().st_size > 10_000
