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

__all__ = ["BYTES_PER_TOKEN", "MESSAGE_TOKENS", "Prices", "completion_cap", "estimate_prompt_tokens", "relayed_tokens"]

#: Bytes of text counted as one token by the estimate.
BYTES_PER_TOKEN = 3
#: Tokens counted for each chat message's framing (role, separators).
MESSAGE_TOKENS = 4


def _text_bytes(value: Any) -> int:
    """The UTF-8 bytes of the text in a JSON value (strings anywhere in it)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(item) for item in value.values())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return len(str(value))  # token ids given as numbers count as text too
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens reserved for an OpenAI (or Messages) request body (see the module's rule)."""
    text = 0
    framing = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and type(message.get("content")) is str and len(message) == 2:
                # The common message, {"role": ..., "content": "..."}, without the walk.
                text += len(message["content"].encode("utf-8", "replace")) + len(str(message.get("role", "")).encode("utf-8", "replace"))
            else:
                text += _text_bytes(message)
        framing += MESSAGE_TOKENS * len(messages)
    for field in ("prompt", "input", "system", "tools", "functions", "response_format"):
        if field in body:
            value = body[field]
            text += _text_bytes(value) if field in ("prompt", "input", "system") else len(json.dumps(value))
    return math.ceil(text / BYTES_PER_TOKEN) + framing


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
        self._dearest: dict[tuple, list[ModelPrice]] = {}

    def priced(self, model: str) -> bool:
        """Whether C{model} has a price (its own, or C{[price:*]})."""
        return model in self._prices or "*" in self._prices

    def of(self, model: str | None) -> ModelPrice:
        """The price of C{model} as sent to a backend."""
        if model is not None and model in self._prices:
            return self._prices[model]
        return self._prices.get("*", FREE)

    def dearest(self, models: list[str | None], prompt_tokens: int, completion_tokens: int) -> int:
        """What C{prompt_tokens} and C{completion_tokens} cost at the dearest of C{models}, in nano-dollars."""
        key = tuple(models)
        prices = self._dearest.get(key)
        if prices is None:
            # The distinct prices of these models, once (free ones left out: they cost 0).
            distinct = {(price.prompt, price.completion, price.cached_prompt): price for price in map(self.of, models)}
            prices = self._dearest[key] = [price for price in distinct.values() if price.prompt or price.completion]
        if not prices:
            return 0
        if len(prices) == 1:
            return prices[0].cost_nano(prompt_tokens, completion_tokens)
        return max(price.cost_nano(prompt_tokens, completion_tokens) for price in prices)
