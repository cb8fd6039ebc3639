"""
A fast Twisted upstream for benchmarks, used when nginx is not installed,
and always for the SSE first-byte measurement:

    python bench/upstream.py PORT

GET /        -> "ok\\n" (3 bytes, Content-Length)
GET /sse     -> headers at once, then after 50 ms one event
                "data: <time.time() when written>\\n\\n", then the end.
"""

import sys
import time

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource


class Upstream(Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path.endswith(b"/sse"):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"")

            def send():
                if request._disconnected:
                    return
                request.write(b"data: %.6f\n\n" % time.time())
                request.finish()

            reactor.callLater(0.05, send)
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


if __name__ == "__main__":
    port = reactor.listenTCP(int(sys.argv[1]), server.Site(Upstream()), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()
