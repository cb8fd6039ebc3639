"""
Twisted's own ReverseProxyResource in front of an upstream, the baseline
the gateway is compared with:

    python bench/reverse_proxy.py PORT UPSTREAM_PORT
"""

import sys

from twisted.internet import reactor
from twisted.web import server
from twisted.web.proxy import ReverseProxyResource

if __name__ == "__main__":
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    site = server.Site(ReverseProxyResource("127.0.0.1", upstream, b""))
    site.noisy = False
    port = reactor.listenTCP(listen, site, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()
