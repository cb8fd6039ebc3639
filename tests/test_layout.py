"""
The house rules that keep the code easy to live in, checked: which room
(package) may import which, the pure cores without I/O, no import cycle,
every module listed in its room, one place for the global reactor, and a
docstring on everything public.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "txgateway"

#: Every module of txgateway, by room.  A new module is added here, in the
#: room whose rules it follows (and to the README's layout section).
ROOMS = {
    "txgateway": {"bodies", "demo", "errors", "ids", "redispool", "speaking"},
    "txgateway.config": {"gateway", "keys"},
    "txgateway.resilience": {"breaker", "guarded", "retry"},
    "txgateway.observability": {"context", "export", "logs", "metrics", "otlp", "tracing", "window"},
    "txgateway.dataplane": {"client", "eager", "flow", "headers", "idle", "parsing", "relay", "server"},
    "txgateway.openai": {"relays", "speaker", "wire"},
    "txgateway.anthropic": {"speakers", "translate", "wire"},
    "txgateway.responses": {"conversations", "speakers", "store", "translate", "wire"},
    "txgateway.ratelimit": {"bucket", "interface", "limiter", "memory", "redis"},
    "txgateway.cache": {"policy", "stores", "responses"},
    "txgateway.governance": {"estimate", "governor", "interface", "ledger", "local", "periods", "redis", "spendfile"},
    "txgateway.routing": {
        "answer", "attempt", "balance", "broker", "call", "chain", "deployments", "lease", "model", "paths", "resume",
    },
    "txgateway.admin": {"api", "console", "control", "documents", "page", "registry", "render", "routes", "store"},
    "txgateway.front": {"answers", "auth", "door", "gateway", "proxied"},
    "txgateway.workers": {"channel", "codec", "link", "listen", "merge", "shared", "state", "supervisor"},
    "txgateway.daemon": {"dispatch", "openfiles", "service", "tap"},
}

#: Which rooms each room may import (besides itself and the shared
#: vocabulary in C{txgateway}: the error shape and the ids).  A request
#: walks down this list; nothing below knows what is above it.
MAY_IMPORT = {
    "txgateway": set(),
    "txgateway.config": set(),
    "txgateway.resilience": set(),
    "txgateway.observability": set(),
    "txgateway.dataplane": set(),
    "txgateway.openai": {"txgateway.config", "txgateway.dataplane"},
    "txgateway.anthropic": {"txgateway.config", "txgateway.dataplane", "txgateway.openai"},
    "txgateway.responses": {
        "txgateway.anthropic", "txgateway.config", "txgateway.dataplane", "txgateway.openai", "txgateway.resilience",
    },
    "txgateway.ratelimit": {"txgateway.config", "txgateway.resilience"},
    "txgateway.cache": {"txgateway.config", "txgateway.dataplane", "txgateway.observability", "txgateway.resilience"},
    "txgateway.governance": {"txgateway.config", "txgateway.observability", "txgateway.openai", "txgateway.resilience"},
    # Routing holds the speakers' interface (txgateway.speaking), never an API's package.
    "txgateway.routing": {
        "txgateway.cache",
        "txgateway.governance",
        "txgateway.config",
        "txgateway.dataplane",
        "txgateway.observability",
        "txgateway.ratelimit",
        "txgateway.resilience",
    },
    "txgateway.admin": {
        "txgateway.config", "txgateway.dataplane", "txgateway.governance", "txgateway.observability", "txgateway.resilience",
        "txgateway.routing",
    },
    "txgateway.front": {
        "txgateway.admin",
        "txgateway.config",
        "txgateway.dataplane",
        "txgateway.governance",
        "txgateway.observability",
        "txgateway.openai",
        "txgateway.anthropic",
        "txgateway.responses",
        "txgateway.ratelimit",
        "txgateway.routing",
    },
    "txgateway.workers": set(ROOMS) - {"txgateway.daemon", "txgateway.workers", "txgateway.front"},
    "txgateway.daemon": set(ROOMS) - {"txgateway.daemon"},
}

#: Pure cores: given a clock and inputs they decide; they import no I/O
#: (no sockets, protocols, reactor, HTTP, Redis) and no room but config.
PURE_CORES = {
    "txgateway.bodies",
    "txgateway.speaking",
    "txgateway.resilience.breaker",
    "txgateway.resilience.retry",
    "txgateway.ratelimit.bucket",
    "txgateway.routing.balance",
    "txgateway.routing.paths",
    "txgateway.openai.wire",
    "txgateway.anthropic.wire",
    "txgateway.anthropic.translate",
    "txgateway.responses.wire",
    "txgateway.responses.translate",
    "txgateway.cache.policy",
    "txgateway.config.gateway",
    "txgateway.config.keys",
    "txgateway.governance.ledger",
    "txgateway.governance.periods",
    "txgateway.governance.estimate",
    "txgateway.observability.otlp",
    "txgateway.observability.tracing",
    "txgateway.admin.registry",
}
IO_MODULES = (
    "socket",
    "httptools",
    "txredisapi",
    "klein",
    "treq",
    "twisted.internet.reactor",
    "twisted.internet.protocol",
    "twisted.internet.endpoints",
    "twisted.internet.tcp",
    "twisted.web",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (inside TYPE_CHECKING and functions too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def own_imports(path: Path, modules: set[str]) -> set[str]:
    """The txgateway modules a file imports (C{from txgateway.x import name} counts as C{txgateway.x})."""
    return {name for name in imports_of(path) if name in modules and name != module_name(path)}


def room_of(module: str) -> str:
    if module in ROOMS:  # a package's __init__
        return module
    package = module.rpartition(".")[0]
    return package if package in ROOMS else "txgateway"


def test_every_module_is_listed_in_its_room():
    found = {name for name in all_modules() if name not in ROOMS}
    listed = {f"{room}.{module}" for room, modules in ROOMS.items() for module in modules}
    assert found == listed


def offences_of(room: str) -> list[str]:
    modules = set(all_modules())
    allowed = MAY_IMPORT[room] | {room, "txgateway"}
    offences = []
    for name, path in sorted(all_modules().items()):
        if room_of(name) != room:
            continue
        for imported in sorted(own_imports(path, modules)):
            if room_of(imported) not in allowed:
                offences.append(f"{name} imports {imported}")
    return offences


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_imports_only_the_rooms_below_it(room):
    assert offences_of(room) == []


def test_each_module_is_in_the_room_it_is_listed_in():
    for room, modules in ROOMS.items():
        for module in modules:
            assert room_of(f"{room}.{module}") == room


def test_an_import_against_the_layering_is_found(tmp_path, monkeypatch):
    # The rule above could pass by finding nothing: a data plane module importing routing is an offence.
    package = tmp_path / "txgateway"
    for room in ("dataplane", "routing"):
        (package / room).mkdir(parents=True)
        (package / room / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "routing" / "broker.py").write_text("")
    (package / "dataplane" / "server.py").write_text("from txgateway.routing.broker import ServiceBroker\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert offences_of("txgateway.dataplane") == ["txgateway.dataplane.server imports txgateway.routing.broker"]


def test_the_shared_vocabulary_imports_no_room():
    modules = set(all_modules())
    for name in ("txgateway.errors", "txgateway.ids"):
        assert own_imports(all_modules()[name], modules) == set()


#: The model APIs' packages: routing speaks none of them.
API_PACKAGES = ("txgateway.openai", "txgateway.anthropic", "txgateway.responses")


def test_routing_imports_no_api_package():
    for name, path in all_modules().items():
        if name.startswith("txgateway.routing"):
            assert not {i for i in imports_of(path) if i.startswith(API_PACKAGES)}, name


def code_words(path: Path) -> set[str]:
    """The names and the strings (docstrings left out) of a module's code, lowercased."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            words.add(node.attr.lower())
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and id(node) not in docstrings:
            value = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            words.add(value.lower())
    return words


