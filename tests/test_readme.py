"""README.rst tells the truth: every key and error type is documented, it renders, and so do the documents beside it."""

import re
from pathlib import Path

import attrs
import docutils.core
import pytest

from txgateway import errors
from txgateway.config import gateway as config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.rst").read_text()


@pytest.mark.parametrize(
    "section",
    [
        config.GatewaySettings, config.LoggingConfig, config.RateLimitConfig, config.ServiceConfig, config.AuthConfig,
        config.ModelConfig, config.CacheConfig, config._KeySection, config._TeamSection, config._PriceSection,
        config.BudgetsConfig, config.TracingConfig,
    ],
)
def test_every_gateway_ini_key_is_documented(section):
    keys = [f.name for f in attrs.fields(section) if "parse" in f.metadata]
    missing = [key for key in keys if f"``{key}``" not in README]
    assert missing == []


def test_every_error_type_is_documented_with_its_status():
    # Each kind's row of the errors table: its type, then its status.
    for kind in errors.KINDS.values():
        assert re.search(rf"^``{re.escape(kind.type)}``\s+{kind.status}\s", README, re.M), kind.type


def test_the_readme_renders_without_warnings():
    docutils.core.publish_doctree(README, settings_overrides={"report_level": 2, "halt_level": 2})


@pytest.mark.parametrize("document", sorted((ROOT / "docs").glob("*.rst")), ids=lambda path: path.name)
def test_the_documents_beside_it_render_without_warnings(document):
    docutils.core.publish_doctree(document.read_text(), settings_overrides={"report_level": 2, "halt_level": 2})


def test_the_documents_the_readme_names_exist():
    named = set(re.findall(r"``(docs/[\w./-]+)``", README))
    assert named and all((ROOT / path).exists() for path in named), named


def test_the_readme_shows_how_to_run_the_daemon_and_the_tests():
    assert "twistd -n txgateway --config gateway.ini" in README
    assert ".venv/bin/pip install . && .venv/bin/twistd -n txgateway" in README
    assert "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest" in README
