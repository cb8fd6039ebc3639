"""
Real processes on real loopback sockets: the test backend
(tests/backends.py), the gateway daemon started with twistd from the
installed package, and a raw HTTP client.
"""

from __future__ import annotations

import filecmp
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def installed_package_is_this_tree():
    """The daemon runs from the installed package: it must be this tree's code."""
    installed = subprocess.run(
        [sys.executable, "-c", "import txgateway, os; print(os.path.dirname(txgateway.__file__))"],
        cwd="/", capture_output=True, text=True,
    ).stdout.strip()
    if not installed:
        pytest.exit("txgateway is not installed: run `pip install '.[test]'` (see README.rst)", returncode=3)
    stale = []
    for path in (REPO / "txgateway").rglob("*.py"):
        twin = Path(installed) / path.relative_to(REPO / "txgateway")
        if not twin.exists() or not filecmp.cmp(path, twin, shallow=False):
            stale.append(str(path.relative_to(REPO)))
    if stale:
        pytest.exit(
            f"the installed txgateway ({installed}) differs from this tree ({', '.join(stale[:5])}): "
            "run `pip install '.[test]'` again (see README.rst)",
            returncode=3,
        )


class Process:
    """A child process whose output a thread reads line by line."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, text=True, bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"{self.argv[:3]} did not say what was expected; output:\n" + "".join(self.lines))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        while True:
            try:
                line = self._queue.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code


class Backend:
    """
    A test backend process, tests/SCRIPT (the plain one by default; the
    fake OpenAI and Anthropic ones serve under C{base_path} C{/v1}).
    """

    def __init__(self, tmp: Path, env: dict | None = None, script: str = "backends.py", base_path: str = "") -> None:
        self.process = Process([sys.executable, str(REPO / "tests" / script), "0"], tmp, env)
        line = self.process.wait_for(lambda l: l.startswith("listening"))
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}{base_path}"

    def calls(self) -> dict:
        return request(self.port, "GET", "/calls").json()


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    server = Backend(tmp_path_factory.mktemp("backend"))
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def chat_and_claude(tmp_path_factory):
    """A backend speaking only chat completions and a Claude backend, for a module's agent tests."""
    chat = Backend(tmp_path_factory.mktemp("chat"), script="openai_backend.py", base_path="/v1")
    claude = Backend(tmp_path_factory.mktemp("claude"), script="anthropic_backend.py", base_path="/v1")
    yield chat, claude
    chat.process.stop()
    claude.process.stop()


def agents_gateway_ini(chat: Backend, claude: Backend, more: str = "") -> str:
    """
    A daemon with the key C{gateway-key} and the models an agent is pointed
    at: C{selfhosted} (the chat-only backend, translated), C{claude}
    (translated), and C{more}.
    """
    return DAEMON_HEAD + f"""[auth]
keys = agent:gateway-key
[service:chatonly]
url = {chat.url}
api = openai
retries = 0
[service:claude]
url = {claude.url}
api = anthropic
retries = 0
[model:selfhosted]
targets = chatonly:plain-model
[model:claude]
targets = claude:claude-test
{more}"""


@pytest.fixture
def fresh_backend(tmp_path):
    """A backend of one test's own, for counting its calls."""
    server = Backend(tmp_path)
    yield server
    server.process.stop()


#: The start of a daemon's gateway.ini: its port (filled in by L{Gateway}), its
#: log file, and a rate limit no test reaches by accident.
#: Where the tests keep the agent CLIs they install from npm (outside the tree, across runs).
TEST_TOOLS = Path(os.environ.get("TXGATEWAY_TEST_TOOLS", Path.home() / ".cache" / "txgateway-tests"))


def npm_binary(home: Path, package: str, version: str, name: str) -> Path:
    """The binary C{name} of npm's C{package} at C{version}, installed under C{home} when missing."""
    binary = home / "node_modules" / ".bin" / name
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None and os.geteuid() == 0:
        # As the status page's test does for chromium: Debian's packages, installed when missing.
        subprocess.run(["apt-get", "install", "-y", "-q", "nodejs", "npm"], capture_output=True, timeout=900)
        npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"the tests of {package} need Debian's node and npm (apt-get install nodejs npm)")
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(home), f"{package}@{version}"],
        check=True, capture_output=True, timeout=600,
    )
    return binary



DAEMON_HEAD = """
[gateway]
listen = tcp:{port}:interface=127.0.0.1
[logging]
file = logs/combined.log
[ratelimit]
requests = 100000
"""


#: Runs argv[3:] with the soft and hard limits on open files argv[1] and argv[2].
_WITH_OPEN_FILES = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


class Gateway:
    """The daemon, run as users run it: twistd -n txgateway --config FILE."""

    def __init__(self, workdir: Path, ini: str, env: dict | None = None, open_files: tuple[int, int] | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "gateway.ini"
        self.config.write_text(textwrap.dedent(ini).replace("{port}", str(self.port)))
        self.log_file = workdir / "logs" / "combined.log"
        argv = [TWISTD, "-n", "--pidfile=", "txgateway", "--config", str(self.config)]
        if open_files is not None:
            # Started the way a shell with these limits on open files (soft, hard) would start it.
            argv = [sys.executable, "-c", _WITH_OPEN_FILES, *map(str, open_files), *argv]
        self.process = Process(argv, workdir, env)
        self.process.wait_for(lambda l: '"gateway_started"' in l)
        if "listen = ssl:" in self.config.read_text():
            wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() is None)
        else:
            wait_until(lambda: request(self.port, "GET", "/health/live").status == 200)

    def request(self, method: str, path: str, **kwargs) -> "Answer":
        return request(self.port, method, path, **kwargs)

    def log_lines(self) -> list[dict]:
        """The log file's lines so far (a line still being written is left out)."""
        text = self.log_file.read_text() if self.log_file.exists() else ""
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines()]

    def logged(self, event: str, timeout: float = 10.0, **fields) -> list[dict]:
        """
        The lines of C{event} (with these C{fields}) once one was written:
        the daemon writes its log in batches, at most 0.1 s late.
        """
        def found() -> list[dict]:
            return [
                e for e in self.log_lines()
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            ]

        wait_until(lambda: bool(found()), timeout)
        return found()

    def story(self, request_id: str) -> list[dict]:
        """Every line about one request, once its access line was written."""
        wait_until(lambda: any(
            e.get("request_id") == request_id and e.get("event") in ("request_completed", "request_aborted")
            for e in self.log_lines()
        ))
        return [e for e in self.log_lines() if e.get("request_id") == request_id]

    def stop(self) -> int:
        return self.process.stop()


@pytest.fixture
def start_gateway(tmp_path):
    """Start gateways with configurations of the test's own; all are stopped after it."""
    started: list[Gateway] = []

    def start(ini: str, env: dict | None = None, open_files: tuple[int, int] | None = None) -> Gateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        gateway = Gateway(workdir, ini, env, open_files)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        assert self.headers["Content-Type"] == "application/json", self.headers
        return self.json()["error"]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        chunked = body is not None and not isinstance(body, (bytes, str))
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError as error:
            last_error = error
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s ({last_error})")
