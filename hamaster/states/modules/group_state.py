"""The ``group`` state module (``group.present``, ``group.absent``) with ``groupadd``/
``groupdel``/``gpasswd``; needs root."""

from __future__ import annotations

import grp
import subprocess
from typing import Any

from hamaster.states.runner import StateRun


def _info(name: str) -> dict[str, Any]:
    try:
        g = grp.getgrnam(name)
    except KeyError:
        return {}
    return {"name": g.gr_name, "passwd": g.gr_passwd, "gid": g.gr_gid,
            "members": sorted(g.gr_mem)}


def _run(argv: list[str]) -> tuple[bool, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def present(run: StateRun, name: str, gid: Any = None, system: bool = False,
            addusers: list[str] | None = None, delusers: list[str] | None = None,
            members: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure the group exists (with ``gid`` and members when given)."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True,
                           "comment": f"Group {name} is present and up to date"}
    cur = _info(name)
    if not cur:
        if run.test:
            return {**ret, "result": None, "comment": f"Group {name} set to be added"}
        argv = ["groupadd"] + (["-g", str(gid)] if gid is not None else []) \
            + (["-r"] if system else []) + [name]
        ok, err = _run(argv)
        if not ok:
            return {**ret, "result": False, "comment": f"Failed to create new group {name}: {err}"}
        mem = list(members or addusers or [])
        if mem:
            _run(["gpasswd", "-M", ",".join(mem), name])
        return {**ret, "changes": _info(name), "comment": f"New group {name} created"}
    changes: dict[str, Any] = {}
    if gid is not None and int(gid) != cur["gid"]:
        changes["gid"] = int(gid)
    want = set(cur["members"])
    if members is not None:
        want = set(members)
    want |= set(addusers or [])
    want -= set(delusers or [])
    if want != set(cur["members"]):
        changes["members"] = sorted(want)
    if not changes:
        return ret
    if run.test:
        lines = "".join(f"{k}: {v}\n" for k, v in changes.items())
        return {**ret, "result": None,
                "comment": f"The following group attributes are set to be changed:\n{lines}"}
    if "gid" in changes:
        ok, err = _run(["groupmod", "-g", str(changes["gid"]), name])
        if not ok:
            return {**ret, "result": False, "comment": err}
    if "members" in changes:
        ok, err = _run(["gpasswd", "-M", ",".join(changes["members"]), name])
        if not ok:
            return {**ret, "result": False, "comment": err}
    return {**ret, "changes": changes, "comment": f"Updated group {name}"}


def absent(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Ensure the group does not exist."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if not _info(name):
        return {**ret, "comment": "Group not present"}
    if run.test:
        return {**ret, "result": None, "comment": f"Group {name} is set for removal"}
    ok, err = _run(["groupdel", name])
    if not ok:
        return {**ret, "result": False, "comment": f"Failed to remove group {name}: {err}"}
    return {**ret, "changes": {name: ""}, "comment": f"Removed group {name}"}