@pytest.mark.parametrize("api", ["anthropic", "openai", "messages", "chat/completions", "responses", "dialect"])
def test_routing_holds_no_branch_on_an_api(api):
    # No API's name in routing's code: a new API is a new package and its speakers.
    for name, path in all_modules().items():
        if name.startswith("txgateway.routing"):
            assert not [word for word in code_words(path) if api in word], name


def test_the_branch_finder_finds_an_api_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Speaks to Anthropic."""\nif config.api == ANTHROPIC:\n    pass\n')
    assert "anthropic" in code_words(module)
    assert "speaks to anthropic." not in code_words(module)


def test_the_data_plane_knows_nothing_of_routing_or_openai():
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith("txgateway.dataplane"):
            assert not {i for i in imports_of(path) if i.startswith(("txgateway.routing", "txgateway.openai"))}, name


@pytest.mark.parametrize("core", sorted(PURE_CORES))
def test_the_pure_cores_import_no_io_and_no_room_above_config(core):
    """A pure core imports no I/O, and of txgateway only config, the shared vocabulary and other pure cores."""
    path = all_modules()[core]
    imported = imports_of(path)
    io = {name for name in imported if name.startswith(IO_MODULES)}
    own = own_imports(path, set(all_modules())) - PURE_CORES
    rooms = {room_of(name) for name in own} - {"txgateway", "txgateway.config"}
    assert io == set() and rooms == set()


def test_there_is_no_import_cycle():
    modules = all_modules()
    graph = {name: own_imports(path, set(modules)) for name, path in modules.items()}
    # A package imports its own modules only to re-export them: not a dependency.
    for package in ROOMS:
        graph[package] = set()
    done, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # The test above could pass by finding nothing at all: show it can fail.
    package = tmp_path / "txgateway"
    package.mkdir()
    (package / "a.py").write_text("from txgateway.b import x\n")
    (package / "b.py").write_text("from txgateway import a\nimport txgateway.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(AssertionError):
        test_there_is_no_import_cycle()


def test_only_the_twistd_plugin_touches_the_global_reactor():
    offenders = [
        name for name, path in all_modules().items()
        if name != "txgateway.daemon.tap" and "twisted.internet.reactor" in imports_of(path)
    ]
    assert offenders == []


def test_nothing_in_production_uses_twisted_testing():
    offenders = [
        name for name, path in all_modules().items()
        if any(i.startswith(("twisted.internet.testing", "twisted.test", "treq.testing")) for i in imports_of(path))
    ]
    assert offenders == []


def test_every_public_module_class_and_function_has_a_docstring():
    missing = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if ast.get_docstring(tree) is None:
            missing.append(str(path.relative_to(PACKAGE)))
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                if ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert missing == []


def test_every_package_is_listed_in_pyproject():
    """pyproject.toml names the packages explicitly: a room missing there is missing from every install."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    rooms = {room for room in ROOMS if (PACKAGE.parent / room.replace(".", "/") / "__init__.py").exists()}
    assert rooms - listed == set()
