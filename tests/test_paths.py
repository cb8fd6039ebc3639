"""Joining a client path onto a service's base URL, and nothing outside it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txgateway.routing.paths import UnsafePath, checked_rest, split_api_path, upstream_url


def test_prefix_is_stripped_and_rest_appended_to_the_base_path():
    assert upstream_url("http://h:8000/v1", b"/chat/completions", b"x=1") == b"http://h:8000/v1/chat/completions?x=1"


def test_bare_service_path_goes_to_the_base_url():
    assert upstream_url("http://h:8000/v1", b"") == b"http://h:8000/v1"
    assert upstream_url("http://h:8000", b"/") == b"http://h:8000/"


def test_split_names_the_service_and_keeps_the_rest_raw():
    assert split_api_path(b"/api/ai/v1/models%2Fx") == ("ai", b"/v1/models%2Fx")
    assert split_api_path(b"/api/ai") == ("ai", b"")


@pytest.mark.parametrize("path", [b"/api/", b"/api//x", b"/other/ai", b"/api/\xff/x"])
def test_split_refuses_paths_without_a_service(path):
    with pytest.raises(UnsafePath):
        split_api_path(path)


def test_percent_encoding_is_forwarded_as_sent():
    assert upstream_url("http://h", b"/models/a%20b") == b"http://h/models/a%20b"


def test_runs_of_slashes_fold_into_one():
    assert upstream_url("http://h/v1", b"//evil.example/x//y") == b"http://h/v1/evil.example/x/y"


@pytest.mark.parametrize(
    "rest",
    [
        b"/../admin",
        b"/a/../../admin",
        b"/%2e%2e/admin",
        b"/%2E%2E/admin",
        b"/..%2fadmin",
        b"/%2e%2e%2fadmin",
        b"/%252e%252e/admin",
        b"/%25252e%25252e/admin",
        b"/..\\admin",
        b"/..%5cadmin",
        b"/./x",
        b"/a%00b",
        b"/a b",
        b"/a\r\nX-Injected: 1",
        b"/caf\xc3\xa9",
    ],
)
def test_nothing_reaches_outside_the_base_path(rest):
    with pytest.raises(UnsafePath):
        upstream_url("http://h/v1", rest)


@pytest.mark.parametrize("query", [b"a=1 2", b"a=\r\n", b"a=\x00"])
def test_a_query_with_raw_control_characters_is_refused(query):
    with pytest.raises(UnsafePath):
        upstream_url("http://h", b"/x", query)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes_either_join_under_the_base_or_raise_unsafe_path(rest):
    try:
        url = upstream_url("http://h:1/base", rest)
    except UnsafePath:
        return
    assert url.startswith(b"http://h:1/base")
    tail = url[len(b"http://h:1/base"):]
    assert tail == b"" or tail.startswith(b"/")
    assert b"//" not in tail


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "%2e", "%2E", "%2f", "%252e", "a", "%5c", "/", "\\"]), max_size=12))
def test_no_spelling_of_dot_dot_survives(parts):
    rest = ("/" + "".join(parts)).encode()
    try:
        url = upstream_url("http://h/base", rest)
    except UnsafePath:
        return
    from urllib.parse import unquote

    decoded = url.decode()
    for _ in range(5):
        decoded = unquote(decoded)
    segments = decoded.replace("\\", "/").split("/")
    assert ".." not in segments and "." not in segments


@pytest.mark.parametrize(
    "rest",
    [b"/a/..;/admin", b"/a/.;/b", b"/a/..;x=1/admin", b"/a/%2e%2e;/admin", b"/a/%2E%2E%3B/admin", b"/a/%252e%252e;/admin",
     b"/..;", b"/a/.%3bjsessionid=1/b"],
)
def test_a_dot_segment_with_path_parameters_is_refused_like_a_dot_segment(rest):
    with pytest.raises(UnsafePath):
        checked_rest(rest)


def test_a_segment_that_only_starts_with_dots_and_a_semicolon_is_no_dot_segment():
    assert checked_rest(b"/a/...;/b") == b"/a/...;/b"
    assert checked_rest(b"/a/b;c=..") == b"/a/b;c=.."
