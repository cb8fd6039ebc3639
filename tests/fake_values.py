"""
What the fake backend processes (tests/openai_backend.py,
tests/anthropic_backend.py) answer alike, imported by them as scripts
(their directory is first on their path).
"""

from __future__ import annotations

import json
import re


def example_of(schema: dict):
    """A value of a JSON schema (the object, array, string, number, integer and boolean kinds): a structured output."""
    kind = schema.get("type")
    if kind == "object":
        return {name: example_of(inner) for name, inner in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_of(schema.get("items") or {})]
    return {"string": "Paris", "number": 21.5, "integer": 21, "boolean": True}.get(kind)


#: A prompt holding C{READ_FILE:<path>} makes the fakes call a tool named
#: C{Read} (Claude Code's) on that file: a tool result with an image.
READ_FILE = re.compile(r"READ_FILE:(\S+?)(?:\\n|\s|\"|$)")


def tool_call(tools: list[tuple[str, dict]], body: dict) -> tuple[str, dict]:
    """
    The tool the fakes call, and its input, of C{tools} (each its name and
    its parameters' properties): C{Read} on the file a prompt names
    (C{READ_FILE:<path>}); else the first tool, with a patch for a
    function of one string C{input} (what a custom tool becomes), or a city.
    """
    found = READ_FILE.search(json.dumps(body.get("messages", [])))
    if found:
        for name, _ in tools:
            if name == "Read":
                return name, {"file_path": found.group(1)}
    name, properties = tools[0]
    if "input" in properties:
        return name, {"input": "*** Begin Patch\n*** End Patch"}
    return name, {"city": "Paris"}
