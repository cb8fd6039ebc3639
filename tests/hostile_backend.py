"""
A hostile model backend for the governance tests, run as its own process:

    python tests/hostile_backend.py PORT

It listens on 127.0.0.1:PORT (0: any free port) and prints "listening
PORT".  It speaks OpenAI's chat completions (C{POST .../chat/completions})
and Anthropic's Messages (C{POST .../messages}); what it does is chosen by
the C{model} it is sent:

    negative    a JSON answer reporting negative usage
    huge        a JSON answer reporting 2**63 - 1 prompt tokens and 1e300 completion tokens
    slow-json   a JSON answer of 8,000 completion tokens after 1.5 s, made whether or not the
                client is still there (as a provider bills it)
    ignore-max  a stream of 200 words whatever max_tokens says, its usage at the end (5 prompt
                tokens: within the gateway's estimate, so that only the completion is at stake)
    long        a stream of a word every 0.2 s for 4 s, its usage at the end

Anything else answers normally (9 prompt tokens, 3 completion tokens).
C{GET /calls} lists every request it got (path, headers, body as text) and
the answers it finished making.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

CALLS: list[dict] = []
MADE: list[str] = []


def _answer(model: str, prompt, completion) -> bytes:
    return json.dumps({
        "id": "chatcmpl-h", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }).encode()


def _message(model: str) -> bytes:
    return json.dumps({
        "id": "msg_h", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 30, "output_tokens": 5},
    }).encode()


class Backend(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"calls": CALLS, "made": MADE}).encode()

    def render_POST(self, request):
        raw = request.content.read()
        CALLS.append({
            "path": request.path.decode(),
            "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": raw.decode("utf-8", "replace"),
        })
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        model = body.get("model") if isinstance(body, dict) else None
        request.setHeader(b"content-type", b"application/json")
        if request.path.endswith(b"/messages"):
            return _message(model or "claude")
        if model == "negative":
            return _answer(model, -1_000_000, -5)
        if model == "huge":
            return _answer(model, 2**63 - 1, 1e300)
        if model == "slow-json":
            def made():
                MADE.append("slow-json")
                if not request._disconnected:
                    request.write(_answer(model, 9, 8000))
                    request.finish()

            reactor.callLater(1.5, made)
            return server.NOT_DONE_YET
        if model == "long":
            request.setHeader(b"content-type", b"text/event-stream")

            def word(n: int) -> None:
                if request._disconnected:
                    return
                if n == 20:
                    usage = {"id": "c", "model": model, "choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 20}}
                    request.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
                    request.finish()
                    return
                chunk = {"id": "c", "model": model, "choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}]}
                request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                reactor.callLater(0.2, word, n + 1)

            word(0)
            return server.NOT_DONE_YET
        if model == "ignore-max":
            request.setHeader(b"content-type", b"text/event-stream")
            for n in range(200):
                chunk = {"id": "c", "model": model, "choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}]}
                request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            usage = {"id": "c", "model": model, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 200}}
            request.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            request.finish()
            return server.NOT_DONE_YET
        return _answer(model or "m", 9, 3)


def main() -> None:
    port = reactor.listenTCP(int(sys.argv[1]), server.Site(Backend()), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
