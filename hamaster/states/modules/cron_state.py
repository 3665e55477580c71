"""The ``cron`` state module (``cron.present``, ``cron.absent``) on a user's crontab through the
``crontab`` binary (Debian's ``cron`` package), in Salt's layout: the managed entries follow the
line ``# Lines below here are managed by Salt, do not edit``; an entry may carry a comment line
``# <comment> SALT_CRON_IDENTIFIER:<identifier>`` just above it, and a disabled entry starts with
``#DISABLED#``. Lines above the marker are the user's own and are kept verbatim.

An entry is found by its identifier when one is given, else by its command (``name``)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from hamaster.states.runner import StateRun

MARKER = "# Lines below here are managed by Salt, do not edit"
ID_TAG = "SALT_CRON_IDENTIFIER:"
DISABLED = "#DISABLED#"
SPECIALS = ("@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
            "@hourly")


@dataclass
class Entry:
    """One managed crontab entry."""

    cmd: str
    when: str               # "m h dom mon dow" or a special such as "@daily"
    identifier: str | None = None
    comment: str | None = None
    commented: bool = False

    def lines(self) -> list[str]:
        out = []
        if self.identifier is not None or self.comment:
            text = " ".join(p for p in (self.comment or "",
                                        f"{ID_TAG}{self.identifier}" if self.identifier
                                        is not None else "") if p)
            out.append(f"# {text}")
        out.append(f"{DISABLED if self.commented else ''}{self.when} {self.cmd}")
        return out


def parse(text: str) -> tuple[list[str], list[Entry]]:
    """The user's own lines (above the marker) and the managed entries (below it)."""
    lines = text.splitlines()
    if MARKER not in lines:
        return lines, []
    cut = lines.index(MARKER)
    head, entries = lines[:cut], []
    comment: str | None = None
    ident: str | None = None
    for line in lines[cut + 1:]:
        stripped = line.strip()
        if not stripped:
            continue
        commented = stripped.startswith(DISABLED)
        if commented:
            stripped = stripped[len(DISABLED):].strip()
        elif stripped.startswith("#"):
            body = stripped[1:].strip()
            if ID_TAG in body:
                before, _, after = body.partition(ID_TAG)
                ident, comment = after.strip() or None, before.strip() or None
            else:
                comment, ident = body or None, None
            continue
        fields = stripped.split(None, 1 if stripped.startswith("@") else 5)
        width = 1 if stripped.startswith("@") else 5
        if len(fields) <= width:
            continue   # not an entry: dropped from the managed part, as Salt does
        entries.append(Entry(cmd=fields[width], when=" ".join(fields[:width]), identifier=ident,
                             comment=comment, commented=commented))
        comment, ident = None, None
    return head, entries


def render(head: list[str], entries: list[Entry]) -> str:
    """The crontab text for ``head`` and ``entries``."""
    lines = list(head)
    if entries:
        lines.append(MARKER)
        for entry in entries:
            lines.extend(entry.lines())
    return "\n".join(lines) + "\n" if lines else ""


def _read(user: str) -> tuple[str | None, str]:
    """The user's crontab (empty if none); ``(None, error)`` when it cannot be read."""
    if shutil.which("crontab") is None:
        return None, "crontab is not installed (Debian: apt-get install cron)"
    proc = subprocess.run(["crontab", "-u", user, "-l"], capture_output=True, text=True,
                          check=False)
    if proc.returncode == 0:
        return proc.stdout, ""
    if "no crontab for" in proc.stderr:
        return "", ""
    return None, (proc.stderr or proc.stdout).strip()


def _write(user: str, text: str) -> str:
    proc = subprocess.run(["crontab", "-u", user, "-"], input=text, capture_output=True,
                          text=True, check=False)
    return "" if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()


def _find(entries: list[Entry], name: str, identifier: str | None) -> int | None:
    for i, entry in enumerate(entries):
        if identifier is not None and entry.identifier is not None:
            if entry.identifier == identifier:
                return i
        elif entry.cmd == name:
            return i
    return None


def _ident(identifier: Any) -> str | None:
    return None if identifier in (None, False, "") else str(identifier)


def present(run: StateRun, name: str, user: str = "root", minute: Any = "*", hour: Any = "*",
            daymonth: Any = "*", month: Any = "*", dayweek: Any = "*",
            comment: str | None = None, commented: bool = False, identifier: Any = False,
            special: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure the cron entry running ``name`` exists in ``user``'s crontab with this schedule
    (``special``: ``@reboot``, ``@daily`` …, instead of the five fields)."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if special is not None and special not in SPECIALS:
        return {**ret, "result": False,
                "comment": f"Invalid special {special!r} (one of {', '.join(SPECIALS)})"}
    when = special or " ".join(str(v) for v in (minute, hour, daymonth, month, dayweek))
    text, err = _read(user)
    if text is None:
        return {**ret, "result": False, "comment": f"Cannot read {user}'s crontab: {err}"}
    head, entries = parse(text)
    ident = _ident(identifier)
    want = Entry(cmd=name, when=when, identifier=ident, comment=comment,
                 commented=bool(commented))
    at = _find(entries, name, ident)
    if at is not None and entries[at] == want:
        return {**ret, "comment": f"Cron {name} already present"}
    verb = "added to" if at is None else "updated in"
    if run.test:
        return {**ret, "result": None,
                "comment": f"Cron {name} is set to be {'added' if at is None else 'updated'}"}
    if at is None:
        entries.append(want)
    else:
        entries[at] = want
    err = _write(user, render(head, entries))
    if err:
        return {**ret, "result": False, "comment": f"Cron {name} not written: {err}"}
    return {**ret, "changes": {user: name},
            "comment": f"Cron {name} {verb} {user}'s crontab"}


def absent(run: StateRun, name: str, user: str = "root", identifier: Any = False,
           special: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure no cron entry running ``name`` (or with ``identifier``) is in ``user``'s
    crontab."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    text, err = _read(user)
    if text is None:
        return {**ret, "result": False, "comment": f"Cannot read {user}'s crontab: {err}"}
    head, entries = parse(text)
    at = _find(entries, name, _ident(identifier))
    if at is None:
        return {**ret, "comment": f"Cron {name} already absent from {user}'s crontab"}
    if run.test:
        return {**ret, "result": None, "comment": f"Cron {name} is set to be removed"}
    del entries[at]
    err = _write(user, render(head, entries))
    if err:
        return {**ret, "result": False, "comment": f"Cron {name} not removed: {err}"}
    return {**ret, "changes": {user: name},
            "comment": f"Cron {name} removed from {user}'s crontab"}
