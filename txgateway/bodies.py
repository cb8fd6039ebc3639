"""
The strict reader of a governed request's JSON body, pure: what it reads
is exactly what the backend is sent, or the request is refused naming
why.

A lax reader lets a body mean one thing to the gateway and another to
the backend: a duplicate C{model} (the gateway reads the last, a backend
may read the first), C{NaN} or a lone surrogate (refused by the gateway's
fast reader, so the body passed unread; accepted by Python backends), a
number too large for the ledger, a C{max_tokens} of the wrong type (a
reservation of the default while a lax backend coerces C{"5000"}).  A
governed key's body is read here instead: anything of that kind is a
L{BadBody} naming the field, before any reservation.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import attrs

try:
    from orjson import dumps as _write_compact
    from orjson import loads as _verify
except ImportError:  # PyPy: json's own strictness is checked below
    _verify = _write_compact = None

__all__ = [
    "BadBody",
    "BodyReading",
    "FAST",
    "MAX_CONTAINERS",
    "check_containers",
    "MAX_CHOICES",
    "MAX_DEPTH",
    "MAX_TOKENS",
    "TOKEN_FIELDS",
    "read_strict",
    "strict_fields",
]

#: The most completion tokens a request may name (far above any model's
#: output limit; what the ledger's arithmetic is bounded by).
MAX_TOKENS = 16_777_216
#: The most choices (C{n}) a request may ask for (OpenAI's own limit).
MAX_CHOICES = 128
#: The deepest nesting of objects and arrays a body may have.
MAX_DEPTH = 64
#: The most objects and arrays (C{{} and C{[} bytes) a body may hold: no model
#: takes a prompt that needs more (a 10 MB body of 290,000 messages would).
MAX_CONTAINERS = 100_000
#: Bodies smaller than this cannot hold L{MAX_CONTAINERS}: they are not counted.
_CONTAINERS_CHECKED_FROM = 2 * MAX_CONTAINERS
#: The fields that bound what a call may complete.
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

_BOM = b"\xef\xbb\xbf"
#: An escaped UTF-16 surrogate, which must come in a high-low pair.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BadBody(ValueError):
    """The body is not one the gateway can account for (the message names the field, or why)."""


@attrs.frozen
class BodyReading:
    """
    How a request's body is read: for a governed caller strictly
    (L{read_strict} and L{strict_fields}), for any other by the fast
    reader; either way with at most C{max_messages} messages, and a body
    holding more than L{MAX_CONTAINERS} objects and arrays refused before
    it is parsed.
    """

    max_messages: int
    strict: bool = True

    def read(self, raw: bytes, fast_loads: Any = json.loads) -> dict:
        """
        The body's JSON object, its fields checked; L{BadBody} naming what
        is wrong.  C{fast_loads}: the fast reader, for a caller not read strictly.
        """
        check_containers(raw)
        if self.strict:
            body = read_strict(raw)
            strict_fields(body, self.max_messages)
            return body
        try:
            body = fast_loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadBody("the body is not JSON") from None
        if type(body) is not dict:
            raise BadBody("the body is not a JSON object")
        _check_items(body, self.max_messages)
        return body


#: The fast reader with no bound on messages (the containers' bound holds for every body).
FAST = BodyReading(sys.maxsize, strict=False)


def check_containers(raw: bytes) -> None:
    """
    Refuse, before parsing it, a body that may hold more than
    L{MAX_CONTAINERS} objects and arrays (its C{{} and C{[} bytes counted,
    those inside strings too: an upper bound, at C speed).  Parsing one
    costs the reactor a fraction of a second and a hundred MB.
    """
    if len(raw) > _CONTAINERS_CHECKED_FROM and raw.count(b"{") + raw.count(b"[") > MAX_CONTAINERS:
        raise BadBody(f"the body holds more than {MAX_CONTAINERS} objects and arrays")


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise BadBody(f"the key {name!r} appears twice in one object")
            seen.add(name)
    return body


def _constant(name: str) -> Any:
    raise BadBody(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadBody(f"the number {text[:40]} is out of range")
    return value


#: The strict decoder, made once (C{json.loads} with hooks makes one per call).
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_finite)


def _depth(value: Any) -> int:
    """
    The nesting depth of C{value}, walked a level at a time without
    recursion, stopping past L{MAX_DEPTH}: every value is looked at once,
    by a type test (a real agent's 50 KB body in about 45 us).
    """
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return depth
        deeper: list = []
        add = deeper.append
        for item in level:
            for child in item.values() if type(item) is dict else item:
                kind = type(child)
                if kind is dict or kind is list:
                    add(child)
        level = deeper
    return depth


#: Bodies from this size have their depth walked at once: counting their
#: brackets first (to skip the walk) costs about as much, and a real
#: agent's body has more than L{MAX_DEPTH} of them anyway.
_WALKED_FROM = 4096


#: The bytes at a body's start that say how it was written: a first key
#: followed by C{": } (Python's C{json.dumps} by default, any pretty
#: printer) is no compact body.
_HEAD = 256


def _read_compact(raw: bytes) -> dict | None:
    """
    C{raw}'s JSON object read by C{orjson}, when C{raw} is written compactly
    and C{orjson} writes what it read back as the very same bytes; else
    L{None} (the strict decoder reads it, and says what is wrong).

    The same bytes written back is the proof that the reading is the
    strict decoder's: a key twice would be written once, a number or an
    escape read otherwise would be written otherwise (an integer past 64
    bits, C{1E5}, C{\\u00e9}), and C{orjson} refuses what the strict
    decoder refuses (not UTF-8, C{NaN}, a double out of range, a lone
    surrogate).  Compact is how Node's C{JSON.stringify}, Rust's
    C{serde_json} and compact Python clients write: Claude Code's and
    Codex's bodies, tens of KB each, are read here at C speed (a 50 KB body
    in about 60 us, against 155 for the decoder whose hook sees each object).
    """
    if _write_compact is None:
        return None
    if raw.find(b'": ', 0, _HEAD) >= 0 or raw.find(b'" :', 0, _HEAD) >= 0:
        return None
    try:
        body = _verify(raw)
    except ValueError:
        return None
    if type(body) is not dict:
        return None
    try:
        written = _write_compact(body)
    except TypeError:  # nested past orjson's own writing limit (254): the decoder reads it, and the depth refuses it
        return None
    if written != raw and written != raw.rstrip(b" \t\r\n"):
        return None
    return body


def read_strict(raw: bytes) -> dict:
    """
    The JSON object of C{raw}, read strictly.

    @raise BadBody: a byte order mark, bytes that are not UTF-8, no JSON
        object, a duplicate key, C{NaN} or C{Infinity}, a number out of a
        double's range, a lone surrogate, nesting deeper than L{MAX_DEPTH}.
    """
    if raw.startswith(_BOM):
        raise BadBody("the body starts with a byte order mark")
    body = _read_compact(raw)
    if body is None:
        body = _decode_strictly(raw)
    if (len(raw) >= _WALKED_FROM or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH) and _depth(body) > MAX_DEPTH:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels")
    return body


def _decode_strictly(raw: bytes) -> dict:
    """C{raw}'s JSON object read by the strict decoder (L{read_strict}'s refusals, but for the depth)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8") from None
    try:
        body = _STRICT_DECODER.decode(text)
    except RecursionError:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except BadBody:
        raise
    except ValueError as error:
        raise BadBody(f"the body is not JSON ({error})") from None
    if type(body) is not dict:
        raise BadBody("the body is not a JSON object")
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(text) is not None:
        _check_surrogates(raw)
    return body


def _check_surrogates(raw: bytes) -> None:
    """Refuse a lone surrogate escape (a body the fast reader refuses and Python backends accept)."""
    if _verify is not None:
        try:
            _verify(raw)
        except ValueError as error:
            raise BadBody(f"the body is not JSON ({error})") from None
        return
    try:
        json.dumps(json.loads(raw), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadBody("the body holds a lone UTF-16 surrogate") from None


def _integer(body: dict, field: str, lowest: int, highest: int) -> None:
    value = body[field]
    if type(value) is not int:
        raise BadBody(f"{field!r} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
    if not lowest <= value <= highest:
        raise BadBody(f"{field!r} must be from {lowest} to {highest}, got {value}")


def strict_fields(body: dict, max_messages: int) -> None:
    """
    Check the fields the gateway decides by: C{model} a string, C{stream}
    a boolean, the token maxima integers up to L{MAX_TOKENS}, C{n} from 1
    to L{MAX_CHOICES}, C{messages} (or C{input}) a list of at most
    C{max_messages}.

    @raise BadBody: naming the first field that is not.
    """
    if "model" in body and type(body["model"]) is not str:
        raise BadBody("'model' must be a string")
    if "stream" in body and type(body["stream"]) is not bool:
        raise BadBody(f"'stream' must be true or false, got {str(body['stream'])[:40]!r}")
    for field in TOKEN_FIELDS:
        if field in body and body[field] is not None:
            _integer(body, field, 0, MAX_TOKENS)
    if "n" in body and body["n"] is not None:
        _integer(body, "n", 1, MAX_CHOICES)
    if "stream_options" in body and body["stream_options"] is not None and type(body["stream_options"]) is not dict:
        raise BadBody("'stream_options' must be an object")
    if "messages" in body and type(body["messages"]) is not list:
        raise BadBody("'messages' must be an array")
    _check_items(body, max_messages)


def _check_items(body: dict, max_messages: int) -> None:
    """Refuse C{messages} (or C{input}) of more than C{max_messages} items."""
    for field in ("messages", "input"):
        items = body.get(field)
        if type(items) is list and len(items) > max_messages:
            raise BadBody(f"{field!r} holds {len(items)} items, more than the {max_messages} a request may have")
