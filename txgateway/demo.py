"""
A small OpenAI-compatible backend to see the gateway work without writing
one:

    python -m txgateway.demo [--host 127.0.0.1] [--port 8000]

It serves, on 127.0.0.1:8000 by default (the embedded defaults' C{ai}
service, whose C{/v1} every model is routed to):

 - C{GET /v1/models}: one model, C{demo};
 - C{POST /v1/chat/completions}: a short answer that repeats the last user
   message, as JSON or, with C{"stream": true}, as server-sent events (and
   the usage chunk when C{stream_options.include_usage} asks for it);
 - C{POST /v1/embeddings}: 8 numbers per input, the same for the same text;
 - C{/slow} (any method, C{?seconds=N}, default 3): answers after a while;
 - C{/fail}: 503 every time, to watch the gateway retry and open the circuit.

Its answers are the same every time (fixed ids and times), so that the
README's "Try it" shows what a reader will see.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater, react
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

__all__ = ["DemoBackend", "main"]

#: The fixed creation time of every answer (the README shows it).
CREATED = 1764720000
#: Seconds between two streamed chunks.
CHUNK_INTERVAL = 0.05


def _reply_words(body: dict) -> list[str]:
    """The answer's words: a greeting that repeats the last user message."""
    said = ""
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            said = message["content"]
    words = ["Hello", "from", "the", "txgateway", "demo", "backend."]
    if said:
        words += ["You", "said:", *said.split()[:20]]
    return [word + " " for word in words[:-1]] + [words[-1]]


def _usage(body: dict, completion: int) -> dict:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [] if isinstance(m, dict))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(model: str, delta: dict, finish: str | None = None, choices: bool = True, usage: dict | None = None) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class DemoBackend(Resource):
    """The demo's one resource: every path is dispatched by its name."""

    isLeaf = True

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self._clock = clock

    def render(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace").rstrip("/")
        if path.endswith("/fail"):
            return self._json(request, {"error": {"message": "the demo fails on purpose", "type": "server_error"}}, 503)
        if path.endswith("/slow"):
            seconds = float((request.args.get(b"seconds") or [b"3"])[0])
            self._later(request, min(max(seconds, 0.0), 60.0), {"slow": True, "seconds": seconds})
            return NOT_DONE_YET
        if path.endswith("/models") and request.method in (b"GET", b"HEAD"):
            return self._json(request, {"object": "list", "data": [
                {"id": "demo", "object": "model", "created": CREATED, "owned_by": "txgateway-demo"}]})
        if request.method == b"POST" and path.endswith("/chat/completions"):
            return self._chat(request)
        if request.method == b"POST" and path.endswith("/embeddings"):
            return self._embeddings(request)
        return self._json(request, {"error": {"message": f"the demo serves no {path or '/'}", "type": "not_found"}}, 404)

    @staticmethod
    def _json(request: Any, body: dict, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @staticmethod
    def _body(request: Any) -> dict:
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _later(self, request: Any, seconds: float, body: dict) -> None:
        waiting: Deferred = deferLater(self._clock, seconds, lambda: None)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())

        def answer(_: object) -> None:
            request.write(self._json(request, body))
            request.finish()

        waiting.addCallbacks(answer, lambda failure: None)

    def _chat(self, request: Any) -> Any:
        body = self._body(request)
        model = body.get("model") if isinstance(body.get("model"), str) else "demo"
        words = _reply_words(body)
        if body.get("stream") is not True:
            return self._json(request, {
                "id": "chatcmpl-demo", "object": "chat.completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                "usage": _usage(body, len(words)),
            })
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        options = body.get("stream_options")
        events = [_chunk(model, {"role": "assistant", "content": ""})]
        events += [_chunk(model, {"content": word}) for word in words]
        events.append(_chunk(model, {}, finish="stop"))
        if isinstance(options, dict) and options.get("include_usage") is True:
            events.append(_chunk(model, {}, choices=False, usage=_usage(body, len(words))))
        events.append(b"data: [DONE]\n\n")
        self._stream(request, events)
        return NOT_DONE_YET

    def _stream(self, request: Any, events: list[bytes]) -> None:
        if request._disconnected:
            return
        request.write(events[0])
        if len(events) == 1:
            request.finish()
            return
        self._clock.callLater(CHUNK_INTERVAL, self._stream, request, events[1:])

    def _embeddings(self, request: Any) -> bytes:
        body = self._body(request)
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [str(item) for item in inputs or []]
        data = []
        for index, text in enumerate(texts):
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            numbers = [round(value / 2**32, 6) for value in struct.unpack(">8I", digest)]
            data.append({"object": "embedding", "index": index, "embedding": numbers})
        tokens = sum(len(text.split()) for text in texts)
        return self._json(request, {
            "object": "list", "data": data, "model": body.get("model", "demo"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })


def main(reactor: Any, *argv: str) -> Deferred:
    """Serve the demo until interrupted (C{react}'s entry point)."""
    parser = argparse.ArgumentParser(prog="python -m txgateway.demo", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000)")
    args = parser.parse_args(argv)
    try:
        port = reactor.listenTCP(args.port, Site(DemoBackend(reactor)), interface=args.host)
    except CannotListenError as error:
        print(f"txgateway demo: cannot listen on {args.host}:{args.port}: {error.socketError}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"txgateway demo backend listening on http://{args.host}:{port.getHost().port}", flush=True)
    return Deferred()  # until interrupted


if __name__ == "__main__":
    react(main, sys.argv[1:])
