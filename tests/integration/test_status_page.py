"""
The status page in a real browser: headless Chromium (Debian's chromium)
loads /status from the running daemon, runs its script, and the rendered
page is read back.
"""

from __future__ import annotations

import json
import os
import time
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend, wait_until

pytestmark = pytest.mark.integration


def chromium_binary() -> str:
    """Debian's chromium, installed when missing (as CI does), or a clear failure."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("no chromium: install Debian's chromium package (apt-get install chromium); .ci/run does")
    return found


def render(url: str, workdir: Path, budget_ms: int = 3000, screenshot: Path | None = None) -> str:
    """The page's DOM once its script ran for C{budget_ms} of virtual time (or a screenshot of it)."""
    argv = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={workdir / 'chromium-profile'}", f"--virtual-time-budget={budget_ms}",
        "--window-size=1280,900",
    ]
    argv += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=90)
    return done.stdout


def status_ini(healthy: str, doomed: str) -> str:
    return DAEMON_HEAD + f"""[service:steady]
url = {healthy}
[service:doomed]
url = {doomed}
retries = 0
breaker_threshold = 2
breaker_cooldown = 300
"""


def test_the_page_shows_every_service_and_an_open_circuit_after_failures(start_gateway, fresh_backend, tmp_path):
    doomed = Backend(tmp_path)
    gateway = start_gateway(status_ini(fresh_backend.url, doomed.url))
    url = f"http://127.0.0.1:{gateway.port}/status"
    page = render(url, tmp_path, budget_ms=5000)
    assert 'data-service="steady"' in page and 'data-service="doomed"' in page
    assert 'class="circuit open"' not in page
    # The script refreshed the page from /status.json more than once (every 2 s).
    refreshes = int(page.split('data-refreshes="', 1)[1].split('"', 1)[0])
    assert refreshes >= 2
    doomed.process.stop()
    for _ in range(2):
        assert gateway.request("GET", "/api/doomed/echo").status == 502
    wait_until(lambda: gateway.request("GET", "/health").json()["services"]["doomed"]["circuit"] == "open")
    page = render(url, tmp_path)
    doomed_section = page.split('data-service="doomed"', 1)[1].split("<table", 2)
    assert 'class="circuit open">open<' in doomed_section[0] + doomed_section[1]
    steady_section = page.split('data-service="steady"', 1)[1].split("<table", 1)[0]
    assert 'class="circuit closed">closed<' in steady_section
    assert "<td>circuit</td><td>doomed http://127.0.0.1" in page  # the transition, in the events table


def test_the_page_is_not_shown_to_other_networks(start_gateway, fresh_backend, tmp_path):
    gateway = start_gateway(status_ini(fresh_backend.url, fresh_backend.url) + "[status]\nallow = 10.0.0.0/8\n")
    answer = gateway.request("GET", "/status")
    assert answer.status == 404 and answer.error["type"] == "not_found"
    assert gateway.request("GET", "/status.json").status == 404


def test_the_page_shows_budgets_as_bars_refusals_and_tokens_per_model(start_gateway, tmp_path):
    from tests.integration.test_governance import call, governed
    from tests.integration.test_openai_sdk import OpenAIBackend

    backend = OpenAIBackend(tmp_path)
    try:
        # $1 a million tokens: each call settles 1 + 60 tokens, 0.000061 of a 0.0002 budget.
        gateway = start_gateway(governed(backend.url, "budget_usd = 0.0002\nbudget_period = day"))
        assert call(gateway.port, "plain", stream=False) == (200, None)
        assert call(gateway.port, "plain", stream=False) == (200, None)
        assert call(gateway.port, "plain", stream=False)[1] == "budget_exceeded"  # 0.000122 + a reservation of 0.000106
        spent = gateway.request("GET", "/spend.json").json()["keys"]["team"]
        assert spent["spent_usd"] == pytest.approx(2 * 61e-6) and spent["budget_usd"] == 0.0002
        page = render(f"http://127.0.0.1:{gateway.port}/status", tmp_path)
        row = page.split('data-key="team"', 1)[1].split("</tr>", 1)[0]
        assert 'class="bar"' in row and 'style="width:61.0%"' in row and "$0.0001" in row
        # 61 % spent, yet what is left does not pay for its next request: red, and it says why.
        assert 'class="full"' in row and "short: its next request may cost $0.0001" in row
        assert '<b id="refusals">1</b>' in page
        assert 'data-model="plain-model"' in page and "<polyline" in page.split('data-model="plain-model"', 1)[1]
        # The model's own minute: three requests (the refused one too), none a 5xx.
        window = gateway.request("GET", "/status.json").json()["models"]["plain"]["last_60s"]
        assert sum(window["requests_per_s"]) == 3 and not any(window["error_rate"]) and any(window["p99_ms"])
        charts = page.split('data-model-charts="plain"', 1)[1].split("</div>", 1)[0]
        assert charts.count("<polyline") == 3 and 'data-points="60"' in charts
    finally:
        backend.process.stop()


