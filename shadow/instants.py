"""Timestamps compared as the instants they denote, whatever their offset."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_INSTANT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)"
)


def instant(text: str) -> tuple[datetime, str] | None:
    """The instant a timestamp with an offset denotes, as (UTC second, fraction digits).

    RFC 3339 and ISO 8601 extended calendar form; without an offset there is no instant. The
    fraction is kept as digits rather than handed to ``datetime``, which keeps microseconds
    only: nanosecond timestamps that differ in their seventh digit are different instants.
    """
    match = _INSTANT.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        offset = timedelta(0)
        if not zulu:
            offset = timedelta(hours=int(off_h), minutes=int(off_m or 0))
            if sign == "-":
                offset = -offset
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            tzinfo=timezone(offset),
        )
        return moment.astimezone(UTC), (fraction or "").rstrip("0")
    except (ValueError, OverflowError):  # 25:00, +24:00, the edges of year 1 and 9999
        return None


def same_instant(a: str, b: str) -> bool:
    moment = instant(a)
    return moment is not None and moment == instant(b)
