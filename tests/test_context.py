"""Request ids and client addresses."""

import ipaddress
import uuid

from hypothesis import given
from hypothesis import strategies as st

from txgateway.dataplane.server import IncomingRequest
from txgateway.ids import request_id_for
from txgateway.observability.context import client_address


def test_a_short_safe_request_id_is_kept():
    assert request_id_for(b"req-1_a.b:c") == "req-1_a.b:c"
    assert request_id_for(b"x" * 128) == "x" * 128


def test_an_unsafe_or_long_request_id_is_replaced_by_a_uuid():
    for sent in [b"", b"x" * 129, b"a b", b"a\r\nSet-Cookie: x", b'{"level":"critical"}', b"\xff", None]:
        replaced = request_id_for(sent)
        assert str(uuid.UUID(replaced)) == replaced


@given(st.binary(max_size=200))
def test_any_request_id_is_safe_for_a_header_and_a_log_field(sent):
    result = request_id_for(sent)
    assert 1 <= len(result) <= 128
    assert all(c.isalnum() or c in "-_.:" for c in result)


def _request(peer, forwarded=None):
    headers = [(b"X-Forwarded-For", forwarded)] if forwarded else []
    return IncomingRequest(None, b"GET", b"/", headers, client_host=peer)


def test_client_is_the_socket_peer_by_default():
    assert client_address(_request("10.1.1.1", b"6.6.6.6")) == "10.1.1.1"


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address(_request("10.1.1.1", b"6.6.6.6, 10.2.2.2"), trusted) == "6.6.6.6"
    assert client_address(_request("192.0.2.7", b"6.6.6.6"), trusted) == "192.0.2.7"


def test_a_forged_forwarded_for_entry_stops_the_chain():
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address(_request("10.1.1.1", b"6.6.6.6, bogus"), trusted) == "10.1.1.1"
