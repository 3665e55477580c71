"""Job ids: Salt's 20-digit ``YYYYMMDDhhmmssffffff`` (local time), strictly increasing.

What a valid jid is lives in :mod:`hamaster.ids` (one rule for every layer).
"""

from __future__ import annotations

import datetime
import threading

from hamaster import ids

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_lock = threading.Lock()
_last: datetime.datetime | None = None


def gen_jid() -> str:
    """A new jid from the local clock; strictly greater than any earlier jid of this process."""
    global _last
    with _lock:
        now = datetime.datetime.now()
        if _last is not None and now <= _last:
            now = _last + datetime.timedelta(microseconds=1)
        _last = now
        return now.strftime("%Y%m%d%H%M%S%f")


def is_jid(jid: object) -> bool:
    """True if ``jid`` is a valid Salt jid (:func:`hamaster.ids.valid_jid`)."""
    return ids.valid_jid(jid)


def jid_to_time(jid: object) -> datetime.datetime:
    """The local time a jid was made (ValueError if it is not a valid jid)."""
    when = ids.jid_time(jid)
    if when is None:
        ids.check_jid(jid)  # raises with the reason
    assert when is not None
    return when


def start_time(jid: object) -> str:
    """Salt's ``StartTime`` of a jid, ``2026, Dec 06 12:00:00.123456`` (English month names
    whatever the locale, as Salt prints them); ``""`` if ``jid`` is not a valid jid."""
    when = ids.jid_time(jid)
    if when is None:
        return ""
    return (f"{when.year:04d}, {_MONTHS[when.month - 1]} {when.day:02d} "
            f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}.{when.microsecond:06d}")
