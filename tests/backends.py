"""
A real backend for integration tests, run as its own process:

    python tests/backends.py PORT [CERT KEY]      (BACKEND_DELAY=0.2: every answer that late)

It listens on 127.0.0.1:PORT and prints "listening PORT" once ready.  Its
paths (under any prefix, so that a service base path can be tested):

    .../echo...              the request as JSON (method, uri, headers, body)
    .../sse?n=5&interval=0.2 a server-sent-event token stream
    .../status/CODE          that status (query retry_after=N sets Retry-After)
    .../flaky/KEY?fail=N     500 (or code=...) N times for KEY, then 200
    .../slow?delay=1         answers "slow answer" after the delay
    .../hang                 never answers
    .../stall                headers and one chunk, then silence
    .../reset                headers and one chunk, then a reset connection
    .../bytes?size=N         N bytes with a Content-Length
    .../calls                {"count": requests so far, "disconnects": ...}
    .../v1/models            an OpenAI-style model list
    .../v1/chat/completions  an OpenAI-compatible chat completion (stream too;
                             under .../cut/..., the stream breaks after two chunks)
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

CALLS = {"count": 0, "disconnects": 0, "by_path": {}}
FLAKY: dict[str, int] = {}


def _query(request) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(request.uri.decode()).query).items()}


def _json(request, body, code=200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


def _counted_disconnect(request) -> None:
    def lost(failure):
        CALLS["disconnects"] += 1

    request.notifyFinish().addErrback(lost)


DELAY = float(os.environ.get("BACKEND_DELAY", "0"))


class Backend(Resource):
    isLeaf = True

    def render(self, request):
        if DELAY and not request.path.endswith(b"/calls"):
            # A slow instance: every answer (but /calls) waits BACKEND_DELAY seconds.
            def answer():
                if not request._disconnected:
                    body = self._render(request)
                    if body is not server.NOT_DONE_YET:
                        request.write(body)
                        request.finish()

            call = reactor.callLater(DELAY, answer)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        return self._render(request)

    def _render(self, request):
        path = request.path.decode()
        if path.endswith("/calls"):
            return _json(request, CALLS)
        CALLS["count"] += 1
        CALLS["by_path"][path] = CALLS["by_path"].get(path, 0) + 1
        query = _query(request)
        if "/echo" in path:
            request.content.seek(0)
            return _json(
                request,
                {
                    "method": request.method.decode(),
                    "uri": request.uri.decode(),
                    "headers": {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()},
                    "body": request.content.read().decode("utf-8", "replace"),
                },
            )
        if path.endswith("/sse"):
            return self._sse(request, int(query.get("n", 5)), float(query.get("interval", 0.2)))
        if "/status/" in path:
            code = int(path.rsplit("/", 1)[1])
            if "retry_after" in query:
                request.setHeader(b"retry-after", query["retry_after"].encode())
            return _json(request, {"status": code}, code)
        if "/flaky/" in path:
            key = path.rsplit("/", 1)[1]
            FLAKY[key] = FLAKY.get(key, 0) + 1
            if FLAKY[key] <= int(query.get("fail", 2)):
                return _json(request, {"attempt": FLAKY[key], "ok": False}, int(query.get("code", 500)))
            return _json(request, {"attempt": FLAKY[key], "ok": True})
        if path.endswith("/slow"):
            call = reactor.callLater(float(query.get("delay", 1)), lambda: (request.write(b"slow answer"), request.finish()))
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        if path.endswith("/hang"):
            _counted_disconnect(request)
            return server.NOT_DONE_YET
        if path.endswith("/stall"):
            _counted_disconnect(request)
            request.write(b"first chunk\n")
            return server.NOT_DONE_YET
        if path.endswith("/reset"):
            request.setHeader(b"content-length", b"1000")
            request.write(b"partial")
            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        if path.endswith("/bytes"):
            size = int(query.get("size", 1024))
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * size
        if path.endswith("/v1/models"):
            return _json(request, {"object": "list", "data": [{"id": "tiny-1", "object": "model", "created": 0, "owned_by": "tests"}]})
        if path.endswith("/v1/chat/completions"):
            return self._chat(request)
        return _json(request, {"error": "no such test path", "path": path}, 404)

    def _sse(self, request, count: int, interval: float, render=None, cut_after: int | None = None):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        _counted_disconnect(request)
        render = render or (lambda n: b"data: token%d %.6f\n\n" % (n, time.time()))
        state = {"n": 0, "call": None}

        def tick():
            if request._disconnected:
                return
            if state["n"] >= count:
                request.finish()
                return
            if cut_after is not None and state["n"] >= cut_after:
                request.channel.transport.abortConnection()  # the stream breaks mid-answer
                return
            request.write(render(state["n"]))
            state["n"] += 1
            state["call"] = reactor.callLater(interval, tick)

        def stop(_):
            if state["call"] is not None and state["call"].active():
                state["call"].cancel()

        request.notifyFinish().addBoth(stop)
        tick()
        return server.NOT_DONE_YET

    def _chat(self, request):
        request.content.seek(0)
        body = json.loads(request.content.read() or b"{}")
        words = ["Hello", " from", " the", " test", " backend."]
        base = {"id": "chatcmpl-test", "created": 1700000000, "model": body.get("model", "tiny-1")}
        if not body.get("stream"):
            return _json(
                request,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
                },
            )

        def chunk(n: int) -> bytes:
            if n == len(words):
                return b"data: [DONE]\n\n"
            delta = {"role": "assistant", "content": words[n]} if n == 0 else {"content": words[n]}
            finish = "stop" if n == len(words) - 1 else None
            event = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        # Under a .../cut/... base path the stream breaks after two chunks.
        cut_after = 2 if "/cut/" in request.path.decode() else None
        return self._sse(request, len(words) + 1, 0.02, chunk, cut_after)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if len(sys.argv) > 3:  # python tests/backends.py PORT CERT KEY: over TLS
        from twisted.internet import ssl

        context = ssl.DefaultOpenSSLContextFactory(sys.argv[3], sys.argv[2])
        listening = reactor.listenSSL(port, server.Site(Backend()), context, interface="127.0.0.1")
    else:
        listening = reactor.listenTCP(port, server.Site(Backend()), interface="127.0.0.1")
    print(f"listening {listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
