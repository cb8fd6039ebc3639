"""The log sink without its writer thread, and the access line (the thread: tests/integration/test_log_writer.py)."""

from __future__ import annotations

import io

from txgateway.observability.logs import AccessLog, JsonLineSink


def test_without_a_clock_each_line_is_written_at_once():
    stream = io.StringIO()
    JsonLineSink([stream]).msg('{"n": 1}')
    assert stream.getvalue() == '{"n": 1}\n'


def test_the_access_line_starts_with_timestamp_level_and_event():
    import json

    from txgateway.observability.context import RequestContext

    stream = io.StringIO()
    ctx = RequestContext(request_id="r-1", client="192.0.2.1", started_at=0.0, base_log=None)
    AccessLog(JsonLineSink([stream])).request("request_completed", ctx, method="GET", status=200)
    line = json.loads(stream.getvalue())
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["request_id"] == "r-1" and line["status"] == 200 and line["client"] == "192.0.2.1"


def test_the_access_line_follows_the_level():
    stream = io.StringIO()
    AccessLog(JsonLineSink([stream]), "warning").request("request_completed", None)
    assert stream.getvalue() == ""
