"""
A fake backend speaking Anthropic's Messages API for integration tests, run
as its own process:

    python tests/anthropic_backend.py PORT

It listens on 127.0.0.1:PORT (0: any free port) and prints "listening
PORT" once ready.  It serves C{POST .../v1/messages}, JSON or streamed as
the API documents its event sequence (C{message_start},
C{content_block_start}, C{ping}, C{content_block_delta}s,
C{content_block_stop}, C{message_delta} with the usage,
C{message_stop}); what it does is chosen by the C{model} the gateway
sends it:

    cut40         a stream that breaks (connection reset) after 40 of 60 words
    overloaded    529 overloaded_error every time
    overloaded1   529 overloaded_error on the first request, then normal
    limited       429 rate_limit_error with retry-after: 1
    context       400 invalid_request_error "prompt is too long"
    error-event   a stream whose first event is an error event (overloaded)

The answer is the same 60 words as the fake OpenAI backend's, "w1 w2 ...
w60 ".  Like the real API it refuses a final assistant turn ending in
whitespace, and continues one (a prefill) from where it ends.  Given
C{tools}, a request whose last turn holds no C{tool_result} is answered
with a C{tool_use} of the first tool (its input streamed in pieces), and
one that holds a result with "The tool said: <result>".  A stop sequence
that is one of the words ends the answer before it (C{stop_sequence}).
With C{thinking} enabled it checks what the API checks (a budget of
1024 or more below C{max_tokens}, no C{temperature}, and an assistant
turn with a tool use that begins with the signed thinking block this
backend gave, as it gave it) and begins its answer with that block
(streamed as C{thinking_delta}s and a C{signature_delta}).
C{GET /calls} says, per model, how many requests came, the last one's
headers of interest and body.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from fake_values import example_of, tool_call

WORDS = [f"w{i} " for i in range(1, 61)]
FULL = "".join(WORDS)
CALLS: dict[str, dict] = {}
INTERVAL = 0.003
THOUGHT = "The user wants the weather; I will call the tool."
SIGNATURE = "sig_fake_EqQBCkYIBRgCIkDm"
THINKING_BLOCK = {"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}


def _thinking_refusal(body: dict) -> str | None:
    """What the real API says of a request with thinking enabled that it refuses, or None."""
    thinking = body.get("thinking") or {}
    if thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024 or budget >= body.get("max_tokens", 0):
        return "thinking.budget_tokens: must be at least 1024 and less than max_tokens"
    if body.get("temperature") not in (None, 1):
        return "temperature may only be set to 1 when thinking is enabled"
    for message in body.get("messages", []):
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        if any(block.get("type") == "tool_use" for block in content) and content[0] != THINKING_BLOCK:
            return ("messages: Expected `thinking` or `redacted_thinking`, but found `" + str(content[0].get("type"))
                    + "`. When `thinking` is enabled, an assistant message with a tool use must start with its thinking block")
    return None


def _json(request, body, code=200, headers=()) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"request-id", b"req_fake")
    for name, value in headers:
        request.setHeader(name, value)
    return json.dumps(body).encode()


def _error(request, code, kind, message, headers=()) -> bytes:
    return _json(request, {"type": "error", "error": {"type": kind, "message": message}}, code, headers)


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def _answer(body: dict) -> tuple[list[dict], str, str | None, list[str]]:
    """The content blocks, stop reason, stop sequence, and the text pieces a stream sends of its text."""
    messages = body.get("messages", [])
    shape = (body.get("output_config") or {}).get("format") or {}
    if shape.get("type") == "json_schema":
        # Structured output: an object of the schema.
        text = json.dumps(example_of(shape.get("schema") or {}))
        return [{"type": "text", "text": text}], "end_turn", None, [text[:5], text[5:]]
    last = messages[-1] if messages else {}
    if body.get("tools"):
        content = last.get("content")
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] if isinstance(content, list) else []
        if results:
            said = results[0].get("content")
            images = 0 if isinstance(said, str) else sum(1 for b in said or [] if b.get("type") == "image")
            said = said if isinstance(said, str) else _text_of(said or [])
            said += f" (and {images} image{'s' if images > 1 else ''})" if images else ""
            text = f"The tool said: {said}"
            return [{"type": "text", "text": text}], "end_turn", None, [text]
        tools = [(tool["name"], (tool.get("input_schema") or {}).get("properties") or {}) for tool in body["tools"]]
        name, given = tool_call(tools, body)
        blocks = [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_fake1", "name": name, "input": given},
        ]
        return blocks, "tool_use", None, ["Let me check."]
    prefill = _text_of(last.get("content", "")) if last.get("role") == "assistant" else ""
    rest = FULL[len(prefill):]
    pieces = [piece + " " for piece in rest.split(" ") if piece]
    if rest.startswith(" ") and pieces:
        pieces[0] = " " + pieces[0]
    stops = body.get("stop_sequences") or []
    for number, piece in enumerate(pieces):
        if piece.strip() in stops:
            return [{"type": "text", "text": "".join(pieces[:number])}], "stop_sequence", piece.strip(), pieces[:number]
    return [{"type": "text", "text": "".join(pieces)}], "end_turn", None, pieces


class Messages(Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path.decode().endswith("/calls"):
            return _json(request, CALLS)
        return _error(request, 404, "not_found_error", "not here")

    def render_POST(self, request):
        if request.path.decode().endswith("/v1/messages/count_tokens"):
            body = json.loads(request.content.read())
            CALLS.setdefault("count_tokens", {"count": 0})["count"] += 1
            words = sum(len(_text_of(m.get("content", "")).split()) for m in body.get("messages", []))
            return _json(request, {"input_tokens": words + 3})
        if not request.path.decode().endswith("/v1/messages"):
            return _error(request, 404, "not_found_error", "not here")
        body = json.loads(request.content.read())
        model = body.get("model")
        seen = CALLS.setdefault(model, {"count": 0})
        seen["count"] += 1
        seen["body"] = body
        for header in ("x-api-key", "anthropic-version", "anthropic-beta", "authorization"):
            seen[header] = request.getHeader(header)
        if "max_tokens" not in body:
            return _error(request, 400, "invalid_request_error", "max_tokens: Field required")
        messages = body.get("messages", [])
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant" and _text_of(last.get("content", "")) != _text_of(last.get("content", "")).rstrip():
            return _error(request, 400, "invalid_request_error", "messages: final assistant content cannot end with trailing whitespace")
        resumed = last.get("role") == "assistant"
        if model == "overloaded" or (model == "overloaded1" and seen["count"] == 1):
            return _error(request, 529, "overloaded_error", "Overloaded")
        if model == "limited":
            return _error(request, 429, "rate_limit_error", "slow down", [(b"retry-after", b"1")])
        if model == "context":
            return _error(request, 400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum")
        refusal = _thinking_refusal(body)
        if refusal is not None:
            return _error(request, 400, "invalid_request_error", refusal)
        blocks, stop_reason, stop_sequence, pieces = _answer(body)
        if (body.get("thinking") or {}).get("type") == "enabled":
            blocks = [THINKING_BLOCK, *blocks]
        input_tokens = sum(len(_text_of(m.get("content", "")).split()) for m in messages if m.get("role") == "user")
        output_tokens = len(pieces) + (5 if len(blocks) > 1 else 0)
        message = {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
        if not body.get("stream"):
            return _json(request, message)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"request-id", b"req_fake")
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": input_tokens, "output_tokens": 1}}
        events: list = [_event("message_start", {"type": "message_start", "message": start})]
        if model == "error-event":
            events.append(_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
            events.append("end")
            self._send(request, events)
            return server.NOT_DONE_YET
        for index, block in enumerate(blocks):
            if block["type"] == "thinking":
                events.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                             "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
                half = len(THOUGHT) // 2
                for piece in (THOUGHT[:half], THOUGHT[half:]):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                 "delta": {"type": "thinking_delta", "thinking": piece}}))
                events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                             "delta": {"type": "signature_delta", "signature": SIGNATURE}}))
            elif block["type"] == "text":
                events.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                             "content_block": {"type": "text", "text": ""}}))
                if index == 0:
                    events.append(_event("ping", {"type": "ping"}))
                for number, piece in enumerate(pieces, 1):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                 "delta": {"type": "text_delta", "text": piece}}))
                    if model == "cut40" and not resumed and number == 40:
                        events.append("cut")
                        self._send(request, events)
                        return server.NOT_DONE_YET
            else:
                events.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                             "content_block": {**block, "input": {}}}))
                given = json.dumps(block["input"])
                for part in (given[:3], given[3:9], given[9:]):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                 "delta": {"type": "input_json_delta", "partial_json": part}}))
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        events.append(_event("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                               "usage": {"output_tokens": output_tokens}}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        events.append("end")
        self._send(request, events)
        return server.NOT_DONE_YET

    def _send(self, request, events) -> None:
        if request._disconnected or not events:
            return
        event, rest = events[0], events[1:]
        if event == "cut":
            request.transport.abortConnection()
            return
        if event == "end":
            request.finish()
            return
        request.write(event)
        reactor.callLater(INTERVAL, self._send, request, rest)


def main() -> None:
    port = reactor.listenTCP(int(sys.argv[1]), server.Site(Messages()), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
