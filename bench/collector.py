"""
An OTLP/HTTP trace sink for benchmarks: it takes every export the
gateway sends (reads the whole body, counts the bytes) and answers what a
collector answers, so that the traced rows pay the whole export (the SDK
spans, the protobuf, the HTTP POST) and nothing is dropped:

    python bench/collector.py PORT

GET /count -> the exports and bytes taken so far, as JSON.
"""

import json
import sys

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

TAKEN = {"exports": 0, "bytes": 0}


class Sink(Resource):
    isLeaf = True

    def render_POST(self, request):
        TAKEN["exports"] += 1
        TAKEN["bytes"] += len(request.content.read())
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(TAKEN).encode()


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), server.Site(Sink()), interface="127.0.0.1")
    reactor.run()
