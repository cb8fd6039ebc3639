"""
The floor: a pooled twisted.web.client.Agent proxy with no features at all
(no ids, limits, breakers, retries, logs or metrics), to show what
Twisted's HTTP client and server cost on their own:

    python bench/bare_agent_proxy.py PORT UPSTREAM_PORT
"""

import sys

from twisted.internet import protocol, reactor
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource


class Relay(protocol.Protocol):
    def __init__(self, request):
        self.request = request

    def dataReceived(self, data):
        self.request.write(data)

    def connectionLost(self, reason):
        if not self.request._disconnected:
            self.request.finish()


class BareProxy(Resource):
    isLeaf = True

    def __init__(self, agent, upstream):
        super().__init__()
        self.agent = agent
        self.upstream = upstream

    def render(self, request):
        def relay(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"content-length", b"%d" % response.length)
            response.deliverBody(Relay(request))

        self.agent.request(request.method, self.upstream + request.uri).addCallback(relay)
        return server.NOT_DONE_YET


if __name__ == "__main__":
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 64
    site = server.Site(BareProxy(Agent(reactor, pool=pool), b"http://127.0.0.1:%d" % upstream))
    site.noisy = False
    port = reactor.listenTCP(listen, site, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()
