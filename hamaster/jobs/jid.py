"""Job ids: Salt's 20-digit ``YYYYMMDDhhmmssffffff`` (local time), strictly increasing."""

from __future__ import annotations

import datetime
import re
import threading

_JID_RE = re.compile(r"^\d{20}$")
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


def is_jid(jid: str) -> bool:
    """True if ``jid`` is 20 digits."""
    return isinstance(jid, str) and bool(_JID_RE.match(jid))


def jid_to_time(jid: str) -> datetime.datetime:
    """The local time a jid was made (ValueError if it is not a jid)."""
    if not is_jid(jid):
        raise ValueError(f"invalid jid {jid!r}: expected 20 digits YYYYMMDDhhmmssffffff")
    return datetime.datetime.strptime(jid, "%Y%m%d%H%M%S%f")
