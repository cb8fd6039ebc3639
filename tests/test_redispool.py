"""Redis URLs: one server, or the Sentinels that know a master (parsed without connecting)."""

from __future__ import annotations

import pytest

from txgateway.redispool import RedisAddress, command_bytes, parse_redis_url


def test_one_server():
    assert parse_redis_url("redis://10.0.0.5:6380/2") == RedisAddress("10.0.0.5", 6380, 2)
    assert parse_redis_url("redis://cache.internal") == RedisAddress("cache.internal", 6379, 0)
    with_password = parse_redis_url("redis://gw:p%40ss@127.0.0.1:6379/0")
    assert (with_password.username, with_password.password) == ("gw", "p@ss")
    assert "p@ss" not in repr(with_password) and "p@ss" not in with_password.described
    assert parse_redis_url("redis://:secret@[::1]:6379/1") == RedisAddress("::1", 6379, 1, None, "secret")


def test_the_sentinels_of_a_master():
    address = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26379, 10.0.0.2:26380,sentinel-3/mymaster/3")
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379))
    assert (address.master, address.db, address.password, address.host) == ("mymaster", 3, "pw", None)
    assert address.described == "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-3:26379/mymaster/3"
    assert parse_redis_url("redis+sentinel://127.0.0.1:26379/m").db == 0


@pytest.mark.parametrize(
    "url, says",
    [
        ("rediss://h:1/0", "expected redis://host:port/db or redis+sentinel://"),
        ("redis://h:1,h:2/0", "expected redis://host:port/db"),
        ("redis://h:99999/0", "expected host:port"),
        ("redis://h:1/a/b", "expected a database number"),
        ("redis+sentinel:///m", "expected at least one Sentinel"),
        ("redis+sentinel://h:1/", "expected the master's name"),
        ("redis+sentinel://h:1/m/x", "expected the master's name (and a database number)"),
    ],
)
def test_what_is_not_a_redis_url_says_what_is_expected(url, says):
    with pytest.raises(ValueError, match=None) as raised:
        parse_redis_url(url)
    assert says in str(raised.value)


@pytest.mark.parametrize("charset", ["utf-8", None])
def test_a_command_is_written_as_txredisapi_writes_it_in_one_pass(charset):
    import txredisapi

    protocol = txredisapi.RedisProtocol(charset=charset)
    args = ("EVALSHA", "ab12", 1, "txgateway:gov:", "1780000000.25", '{"s":"é \\u2603"}', b"\x00raw\r\n", 0, -7, 2.5, bytearray(b"ba"), 10**20, "")
    assert command_bytes(args, charset, "strict", protocol._encode_value) == protocol._build_command(*args)
