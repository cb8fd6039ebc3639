"""Several endpoints per service, through the running daemon, in front of real backend processes."""

from __future__ import annotations

import threading

import pytest

from tests.integration.conftest import Backend, free_port

pytestmark = pytest.mark.integration


def service_ini(urls: str, **keys) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in {"retry_delay": 0.05, "timeout": 5, **keys}.items())
    return (
        "[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        "[logging]\nfile = logs/combined.log\n"
        "[ratelimit]\nrequests = 100000\n"
        f"[service:pool]\nurl = {urls}\n{extra}"
    )


def test_every_request_is_answered_while_one_of_two_endpoints_refuses(start_gateway, fresh_backend):
    refusing = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(service_ini(f"{refusing}, {fresh_backend.url}", balance="round_robin"))
    statuses = [gateway.request("GET", f"/api/pool/echo/{n}").status for n in range(40)]
    assert statuses == [200] * 40
    health = gateway.request("GET", "/health").json()["services"]["pool"]
    assert health["circuit"] == "closed"
    by_url = {e["url"]: e for e in health["endpoints"]}
    assert by_url[refusing]["circuit"] == "open"  # five refusals opened it; no request saw them
    assert by_url[fresh_backend.url]["circuit"] == "closed"
    assert fresh_backend.calls()["count"] == 40


def test_least_requests_sends_most_requests_to_the_faster_endpoint(start_gateway, fresh_backend, tmp_path):
    slow = Backend(tmp_path, env={"BACKEND_DELAY": "0.25"})
    try:
        gateway = start_gateway(service_ini(f"{slow.url}, {fresh_backend.url}"))
        errors = []

        def client() -> None:
            for n in range(8):
                status = gateway.request("GET", f"/api/pool/echo/{n}").status
                if status != 200:
                    errors.append(status)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        fast_calls, slow_calls = fresh_backend.calls()["count"], slow.calls()["count"]
        assert fast_calls + slow_calls == 64
        assert fast_calls > 3 * slow_calls, (fast_calls, slow_calls)
    finally:
        slow.process.stop()


def test_the_openai_client_is_served_by_the_fallback_when_the_primary_is_down(start_gateway, backend):
    openai = pytest.importorskip("openai")
    down = f"http://127.0.0.1:{free_port()}/v1"
    gateway = start_gateway(
        "[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n[logging]\nfile = logs/combined.log\n"
        f"[service:primary]\nurl = {down}\nfallback = local\nretries = 1\nretry_delay = 0.05\n"
        f"[service:local]\nurl = {backend.url}/v1\n"
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/api/primary", api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-service"] == "local"
    assert raw.headers["x-gateway-fallback-from"] == "primary"
    assert raw.parse().choices[0].message.content == "Hello from the test backend."
    stream = client.chat.completions.create(model="tiny-1", messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert pieces == ["Hello", " from", " the", " test", " backend."]
    [line] = [e for e in gateway.logged("request_completed") if e["request_id"] == raw.headers["x-request-id"]]
    assert (line["service"], line["served_by"], line["fallback_from"], line["attempts"]) == ("primary", "local", ["primary"], 3)
    metrics = gateway.request("GET", "/metrics").body.decode()
    assert 'txgateway_fallbacks_total{service="primary",to="local"} 2.0' in metrics


def test_a_fallback_gets_its_own_retries_after_the_primary_spent_its(start_gateway, fresh_backend, tmp_path):
    second = Backend(tmp_path)
    try:
        gateway = start_gateway(
            "[gateway]\nlisten = tcp:{port}:interface=127.0.0.1\n[logging]\nfile = logs/combined.log\n"
            "[ratelimit]\nrequests = 100000\n"
            f"[service:primary]\nurl = {fresh_backend.url}\nfallback = second\nretries = 2\nretry_delay = 0.05\n"
            "breaker_threshold = 100\n"
            f"[service:second]\nurl = {second.url}\nretries = 3\nretry_delay = 0.05\nbreaker_threshold = 100\n"
        )
        answer = gateway.request("GET", "/api/primary/status/503")
        assert answer.status == 503
        assert answer.headers["X-Gateway-Service"] == "second"
        assert answer.headers["X-Gateway-Attempts"] == "7"
        assert fresh_backend.calls()["by_path"]["/status/503"] == 3
        assert second.calls()["by_path"]["/status/503"] == 4
    finally:
        second.process.stop()


def test_a_silent_backend_gets_a_post_once_and_the_client_a_504(start_gateway, fresh_backend):
    gateway = start_gateway(service_ini(fresh_backend.url, timeout=0.5, retries=3))
    answer = gateway.request("POST", "/api/pool/hang", body=b'{"prompt": "a long generation"}')
    assert answer.status == 504 and answer.error["type"] == "upstream_timeout"
    assert answer.headers["X-Gateway-Attempts"] == "1"
    assert fresh_backend.calls()["by_path"]["/hang"] == 1


def test_forty_concurrent_requests_to_a_failing_backend_stay_within_the_retry_budget(start_gateway, fresh_backend):
    gateway = start_gateway(service_ini(fresh_backend.url, retries=3, retry_delay=0.2, breaker_threshold=1000))
    statuses: list[int] = []
    barrier = threading.Barrier(40)

    def client() -> None:
        barrier.wait(10)
        statuses.append(gateway.request("GET", "/api/pool/status/503").status)

    threads = [threading.Thread(target=client) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [503] * 40
    calls = fresh_backend.calls()["by_path"]["/status/503"]
    # Without a budget: 40 x (1 + 3) = 160 calls.  With it: the first attempts,
    # and the retries of the few the budget let retry (20% of 40 = 8 at once).
    assert 40 < calls <= 40 + 8 * 3 + 12, calls
    assert gateway.logged("retry_budget_exhausted")


def test_an_sse_stream_cut_after_the_commit_point_is_an_api_error_with_the_request_id(start_gateway, backend):
    openai = pytest.importorskip("openai")
    gateway = start_gateway(service_ini(backend.url))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/api/pool/cut/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny-1", messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers={"X-Request-ID": "cut-1"}
    )
    pieces = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["Hello", " from"]  # what came before the break reached the client
    assert caught.value.body["type"] == "stream_broken"
    assert caught.value.body["request_id"] == "cut-1"
    assert gateway.story("cut-1")[-1]["outcome"] == "stream_broken"
