"""The rules for minion ids and job ids (jids), and how untrusted text is shown in logs.

One module owns them so every layer (key registry, job cache, request handler, CLIs) refuses the
same ids and jids, before anything reaches a store. It imports nothing from hamaster.

Minion ids (:func:`valid_minion_id`) become file names (``pki/master/minions/<id>``,
``jobs/<jid>/returns/<id>``, ``cachedir/minions/<id>/``), as in Salt, so they follow Salt's
on-disk rule (no ``/``, ``\\`` or NUL; not ``.``/``..``) and more:

- at most :data:`MAX_ID_BYTES` (240) bytes in UTF-8: a file name holds 255 bytes and rsync's
  temp file for a key is ``.<name>.XXXXXX`` (8 more); a longer id used to make the fs store
  fail with "File name too long", which looked like a store outage;
- no character that :meth:`str.isprintable` rejects (control characters such as newline or ESC,
  DEL, C1 controls, format characters such as bidi overrides, line/paragraph separators,
  lone surrogates), no leading/trailing whitespace;
- no name starting with ``.`` (hidden files: the stores' temp files and markers) and no ``..``.

Jids (:func:`valid_jid`) are Salt's 20 ASCII digits ``YYYYMMDDhhmmssffffff`` that parse as a
time (``00000000000000000000`` does not), optionally followed by ``_<digits>`` (Salt's
``unique_jid`` form); the time part is what job-cache expiry compares.

:func:`shown` renders untrusted text for a log line or the text output of a CLI: plain when it
is short and made of harmless characters, else ``repr``-quoted (no raw control or escape
sequences, no newline) and cut to a bounded length.
"""

from __future__ import annotations

import datetime
import re

#: Longest minion id, in UTF-8 bytes (a file name is at most 255 bytes; see the module doc).
MAX_ID_BYTES = 240
#: Longest text :func:`shown` prints before cutting it.
SHOWN_MAX = 80

_JID_RE = re.compile(r"[0-9]{20}(?:_[0-9]{1,20})?", re.ASCII)
_JID_FORMAT = "%Y%m%d%H%M%S%f"
# Characters an id may show unquoted in logs and CLI text, and that are safe in a shell word
# (no quotes, spaces, `$`, globs): what `hamaster-key -a <id>` hints may embed.
_PLAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+=,%-]*", re.ASCII)
# What one_line escapes: C0 controls but tab, DEL, C1 controls, line/paragraph separators,
# bidi controls, BOM and lone surrogates (which a UTF-8 log file cannot even hold).
_UNSAFE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f"
                        "\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii") if ch < "\ud800" \
        else f"\\u{ord(ch):04x}"


def minion_id_problem(mid: object) -> str | None:
    """Why ``mid`` is not a valid minion id, or None if it is one."""
    if not isinstance(mid, str) or not mid:
        return "must be a non-empty string"
    try:
        size = len(mid.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > MAX_ID_BYTES:
        return f"is {size} bytes in UTF-8, more than {MAX_ID_BYTES}"
    if "/" in mid or "\\" in mid:
        return "contains '/' or '\\'"
    if not mid.isprintable():
        return "contains a control or other non-printable character"
    if mid.strip() != mid:
        return "starts or ends with whitespace"
    if mid.startswith("."):
        return "starts with '.'"
    if ".." in mid:
        return "contains '..'"
    return None


def valid_minion_id(mid: object) -> bool:
    """True if ``mid`` is a valid minion id (see the module doc)."""
    return minion_id_problem(mid) is None


def check_minion_id(mid: object) -> str:
    """Return ``mid`` if it is a valid minion id, else raise ``ValueError`` saying why."""
    problem = minion_id_problem(mid)
    if problem is not None:
        raise ValueError(f"invalid minion id {shown(mid)}: {problem}")
    assert isinstance(mid, str)
    return mid


def jid_time(jid: object) -> datetime.datetime | None:
    """The local time a valid jid stands for, or None if ``jid`` is not a valid jid."""
    if not isinstance(jid, str) or not _JID_RE.fullmatch(jid):
        return None
    try:
        return datetime.datetime.strptime(jid[:20], _JID_FORMAT)
    except ValueError:
        return None


def valid_jid(jid: object) -> bool:
    """True if ``jid`` is a Salt jid whose digits are a real time (see the module doc)."""
    return jid_time(jid) is not None


def check_jid(jid: object) -> str:
    """Return ``jid`` if it is valid, else raise ``ValueError`` saying what a jid looks like."""
    if not valid_jid(jid):
        raise ValueError(f"invalid jid {shown(jid)}: expected 20 digits YYYYMMDDhhmmssffffff "
                         "that are a real time (optionally _<digits>)")
    assert isinstance(jid, str)
    return jid


def is_plain(text: object) -> bool:
    """True if ``text`` is short and made only of letters, digits and ``._@:+=,%-``.

    Such text can be printed as is and embedded in a suggested shell command.
    """
    return isinstance(text, str) and len(text) <= SHOWN_MAX and bool(_PLAIN_RE.fullmatch(text))


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` with control, bidi and line-breaking characters escaped (``\\n``, ``\\x1b``), so it
    stays one line in a log and cannot move the cursor; cut to ``limit`` characters if given."""
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}...({len(text)} chars)"
    if _UNSAFE_RE.search(text) is None:
        return text
    return _UNSAFE_RE.sub(_escape_char, text)


def shown(text: object, limit: int = SHOWN_MAX) -> str:
    """``text`` safe for one log line or CLI line: plain if :func:`is_plain`, else quoted.

    Quoted text is ``repr`` of at most ``limit`` characters (control characters, escapes and
    newlines come out as ``\\n``, ``\\x1b`` …) followed by ``...(N chars)`` when it was cut.
    Non-strings are shown by their type and ``repr``, cut the same way.
    """
    if isinstance(text, str):
        if len(text) <= limit and _PLAIN_RE.fullmatch(text):
            return text
        if len(text) <= limit:
            return repr(text)
        return f"{text[:limit]!r}...({len(text)} chars)"
    if isinstance(text, bytes):
        return shown(text.decode("utf-8", "backslashreplace"), limit)
    try:
        rep = repr(text)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break a log line
        rep = f"<{type(text).__name__}>"
    if len(rep) > limit:
        rep = f"{rep[:limit]}...({len(rep)} chars)"
    return rep.encode("ascii", "backslashreplace").decode("ascii") if not rep.isprintable() else rep
