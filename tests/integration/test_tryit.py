"""
README's "Try it", run as written: the demo backend and the daemon on its
embedded defaults (ports 8000 and 3000, as a new user gets them), then
each command, whose output must be what the README shows ("..." stands for
what changes from run to run, such as a request id).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Process, wait_until

pytestmark = pytest.mark.integration

BIN = str(Path(sys.executable).parent) + "/"


def try_it_blocks() -> list[tuple[str, str]]:
    """The section's code blocks in order: (language, text)."""
    readme = (REPO / "README.rst").read_text()
    section = readme.split("\nTry it\n------\n", 1)[1]
    section = re.split(r"\n[^\n]+\n(?:=+|-+)\n", section, maxsplit=1)[0]
    blocks = []
    for language, body in re.findall(r"\.\. code-block:: (\w+)\n\n((?:   .*\n|\n)+)", section):
        lines = [line[3:] for line in body.rstrip("\n").split("\n")]
        blocks.append((language, "\n".join(lines)))
    return blocks


def as_written(command: str) -> str:
    """The command with the README's .venv/bin/ pointing at this test's own environment."""
    return command.replace(".venv/bin/", BIN)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def matches(expected: str, printed: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, printed.strip(), re.S) is not None


def test_the_readme_try_it_section_runs_as_written(tmp_path):
    blocks = try_it_blocks()
    assert [language for language, _ in blocks] == ["sh", "sh", "text", "sh", "text", "sh", "text", "sh", "text", "sh", "text"]
    for port in (3000, 8000):
        if not port_is_free(port):
            pytest.fail(f"port {port} is taken: the Try it section uses the defaults' ports 3000 and 8000")
    started = []
    try:
        for line in blocks[0][1].splitlines():
            assert line.endswith(" &"), line
            started.append(Process(as_written(line[:-2]).split(), tmp_path))
        started[0].wait_for(lambda line: "listening on http://127.0.0.1:8000" in line)
        started[1].wait_for(lambda line: '"gateway_started"' in line)
        wait_until(lambda: not port_is_free(3000))
        for (_, command), (_, expected) in zip(blocks[1::2], blocks[2::2]):
            done = subprocess.run(["bash", "-c", as_written(command)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert matches(expected, done.stdout), f"{command}\nprinted:\n{done.stdout}\nthe README shows:\n{expected}"
    finally:
        for process in reversed(started):
            process.stop()
