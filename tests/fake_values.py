"""
What the fake backend processes (tests/openai_backend.py,
tests/anthropic_backend.py) answer alike, imported by them as scripts
(their directory is first on their path).
"""

from __future__ import annotations


def example_of(schema: dict):
    """A value of a JSON schema (the object, array, string, number, integer and boolean kinds): a structured output."""
    kind = schema.get("type")
    if kind == "object":
        return {name: example_of(inner) for name, inner in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_of(schema.get("items") or {})]
    return {"string": "Paris", "number": 21.5, "integer": 21, "boolean": True}.get(kind)
