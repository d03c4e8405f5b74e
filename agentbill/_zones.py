"""Time zones for calendar periods, in a form a Lua script can read.

Redis has no time zone database, so ``set_budget(..., tz=...)`` stores the zone's UTC offsets as
a table, ``"<utc_ms>:<offset_ms>,..."`` (ascending; each offset holds from its instant until the
next), computed here from the IANA database (``zoneinfo``) for a window of :data:`YEARS_AHEAD`
years. The scripts find the period of Redis ``TIME`` in it. Past the window the last offset
holds: setting the budget again refreshes the table.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

YEARS_AHEAD = 20
BEFORE = -(2**53 - 1)  # "since always": the first offset of the table


def _offset_ms(zone: ZoneInfo, seconds: int) -> int:
    offset = datetime.fromtimestamp(seconds, tz=UTC).astimezone(zone).utcoffset()
    assert offset is not None
    return int(offset.total_seconds() * 1000)


def zone_table(tz: str, today: date | None = None) -> str:
    """The UTC offsets of ``tz`` from a year ago to YEARS_AHEAD years ahead ('' for UTC)."""
    return _table(tz, today or datetime.now(UTC).date())


@lru_cache(maxsize=256)
def _table(tz: str, today: date) -> str:
    zone = ZoneInfo(tz)
    start = int(datetime.combine(today - timedelta(days=366), datetime.min.time(), UTC).timestamp())
    end = start + (YEARS_AHEAD + 1) * 366 * 86400
    first = _offset_ms(zone, start)
    entries = [(BEFORE, first)]
    t, current = start, first
    while t < end:
        step = min(t + 86400, end)  # transitions are never a day apart
        offset = _offset_ms(zone, step)
        if offset != current:
            lo, hi = t, step  # the offset changes in (lo, hi]: find the first second of it
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset_ms(zone, mid) == current:
                    lo = mid
                else:
                    hi = mid
            entries.append((hi * 1000, offset))
            current = offset
        t = step
    if len(entries) == 1 and first == 0:
        return ""
    return ",".join(f"{at}:{offset}" for at, offset in entries)
