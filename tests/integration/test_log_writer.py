"""The log sink's batches on the clock and its writer thread (a real thread): nothing lost, the caller never blocked."""

from __future__ import annotations

import io
import threading

import pytest
from twisted.internet.task import Clock

from txgateway.observability import logs
from txgateway.observability.logs import JsonLineSink

pytestmark = pytest.mark.integration


class SlowStream(io.StringIO):
    """A stream whose writes wait until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.writer_threads: set[str] = set()

    def write(self, text: str) -> int:
        self.gate.wait(5)
        self.writer_threads.add(threading.current_thread().name)
        return super().write(text)


def test_lines_wait_for_their_batch_then_all_are_written():
    clock, stream = Clock(), io.StringIO()
    sink = JsonLineSink([stream], clock)
    sink.msg('{"n": 1}')
    sink.msg('{"n": 2}')
    sink.sync()
    assert stream.getvalue() == '{"n": 1}\n{"n": 2}\n'
    sink.msg('{"n": 3}')
    assert clock.getDelayedCalls()[0].getTime() == logs.FLUSH_INTERVAL
    clock.advance(logs.FLUSH_INTERVAL)
    sink.sync()
    assert stream.getvalue().endswith('{"n": 3}\n')
    assert clock.getDelayedCalls() == []
    sink.close()


def test_a_full_batch_goes_at_once():
    clock, stream = Clock(), io.StringIO()
    sink = JsonLineSink([stream], clock)
    for n in range(logs.MAX_BUFFERED):
        sink.msg(f'{{"n": {n}}}')
    assert clock.getDelayedCalls() == []  # handed on without waiting for the timer
    sink.sync()
    assert stream.getvalue().count("\n") == logs.MAX_BUFFERED
    sink.close()


def test_a_stalled_stream_never_blocks_the_caller_until_the_writer_is_far_behind():
    clock, stream = Clock(), SlowStream()
    sink = JsonLineSink([stream], clock)
    for n in range(3):
        sink.msg(f'{{"n": {n}}}')
        sink.flush()  # returns although the stream is stuck
    assert stream.getvalue() == ""
    stream.gate.set()
    sink.sync()
    assert stream.getvalue() == '{"n": 0}\n{"n": 1}\n{"n": 2}\n'
    assert stream.writer_threads == {"txgateway-log-writer"}
    sink.close()
