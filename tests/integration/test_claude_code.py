"""
The real Claude Code CLI (npm's C{@anthropic-ai/claude-code}, run by
Debian's C{node}) through the running daemon, C{claude -p} to an
OpenAI-compatible backend (translated) and to a native Anthropic one.
Claude Code sends its real request: C{HEAD /} first, then
C{/v1/messages?beta=true} with thinking (enabled for a model it knows,
adaptive with an effort for one it does not), C{context_management},
C{metadata.user_id}, a system of blocks with C{cache_control}, its tools,
a stream.  The fake backends call the first tool they are given; Claude
Code runs it (it fails: the input is the weather's), sends the result
back, and the backend's last answer quotes it: a whole tool round trip
through the translation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_TOOLS, Gateway, agents_gateway_ini, npm_binary, wait_until

pytestmark = pytest.mark.integration

CLAUDE_HOME = TEST_TOOLS / "claude-code"
CLAUDE_VERSION = "2.1.197"


@pytest.fixture(scope="module")
def claude_code():
    return npm_binary(CLAUDE_HOME, "@anthropic-ai/claude-code", CLAUDE_VERSION, "claude")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, chat_and_claude):
    chat, claude = chat_and_claude
    # A model Claude Code knows, and any other it asks for (a quick model for its own chores), to the chat backend.
    more = "[model:claude-sonnet-4-5]\ntargets = chatonly:plain-model\n[model:*]\ntargets = chatonly:plain-model\n"
    daemon = Gateway(tmp_path_factory.mktemp("gateway"), agents_gateway_ini(chat, claude, more))
    yield daemon
    daemon.stop()


def claude_print(binary: Path, gateway: Gateway, tmp_path: Path, model: str, prompt: str = "Say hello") -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{gateway.port}",
        "ANTHROPIC_API_KEY": "gateway-key", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    return subprocess.run(
        [str(binary), "-p", prompt, "--model", model], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "selfhosted"])
def test_claude_code_runs_a_tool_round_trip_on_an_openai_backend(claude_code, gateway, tmp_path, model, chat_and_claude):
    done = claude_print(claude_code, gateway, tmp_path, model)
    assert done.returncode == 0, (done.stdout[-1000:], done.stderr[-2000:])
    assert "The tool said:" in done.stdout

    def answered() -> list:
        return [line for line in gateway.log_lines()
                if line.get("event") == "request_completed" and line.get("path") == "/v1/messages" and line.get("requested_model") == model]

    wait_until(lambda: len(answered()) >= 2)  # the tool's call, then its result back
    assert {line["status"] for line in answered()} == {200}
    # Its probe of the base URL was answered, and what it sent beside its messages went on translated.
    assert any(line.get("path") == "/" and line.get("method") == "HEAD" and line.get("status") == 200 for line in gateway.log_lines())
    tools = chat_and_claude[0].calls()["plain-model"]["tools"]
    assert len(tools) >= 10 and {tool["type"] for tool in tools} == {"function"}


def test_claude_code_is_answered_by_a_native_anthropic_backend(claude_code, gateway, tmp_path):
    done = claude_print(claude_code, gateway, tmp_path, "claude")
    assert done.returncode == 0, (done.stdout[-1000:], done.stderr[-2000:])
    assert "The tool said:" in done.stdout


def png(path: Path, width: int = 16, height: int = 16) -> Path:
    """A small red PNG at C{path}."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("model", ["selfhosted", "claude"])
def test_claude_code_reads_an_image_and_its_backend_sees_it(claude_code, gateway, tmp_path, model, chat_and_claude):
    picture = png(tmp_path / "pixel.png")
    done = claude_print(claude_code, gateway, tmp_path, model, f"Describe the picture READ_FILE:{picture}")
    assert done.returncode == 0, (done.stdout[-1000:], done.stderr[-2000:])
    # Its Read tool returned the image; translated, it follows the tool's message as a user's image part.
    assert "(and 1 image)" in done.stdout, done.stdout[-1000:]
    if model == "selfhosted":
        sent = chat_and_claude[0].calls()["plain-model"]["last_messages"]
        tool = next(n for n, message in enumerate(sent) if message["role"] == "tool")
        parts = sent[tool + 1]["content"]
        assert sent[tool + 1]["role"] == "user" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
