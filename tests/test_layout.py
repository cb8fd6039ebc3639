"""The house rules that keep the code easy to live in, checked."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "txgateway"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_the_twistd_plugin_touches_the_global_reactor():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "tap.py" and "twisted.internet.reactor" in imports_of(path)
    ]
    assert offenders == []


def test_the_pure_cores_import_nothing_from_the_rooms_above_them():
    above = {"txgateway.app", "txgateway.broker", "txgateway.service", "txgateway.tap", "txgateway.site", "txgateway.upstream"}
    for core in ("breaker.py", "retry.py", "config.py", "ratelimit/bucket.py", "ratelimit/memory.py", "paths.py"):
        assert imports_of(PACKAGE / core) & above == set(), core


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
