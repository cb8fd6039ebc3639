"""Eager writes: a transport without the eager path keeps its own write (real sockets: tests/integration/test_eager.py)."""

from txgateway.dataplane.eager import writer_for


def test_other_transports_use_their_own_write():
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    assert writer_for(transport) == transport.write
