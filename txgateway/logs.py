"""
JSON lines: one object per line, to the configured file and to stdout.

structlog renders the gateway's own events; Twisted's events (listening,
shutting down, unhandled errors) are rendered by L{TwistedJsonObserver} in
the same shape, so that every line of the daemon's output is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any, Iterable

import structlog
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = ["JsonLineSink", "TwistedJsonObserver", "configure_logging", "open_sink"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_TWISTED_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


class JsonLineSink:
    """
    Writes finished lines to several streams, flushing each line so that
    C{grep} sees a request as soon as it is logged.  It is also the
    structlog "logger" at the end of the processor chain.
    """

    def __init__(self, streams: Iterable[IO[str]]) -> None:
        self._streams = list(streams)

    def msg(self, line: str) -> None:
        for stream in self._streams:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                # A closed stdout or a full disk must not take requests down.
                pass

    debug = info = warning = warn = error = critical = exception = log = msg

    def close(self) -> None:
        for stream in self._streams:
            if stream not in (sys.__stdout__, sys.__stderr__):
                stream.close()


def open_sink(path: str, stdout: IO[str] | None) -> JsonLineSink:
    """
    The sink for the C{[logging]} section: the file at C{path} (its
    directory created; empty for none) and C{stdout}.

    @raise OSError: the file cannot be opened.
    """
    streams: list[IO[str]] = []
    if stdout is not None:
        streams.append(stdout)
    if path:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        streams.append(open(path, "a", encoding="utf-8"))
    return JsonLineSink(streams)


_second_cache: list = [None, ""]


def _timestamp() -> str:
    """
    ISO 8601 UTC with milliseconds; the part up to the second is computed
    once a second.  Wall-clock time on purpose: log lines are read against
    other systems' clocks, and no behaviour depends on it.
    """
    now = time.time()
    whole = int(now)
    if _second_cache[0] != whole:
        _second_cache[:] = [whole, datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_cache[1]}.{int((now - whole) * 1000):03d}Z"


def _add_timestamp(logger: Any, method: str, event: dict) -> dict:
    event.setdefault("timestamp", _timestamp())
    return event


def configure_logging(sink: JsonLineSink, level: str = "info", cache: bool = True) -> None:
    """Point structlog at C{sink}, dropping events below C{level}."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=json.dumps, default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=cache,
    )


#: Twisted's per-connection factory messages: one pair per pooled upstream
#: connection says nothing an operator can use.
_CHATTER = ("Starting factory", "Stopping factory")


@implementer(ILogObserver)
class TwistedJsonObserver:
    """Renders Twisted's own log events as JSON lines on a L{JsonLineSink}."""

    def __init__(self, sink: JsonLineSink, level: str = "info") -> None:
        self._sink = sink
        self._minimum = _LEVELS[level]

    def __call__(self, event: dict) -> None:
        if event.get("log_format", "").startswith(_CHATTER):
            return
        level = _TWISTED_LEVELS.get(event.get("log_level"), "info")
        if _LEVELS[level] < self._minimum:
            return
        line = {
            "event": formatEvent(event) or "",
            "level": level,
            "logger": event.get("log_namespace", "twisted"),
            "timestamp": _timestamp(),
        }
        failure = event.get("log_failure")
        if failure is not None:
            line["exception"] = failure.getTraceback()
        self._sink.msg(json.dumps(line, default=str))
