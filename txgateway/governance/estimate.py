"""
What a request may cost before it is sent, and what it cost after: the
prompt's tokens estimated from its body, the most it may complete, and
the price of the model each target is sent.

The prompt estimate is deliberately on the high side: one token per
three bytes (UTF-8) of the text the body carries (messages' contents,
a prompt, an embedding's input, a Messages request's system prompt,
tools), plus 4 tokens per chat message
for its framing.  OpenAI's and most open models' tokenizers average
about four bytes a token on English text, so the estimate reserves
about a third more than the backend will report; the settle gives the
difference back.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from txgateway.config.keys import FREE, ModelPrice

try:
    from orjson import dumps as _json_bytes
except ImportError:  # PyPy: the standard library's text, alike
    _json_bytes = None

__all__ = ["BYTES_PER_TOKEN", "IMAGE_TOKENS", "MESSAGE_TOKENS", "Prices", "completion_cap", "estimate_prompt_tokens", "relayed_tokens", "worst_cost"]

#: Bytes of text counted as one token by the estimate.
BYTES_PER_TOKEN = 3
#: Tokens counted for each chat message's framing (role, separators).
MESSAGE_TOKENS = 4


#: The prompt tokens one image is reserved as: the most the providers'
#: published rules count for one (OpenAI's high-detail tiles, at most 1,445;
#: its patch-counted models, at most 1,536 patches times 1.72, 2,642;
#: Anthropic's, about 1,600 for the largest image it takes).  An image's
#: URL or base64 data is not counted as text.
IMAGE_TOKENS = 2_700
#: An image asked for at C{"detail": "low"}: OpenAI's fixed count.
LOW_DETAIL_IMAGE_TOKENS = 85
#: The content part types that carry an image (OpenAI's chat and Responses, Anthropic's).
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def _image_tokens(part: dict, image_tokens: int) -> int:
    detail = part.get("detail")
    image = part.get("image_url")
    if isinstance(image, dict):
        detail = image.get("detail", detail)
    return min(LOW_DETAIL_IMAGE_TOKENS, image_tokens) if detail == "low" else image_tokens


def _text_bytes(value: Any, image_tokens: int = IMAGE_TOKENS) -> int:
    """
    What a JSON value weighs in the estimate, in bytes of text: the UTF-8
    bytes of its strings anywhere in it, numbers as their digits, and each
    image part as C{image_tokens} (in bytes: times L{BYTES_PER_TOKEN}).
    Walked without recursion, however deep the value nests.
    """
    total = 0
    pending = [value]
    pop, extend = pending.pop, pending.extend
    while pending:
        item = pop()
        kind = type(item)
        if kind is str:
            # An ASCII string's length is its bytes' (a flag CPython keeps: no copy made to count them).
            total += len(item) if item.isascii() else len(item.encode("utf-8", "replace"))
        elif kind is dict:
            if item.get("type") in _IMAGE_PARTS:
                total += _image_tokens(item, image_tokens) * BYTES_PER_TOKEN
                continue
            extend(item.values())
        elif kind is list:
            extend(item)
        elif kind is int or kind is float:
            total += len(str(item))  # token ids given as numbers count as text too
    return total


def estimate_prompt_tokens(body: Mapping[str, Any], image_tokens: int = IMAGE_TOKENS) -> int:
    """
    The prompt tokens reserved for an OpenAI (or Messages) request body
    (see the module's rule), each image counted as C{image_tokens}.
    """
    text = 0
    framing = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        text += _text_bytes(messages, image_tokens)  # one walk for them all
        framing += MESSAGE_TOKENS * len(messages)
    for field in ("prompt", "input", "system", "instructions", "tools", "functions", "response_format"):
        if field in body:
            value = body[field]
            text += _text_bytes(value, image_tokens) if field in ("prompt", "input", "system", "instructions") else _json_length(value)
    return math.ceil(text / BYTES_PER_TOKEN) + framing


def _json_length(value: Any) -> int:
    """C{value} as compact JSON text (tools, a response format), in UTF-8 bytes."""
    if _json_bytes is not None:
        try:
            return len(_json_bytes(value))
        except TypeError:  # past orjson's own bounds (an integer of more than 64 bits): the standard library's
            pass
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace"))


def completion_cap(body: Mapping[str, Any], generates: bool, default: int) -> int:
    """
    The most a request may complete: C{max_completion_tokens} (or
    C{max_tokens}) times C{n}; C{default} per choice when it names none;
    0 for a request that generates no text (embeddings and the like).
    """
    if not generates:
        return 0
    cap = default
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            cap = value
            break
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        cap *= choices
    return cap


def relayed_tokens(text_bytes: int, chunks: int) -> int:
    """
    The completion tokens counted for a stream that ended without its
    whole usage (the client left, the backend broke): the text relayed
    counted like a prompt (one token per L{BYTES_PER_TOKEN} bytes, on the
    high side), and at least one a content chunk (a tool call's chunks
    carry no text).
    """
    return max(math.ceil(text_bytes / BYTES_PER_TOKEN), chunks)


class Prices:
    """
    The configured prices: C{[price:MODEL]}, then C{[price:*]}, else free.
    """

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._prices = dict(prices)
        self._dearest: dict[tuple, tuple[ModelPrice, ...]] = {}

    def priced(self, model: str) -> bool:
        """Whether C{model} has a price (its own, or C{[price:*]})."""
        return model in self._prices or "*" in self._prices

    def of(self, model: str | None) -> ModelPrice:
        """The price of C{model} as sent to a backend."""
        if model is not None and model in self._prices:
            return self._prices[model]
        return self._prices.get("*", FREE)

    def distinct(self, models: list[str | None]) -> tuple[ModelPrice, ...]:
        """The distinct prices of C{models}, free ones left out (they cost 0): what prices their worst case."""
        distinct = {(price.prompt, price.completion, price.cached_prompt): price for price in map(self.of, models)}
        return tuple(price for price in distinct.values() if price.prompt or price.completion)

    def dearest(self, models: list[str | None], prompt_tokens: int, completion_tokens: int) -> int:
        """What C{prompt_tokens} and C{completion_tokens} cost at the dearest of C{models}, in nano-dollars."""
        key = tuple(models)
        prices = self._dearest.get(key)
        if prices is None:
            if len(self._dearest) >= 10_000:
                self._dearest.clear()  # client-chosen model names ([model:*]) must not grow it without bound
            prices = self._dearest[key] = self.distinct(models)
        return worst_cost(prices, prompt_tokens, completion_tokens)


def worst_cost(prices: tuple[ModelPrice, ...], prompt_tokens: int, completion_tokens: int) -> int:
    """What C{prompt_tokens} and C{completion_tokens} cost at the dearest of C{prices} (0: none), in nano-dollars."""
    if not prices:
        return 0
    if len(prices) == 1:
        return prices[0].cost_nano(prompt_tokens, completion_tokens)
    return max(price.cost_nano(prompt_tokens, completion_tokens) for price in prices)
