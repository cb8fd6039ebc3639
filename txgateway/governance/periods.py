"""
Calendar periods in UTC, as keys: counters are kept per period and never
reset in place, so a period's end is only a new key (no reset race).
"""

from __future__ import annotations

import calendar
import time

__all__ = ["day_of", "is_current", "period_end", "period_key"]

#: The last key computed for each period, and the span of time it holds
#: for: a request's periods cost a comparison, not a calendar computation.
_LAST: dict[str, tuple[float, float, str]] = {}


def day_of(now: float) -> str:
    """The UTC day of C{now} (seconds since the epoch), as C{YYYY-MM-DD}."""
    return period_key("day", now)[1:]


def period_key(period: str, now: float) -> str:
    """
    The key of the C{period} (C{day}, C{week}, C{month} or C{total}) that
    C{now} falls in: C{d2026-12-03}, C{w2026-11-30} (weeks start on
    Monday), C{m2026-12}, C{total}.
    """
    last = _LAST.get(period)
    if last is not None and last[0] <= now < last[1]:
        return last[2]
    key = _period_key(period, now)
    end = _period_end(period, now)
    _LAST[period] = (_period_start(period, now), float("inf") if end is None else end, key)
    return key


_KINDS = {"d": "day", "w": "week", "m": "month"}


def is_current(key: str, now: float) -> bool:
    """Whether the period of C{key} (as L{period_key} makes it) is the one C{now} falls in."""
    if key == "total":
        return True
    kind = _KINDS.get(key[:1])
    return kind is not None and period_key(kind, now) == key


def _period_start(period: str, now: float) -> float:
    if period == "total":
        return float("-inf")
    moment = time.gmtime(now)
    midnight = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
    if period == "day":
        return float(midnight)
    if period == "week":
        return float(midnight - moment.tm_wday * 86400)
    return float(calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0)))


def _period_key(period: str, now: float) -> str:
    if period == "total":
        return "total"
    moment = time.gmtime(now)
    if period == "day":
        return "d" + time.strftime("%Y-%m-%d", moment)
    if period == "week":
        monday = calendar.timegm(moment) - moment.tm_wday * 86400
        return "w" + time.strftime("%Y-%m-%d", time.gmtime(monday))
    if period == "month":
        return "m" + time.strftime("%Y-%m", moment)
    raise ValueError(f"unknown budget period {period!r}")


def period_end(period: str, now: float) -> float | None:
    """When the C{period} that C{now} falls in ends (L{None} for C{total}: never)."""
    last = _LAST.get(period)
    if last is not None and last[0] <= now < last[1]:
        return None if last[1] == float("inf") else last[1]
    return _period_end(period, now)


def _period_end(period: str, now: float) -> float | None:
    if period == "total":
        return None
    moment = time.gmtime(now)
    midnight = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
    if period == "day":
        return float(midnight + 86400)
    if period == "week":
        return float(midnight + (7 - moment.tm_wday) * 86400)
    if period == "month":
        year, month = (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
        return float(calendar.timegm((year, month, 1, 0, 0, 0)))
    raise ValueError(f"unknown budget period {period!r}")
