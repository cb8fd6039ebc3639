"""
No way around governance, tried as an attacker would against the running
daemon (SQLite and a real redis-server) and a hostile backend process
(tests/hostile_backend.py): the holes of the hardening issue, each shut.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.integration.conftest import DAEMON_HEAD, Backend, request, wait_until
from tests.integration.test_redis import RedisServer

pytestmark = pytest.mark.integration

SECRET = "alice-secret"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}


@pytest.fixture
def hostile(tmp_path):
    server = Backend(tmp_path, script="hostile_backend.py")
    yield server
    server.process.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield ""
        return
    server = RedisServer(tmp_path)
    yield f"store = redis\nredis_url = redis://127.0.0.1:{server.port}/0\nredis_timeout = 0.5"
    server.stop()


def ini(backend_url: str, budgets: str, budget: float = 1000, deadline: float = 30) -> str:
    return DAEMON_HEAD.replace("[ratelimit]", f"[budgets]\n{budgets}\nreservation_margin = 1\n[ratelimit]") + f"""
[service:ai]
url = {backend_url}/v1
api = openai
retries = 0
timeout = 10
deadline = {deadline}
[service:claude]
url = {backend_url}
api = anthropic
retries = 0
api_key = the-backends-own-key
[model:*]
targets = ai
[key:alice]
secret = {SECRET}
models = negative, huge, slow-json, ignore-max, long, plain, claude-sonnet-4-5
budget_usd = {budget}
[key:bob]
secret = bob-secret
[price:*]
prompt = 1
completion = 1
"""


def calls(backend) -> list[dict]:
    return request(backend.port, "GET", "/calls").json()["calls"]


def spent(gateway) -> float:
    return gateway.request("GET", "/spend.json").json()["keys"]["alice"]["spent_usd"]


def chat(model: str, **fields) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, **fields}).encode()


def test_a_governed_key_under_api_to_claude_is_held_to_its_models_and_pays_for_what_it_may_call(start_gateway, hostile, store):
    gateway = start_gateway(ini(hostile.url, store))
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    outside = gateway.request("POST", "/api/claude/v1/messages", body=json.dumps({**body, "model": "claude-opus-4"}).encode(), headers=HEADERS)
    assert outside.status == 403 and outside.error["type"] == "model_not_allowed"
    assert calls(hostile) == []
    inside = gateway.request("POST", "/api/claude/v1/messages", body=json.dumps({**body, "model": "claude-sonnet-4-5"}).encode(), headers=HEADERS)
    assert inside.status == 200, inside.body
    [sent] = calls(hostile)
    assert sent["path"] == "/v1/messages" and sent["headers"]["x-api-key"] == "the-backends-own-key"
    assert "authorization" not in sent["headers"]
    wait_until(lambda: spent(gateway) == pytest.approx(35 / 1e6))


@pytest.mark.parametrize("raw", [
    b'{"model": "plain", "messages": [], "temperature": NaN}',
    b'{"model": "plain", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "pricey", "model": "plain", "messages": []}',
    b'{"model": "plain", "messages": [], "max_tokens": 9223372036854775807}',
])
def test_a_body_the_reader_refuses_never_reaches_the_backend(start_gateway, hostile, raw):
    gateway = start_gateway(ini(hostile.url, ""))
    answer = gateway.request("POST", "/api/ai/chat/completions", body=raw, headers=HEADERS)
    assert answer.status == 400 and answer.error["type"] == "bad_request"
    multipart = gateway.request(
        "POST", "/api/ai/audio/transcriptions", body=b"--x\r\n\r\n--x--",
        headers={**HEADERS, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert multipart.status == 403 and multipart.error["type"] == "not_governable"
    assert calls(hostile) == []


def test_hostile_usage_is_clamped_never_refunded_and_never_poisons_the_ledger(start_gateway, hostile, store):
    gateway = start_gateway(ini(hostile.url, store))
    plain = gateway.request("POST", "/v1/chat/completions", body=chat("plain"), headers=HEADERS)
    assert plain.status == 200
    wait_until(lambda: spent(gateway) == pytest.approx(12 / 1e6))
    negative = gateway.request("POST", "/v1/chat/completions", body=chat("negative"), headers=HEADERS)
    assert negative.status == 200 and negative.json()["usage"]["prompt_tokens"] == -1_000_000  # relayed as it came
    huge = gateway.request("POST", "/v1/chat/completions", body=chat("huge"), headers=HEADERS)
    assert huge.status == 200
    # Clamped to 10^8 tokens a field: $200 at $1 a million, never a refund, never an overflow.
    wait_until(lambda: spent(gateway) == pytest.approx(12 / 1e6 + 200, rel=1e-6))
    after = gateway.request("POST", "/v1/chat/completions", body=chat("plain"), headers=HEADERS)
    assert after.status == 200  # the ledger still reserves and settles
    wait_until(lambda: spent(gateway) == pytest.approx(24 / 1e6 + 200, rel=1e-6))
    assert gateway.logged("usage_clamped", key="alice")
    assert b'txgateway_usage_clamped_total{key="alice"} 2.0' in gateway.request("GET", "/metrics").body


def test_a_client_that_hangs_up_on_a_json_call_still_pays_for_the_answer_the_backend_made(start_gateway, hostile, store):
    gateway = start_gateway(ini(hostile.url, store))
    body = chat("slow-json", max_tokens=8000)
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_until(lambda: len(calls(hostile)) == 1)
    # The gateway read the answer on after its client left: what the backend reported (9 + 8,000).
    wait_until(lambda: spent(gateway) == pytest.approx((9 + 8000) / 1e6))
    assert request(hostile.port, "GET", "/calls").json()["made"] == ["slow-json"]
    assert gateway.logged("settled_after_client_left", ended="answered")


def test_two_gateway_keys_in_two_headers_are_ambiguous_and_none_reaches_the_backend(start_gateway, hostile):
    gateway = start_gateway(ini(hostile.url, ""))
    both = {"Content-Type": "application/json", "X-API-Key": SECRET, "Authorization": "Bearer bob-secret"}
    answer = gateway.request("POST", "/api/ai/chat/completions", body=chat("plain"), headers=both)
    assert answer.status == 401 and answer.error["type"] == "ambiguous_credentials"
    assert calls(hostile) == []
    same = {"Content-Type": "application/json", "X-API-Key": "bob-secret", "Authorization": "Bearer bob-secret"}
    assert gateway.request("POST", "/api/ai/chat/completions", body=chat("plain"), headers=same).status == 200
    [sent] = calls(hostile)
    assert "authorization" not in sent["headers"] and "x-api-key" not in sent["headers"]


def test_a_stream_longer_than_its_deadline_keeps_the_budget_it_holds(start_gateway, hostile, store):
    # One call's worst case fits the budget ("hi": 6 prompt tokens and 100 at $1 a million), two do not.
    gateway = start_gateway(ini(hostile.url, store, budget=0.00015, deadline=1))
    results = {}

    def long_stream() -> None:
        results["first"] = gateway.request("POST", "/v1/chat/completions", body=chat("long", stream=True), headers=HEADERS)

    import threading

    first = threading.Thread(target=long_stream)
    first.start()
    time.sleep(3)  # past deadline + reservation_margin (2 s): without renewal its reservation would have lapsed
    second = gateway.request("POST", "/v1/chat/completions", body=chat("plain"), headers=HEADERS)
    first.join(10)
    assert second.status == 429 and second.error["type"] == "budget_exceeded"
    assert results["first"].status == 200 and b"[DONE]" in results["first"].body
    wait_until(lambda: spent(gateway) == pytest.approx(26 / 1e6))


def test_a_backend_ignoring_max_tokens_is_cut_at_the_bound_for_the_official_sdk(start_gateway, hostile, store):
    import openai

    gateway = start_gateway(ini(hostile.url, store))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=SECRET, max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="ignore-max", messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True,
    )
    chunks = list(stream)
    words = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert 20 <= len(words) <= 28  # 200 sent: cut at the 20 reserved (and the slack of 8 events)
    assert chunks[-1].choices[0].finish_reason == "length"
    # The prompt the backend reported (read past the cut) and the 20 completion tokens reserved.
    wait_until(lambda: spent(gateway) == pytest.approx((5 + 20) / 1e6))
    assert gateway.logged("completion_over_bound", key="alice", how="stream_cut")


def test_a_race_of_streams_from_a_backend_ignoring_max_tokens_never_spends_past_the_budget(start_gateway, hostile, store):
    from concurrent.futures import ThreadPoolExecutor

    # Each call's worst case: 6 prompt tokens and 20 completion at $1 a million; the budget holds 10.
    gateway = start_gateway(ini(hostile.url, store, budget=10 * 26 / 1e6))

    def one(_: int) -> int:
        return gateway.request(
            "POST", "/v1/chat/completions", body=chat("ignore-max", max_tokens=20, stream=True), headers=HEADERS,
        ).status

    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(one, range(30)))
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    wait_until(lambda: spent(gateway) == pytest.approx(10 * 25 / 1e6))  # each cut at its 20 tokens: within the budget


def _control_socket_of(gateway) -> str:
    """The control socket the supervisor's workers were started with (from a worker's command line)."""
    import os

    supervisor = gateway.process.proc.pid
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            if parent != supervisor:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if b"--worker" in argv:
            return argv[argv.index(b"--worker") + 1].decode().split(":", 1)[1]
    raise AssertionError("no worker found")


def test_the_control_socket_answers_only_the_workers_the_supervisor_spawned(start_gateway, hostile):
    import struct

    gateway = start_gateway(ini(hostile.url, "").replace("[gateway]", "[gateway]\nworkers = 2"))
    wait_until(lambda: gateway.request("POST", "/v1/chat/completions", body=chat("plain"), headers=HEADERS).status == 200)
    wait_until(lambda: spent(gateway) > 0)
    before = spent(gateway)
    refund = ["settle", [["forged", [["key:alice", None, None, 1e11, "total", None]], 0, 10**12, 0.0],
                         ["alice", None, 0, -10**12, []]]]
    messages = [{"call": "hello", "args": {"worker": 1, "secret": "guessed"}},
                {"id": 1, "call": "batch", "args": [refund]}]
    frames = b"".join(struct.pack("!I", len(data)) + data for data in (json.dumps(m).encode() for m in messages))
    received = b""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(_control_socket_of(gateway))
        try:
            sock.sendall(frames)
            while chunk := sock.recv(65536):
                received += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before it read (or answered) everything
    answers = []
    while received:
        (size,) = struct.unpack("!I", received[:4])
        answers.append(json.loads(received[4:4 + size]))
        received = received[4 + size:]
    # Refused and closed: no answer but an error, and nothing settled.
    assert all("result" not in answer for answer in answers)
    assert all("not a worker of this supervisor" in answer["error"] for answer in answers)
    assert gateway.logged("control_socket_refused")
    time.sleep(0.5)
    assert spent(gateway) == before
    assert gateway.request("POST", "/v1/chat/completions", body=chat("plain"), headers=HEADERS).status == 200


def test_a_spend_file_that_cannot_be_opened_at_start_is_one_line_naming_its_key(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "file").write_text("")
    config = tmp_path / "gateway.ini"
    config.write_text(
        "[gateway]\nlisten = tcp:0:interface=127.0.0.1\n[logging]\nfile =\n[budgets]\n"
        f"state_file = {tmp_path / 'file' / 'spend.db'}\n[service:a]\nurl = http://127.0.0.1:9\n"
        "[key:k]\nsecret = s\nbudget_usd = 1\n"
    )
    twistd = str(Path(sys.executable).with_name("twistd"))
    done = subprocess.run([twistd, "-n", "--pidfile=", "txgateway", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0 and "Traceback" not in output
    assert output.splitlines() == [output] and "[budgets] state_file: cannot open" in output


def test_a_governed_keys_v1_call_to_an_endpoint_the_gateway_cannot_price_is_refused(start_gateway, hostile):
    gateway = start_gateway(ini(hostile.url, ""))
    body = json.dumps({"model": "plain", "prompt": "a cat", "n": 4}).encode()
    answer = gateway.request("POST", "/v1/images/generations", body=body, headers=HEADERS)
    assert answer.status == 403 and answer.error["type"] == "not_governable"
    assert calls(hostile) == []