def test_the_page_shows_the_top_spenders_of_the_last_hour_across_workers(start_gateway, tmp_path):
    from tests.integration.test_governance import HEADERS, governed
    from tests.integration.test_openai_sdk import OpenAIBackend
    from tests.integration.conftest import request

    backend = OpenAIBackend(tmp_path)
    try:
        gateway = start_gateway(governed(backend.url, "budget_usd = 1").replace("[gateway]", "[gateway]\nworkers = 2"))
        calls = {"ada": 3, "<b>bob</b>": 2, "cy": 1}
        for user, count in calls.items():
            body = json.dumps({"model": "plain", "messages": [{"role": "user", "content": "hi"}], "user": user}).encode()
            for _ in range(count):
                # A new connection each: the workers share them, so both count some.
                assert request(gateway.port, "POST", "/v1/chat/completions", body=body, headers=HEADERS).status == 200
        wait_until(lambda: len(gateway.request("GET", "/status.json").json()["governance"]["top_end_users_last_hour"]) == 3)
        top = gateway.request("GET", "/status.json").json()["governance"]["top_end_users_last_hour"]
        assert [(row["end_user"], row["requests"]) for row in top] == [("ada", 3), ("<b>bob</b>", 2), ("cy", 1)]
        page = render(f"http://127.0.0.1:{gateway.port}/status", tmp_path)
        table = page.split("Top spenders, last hour", 1)[1].split("</table>", 1)[0]
        rows = [row.split('"', 1)[0] for row in table.split('data-end-user="')[1:]]
        assert rows == ["ada", "&lt;b&gt;bob&lt;/b&gt;", "cy"]  # dearest first, the id shown as text
        assert "<b>bob</b>" not in page
    finally:
        backend.process.stop()


def chart_of(page: str, service: str, kind: str) -> str:
    """The SVG of one of a service's charts."""
    charts = page.split(f'data-charts="{service}"', 1)[1].split("</div>", 1)[0]
    return charts.split(f'data-chart="{kind}"', 1)[1].split("</svg>", 1)[0]


def test_each_service_has_charts_of_its_last_minute_that_move_and_show_an_open_circuit(start_gateway, fresh_backend, tmp_path):
    doomed = Backend(tmp_path)
    gateway = start_gateway(status_ini(fresh_backend.url, doomed.url))
    for _ in range(5):
        assert gateway.request("GET", "/api/steady/echo").status == 200
    url = f"http://127.0.0.1:{gateway.port}/status"
    first = render(url, tmp_path)
    requests = chart_of(first, "steady", "requests")
    assert int(requests.split('data-points="', 1)[1].split('"', 1)[0]) == 60 and "<polyline" in requests
    assert "<rect" not in requests  # no open circuit, no band
    for _ in range(3):
        gateway.request("GET", "/api/steady/echo")
    time.sleep(1.1)
    second = render(url, tmp_path)
    points = lambda page: chart_of(page, "steady", "requests").split('<polyline points="', 1)[1].split('"', 1)[0]
    assert points(first) != points(second)  # the minute moved on between two refreshes
    doomed.process.stop()
    for _ in range(2):
        assert gateway.request("GET", "/api/doomed/echo").status == 502
    wait_until(lambda: gateway.request("GET", "/health").json()["services"]["doomed"]["circuit"] == "open")
    third = render(url, tmp_path)
    assert '<rect class="band"' in chart_of(third, "doomed", "requests")
    assert '<rect class="band"' not in chart_of(third, "steady", "requests")
