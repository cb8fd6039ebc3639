"""
The real Codex CLI (npm's C{@openai/codex}, run by Debian's C{node}) through
the running daemon, C{codex exec} to each kind of target: a chat-only
backend (translated), Claude (translated by way of chat) and a native
Responses backend.  Codex sends its real request: developer messages,
eight function tools and a namespace of more, the built-in web search,
reasoning, a stream.  The fake backends call the first tool they are
given; Codex runs it (it fails: the arguments are the weather's), sends
the tool's output back, and the backend's last answer quotes it: a whole
round trip of a tool call through the translation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_TOOLS, Gateway, agents_gateway_ini, npm_binary, wait_until

pytestmark = pytest.mark.integration

CODEX_HOME = TEST_TOOLS / "codex"
CODEX_VERSION = "0.171.0"


@pytest.fixture(scope="module")
def codex():
    return npm_binary(CODEX_HOME, "@openai/codex", CODEX_VERSION, "codex")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, chat_and_claude):
    chat, claude = chat_and_claude
    native = f"[service:native]\nurl = {chat.url}\napi = openai\nresponses = native\nretries = 0\n[model:openai]\ntargets = native:resp-model\n"
    daemon = Gateway(tmp_path_factory.mktemp("gateway"), agents_gateway_ini(chat, claude, native))
    yield daemon
    daemon.stop()


def codex_exec(codex: Path, gateway: Gateway, tmp_path: Path, model: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "gateway"\n'
        f'[model_providers.gateway]\nname = "gateway"\nbase_url = "http://127.0.0.1:{gateway.port}/v1"\n'
        'env_key = "GATEWAY_KEY"\nwire_api = "responses"\n'
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"), "GATEWAY_KEY": "gateway-key"}
    return subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "Say hello"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("model", ["selfhosted", "claude"])
def test_codex_runs_a_tool_round_trip_on_a_translated_target(codex, gateway, tmp_path, model):
    done = codex_exec(codex, gateway, tmp_path, model)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The tool said:" in done.stdout
    def completed() -> list:
        return [line for line in gateway.log_lines()
                if line.get("event") == "request_completed" and line.get("path") == "/v1/responses" and line.get("model")]

    # The tool's call, then its output back: two calls at least, all answered.
    wait_until(lambda: len(completed()) >= 2)
    assert {line["status"] for line in completed()} == {200}


def test_codex_runs_a_tool_round_trip_on_a_native_responses_target(codex, gateway, tmp_path, chat_and_claude):
    done = codex_exec(codex, gateway, tmp_path, "openai")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The tool said:" in done.stdout
    # Its reasoning item (encrypted, as Codex asks) went back to the same provider with the tool's output.
    sent = chat_and_claude[0].calls()["responses:resp-model"]["last_body"]["input"]
    reasoning = [item for item in sent if item.get("type") == "reasoning"]
    assert reasoning and reasoning[0].get("encrypted_content") == "gAAAAB-openai-opaque"
    assert sent[-1]["type"] == "function_call_output"
