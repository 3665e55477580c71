"""The ``user`` state module (``user.present``, ``user.absent``) with shadow-utils
(``useradd``/``usermod``/``userdel``); needs root."""

from __future__ import annotations

import grp
import pwd
import subprocess
from typing import Any

from hamaster.states.runner import StateRun


def _info(name: str) -> dict[str, Any]:
    """Salt's ``user.info`` subset: name, uid, gid, groups, home, shell, fullname."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return {}
    groups = sorted({g.gr_name for g in grp.getgrall() if name in g.gr_mem}
                    | {grp.getgrgid(pw.pw_gid).gr_name})
    gecos = (pw.pw_gecos.split(",") + ["", "", "", ""])[:5]
    return {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid, "groups": groups,
            "home": pw.pw_dir, "shell": pw.pw_shell, "fullname": gecos[0], "passwd": "x",
            "roomnumber": gecos[1], "workphone": gecos[2], "homephone": gecos[3],
            "other": gecos[4]}


def _gid(group: Any) -> int | None:
    if group is None or group == "":
        return None
    if str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        return None


def _run(argv: list[str]) -> tuple[bool, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def present(run: StateRun, name: str, uid: Any = None, gid: Any = None,
            groups: list[str] | None = None, optional_groups: list[str] | None = None,
            remove_groups: bool = True, home: str | None = None, createhome: bool = True,
            shell: str | None = None, fullname: str | None = None, system: bool = False,
            usergroup: bool | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure the user exists with the given attributes."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True,
                           "comment": f"User {name} is present and up to date"}
    missing = [g for g in (groups or []) if _gid(g) is None]
    if missing and not run.test:
        return {**ret, "result": False,
                "comment": f"The following group(s) are not present: {','.join(missing)}"}
    if missing:  # test mode: a group.present may create them (Salt issue #68110)
        groups = [g for g in groups or [] if g not in missing]
    pending = f" (pending groups: {','.join(missing)})" if missing else ""
    want_groups = list(groups or []) + [g for g in (optional_groups or []) if _gid(g) is not None]
    cur = _info(name)
    if not cur:
        if run.test:
            return {**ret, "result": None, "comment": f"User {name} set to be added{pending}"}
        argv = ["useradd"]
        if uid is not None:
            argv += ["-u", str(uid)]
        if gid is not None:
            argv += ["-g", str(gid)]
        elif usergroup is not False:
            argv += ["-U"]
        if want_groups:
            argv += ["-G", ",".join(want_groups)]
        if home:
            argv += ["-d", str(home)]
        argv += ["-m"] if createhome else ["-M"]
        if shell:
            argv += ["-s", str(shell)]
        if fullname:
            argv += ["-c", str(fullname)]
        if system:
            argv += ["-r"]
        ok, err = _run([*argv, name])
        if not ok:
            return {**ret, "result": False, "comment": f"Failed to create new user {name}: {err}"}
        info = _info(name)
        if not createhome:
            info["home"] = ""
        return {**ret, "changes": info, "comment": f"New user {name} created"}
    changes: dict[str, Any] = {}
    if uid is not None and int(uid) != cur["uid"]:
        changes["uid"] = int(uid)
    if gid is not None and _gid(gid) != cur["gid"]:
        changes["gid"] = _gid(gid)
    if home and str(home) != cur["home"]:
        changes["home"] = str(home)
    if shell and str(shell) != cur["shell"]:
        changes["shell"] = str(shell)
    if fullname is not None and str(fullname) != cur["fullname"]:
        changes["fullname"] = str(fullname)
    if groups is not None or optional_groups is not None:
        primary = grp.getgrgid(cur["gid"]).gr_name
        have = {g for g in cur["groups"] if g != primary}
        want = set(want_groups) - {primary}
        if (want - have) or (remove_groups and (have - want)):
            changes["groups"] = sorted(want if remove_groups else want | have)
    if not changes:
        return ret
    if run.test:
        lines = "".join(f"{k}: {v}\n" for k, v in changes.items())
        return {**ret, "result": None,
                "comment": f"The following user attributes are set to be changed:\n{lines}"}
    argv = ["usermod"]
    flags = {"uid": "-u", "gid": "-g", "home": "-d", "shell": "-s", "fullname": "-c"}
    for key, flag in flags.items():
        if key in changes:
            argv += [flag, str(changes[key])]
    if "groups" in changes:
        argv += ["-G", ",".join(changes["groups"])]
    ok, err = _run([*argv, name])
    if not ok:
        return {**ret, "result": False, "comment": f"These values could not be changed: "
                                                   f"{changes} ({err})"}
    return {**ret, "changes": changes, "comment": f"Updated user {name}"}


def absent(run: StateRun, name: str, purge: bool = False, force: bool = False,
           **kwargs: Any) -> dict[str, Any]:
    """Ensure the user does not exist (``purge`` removes its home too)."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if not _info(name):
        return {**ret, "comment": f"User {name} is not present"}
    if run.test:
        return {**ret, "result": None, "comment": f"User {name} set for removal"}
    argv = ["userdel"] + (["-r"] if purge else []) + (["-f"] if force else []) + [name]
    ok, err = _run(argv)
    if not ok:
        return {**ret, "result": False, "comment": f"Failed to remove user {name}: {err}"}
    return {**ret, "changes": {name: "removed"}, "comment": f"Removed user {name}"}
