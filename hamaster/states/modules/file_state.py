"""The ``file`` state module: ``managed``, ``directory``, ``absent``, ``symlink``, ``append``.

Writes are atomic (a temporary file in the target directory, then ``rename``); no backups are
kept. ``source`` is ``salt://`` (from the masters' file server, or local ``file_roots`` in
masterless mode) or an absolute local path; ``template: jinja`` renders it with the state context
plus ``context``/``defaults``.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from hamaster.states.runner import StateRun

_NOTE = "\nNote: No changes made, actual changes may\nbe different due to other states."


def _ret(name: str) -> dict[str, Any]:
    return {"name": name, "changes": {}, "result": True, "comment": ""}


def _norm_mode(mode: Any) -> str | None:
    if mode is None or mode == "":
        return None
    text = str(mode)  # YAML 644 and 0644 are the int 644: the digits are read as octal
    text = text.lstrip("0") or "0"
    return text.rjust(4, "0")


def _cur_mode(path: str) -> str:
    return oct(os.lstat(path).st_mode & 0o7777)[2:].rjust(4, "0")


def _perm_changes(path: str, user: Any, group: Any, mode: str | None) -> dict[str, Any]:
    """What would change in owner/group/mode of an existing ``path``."""
    st = os.lstat(path)
    changes: dict[str, Any] = {}
    if user is not None:
        try:
            uid = int(user) if str(user).isdigit() else pwd.getpwnam(str(user)).pw_uid
        except KeyError:
            raise ValueError(f"User {user} is not available") from None
        if st.st_uid != uid:
            changes["user"] = str(user)
    if group is not None:
        try:
            gid = int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
        except KeyError:
            raise ValueError(f"Group {group} is not available") from None
        if st.st_gid != gid:
            changes["group"] = str(group)
    if mode is not None and _cur_mode(path) != mode:
        changes["mode"] = mode
    return changes


def _apply_perms(path: str, changes: Mapping[str, Any]) -> None:
    if "user" in changes or "group" in changes:
        u, g = changes.get("user"), changes.get("group")
        uid = -1 if u is None else (int(u) if str(u).isdigit() else pwd.getpwnam(u).pw_uid)
        gid = -1 if g is None else (int(g) if str(g).isdigit() else grp.getgrnam(g).gr_gid)
        os.lchown(path, uid, gid)
    if "mode" in changes:
        os.chmod(path, int(changes["mode"], 8))


def _read_source(run: StateRun, source: Any) -> tuple[bytes | None, str]:
    sources = source if isinstance(source, list) else [source]
    tried = []
    for src in sources:
        if isinstance(src, dict):
            src = next(iter(src))
        src = str(src)
        tried.append(src)
        if src.startswith("salt://"):
            rel, _, query = src.partition("?")
            env = run.saltenv
            if query.startswith("saltenv="):
                env = query.split("=", 1)[1]
            data = run.read(rel, env)
        elif src.startswith("file://") or os.path.isabs(src):
            path = src[len("file://"):] if src.startswith("file://") else src
            data = None
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    data = fh.read()
        else:
            data = None
        if data is not None:
            return data, src
    return None, ", ".join(tried)


def _write_atomic(path: str, data: bytes, mode: int | None) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".hamaster-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _diff(old: bytes, new: bytes) -> str:
    try:
        a, b = old.decode("utf-8").splitlines(True), new.decode("utf-8").splitlines(True)
    except UnicodeDecodeError:
        return "Replace binary file"
    return "".join(difflib.unified_diff(a, b, n=3)) or "Replace text file"


def managed(run: StateRun, name: str, source: Any = None, source_hash: str = "",
            user: str | None = None, group: str | None = None, mode: Any = None,
            template: str | None = None, makedirs: bool = False, dir_mode: Any = None,
            context: Mapping[str, Any] | None = None,
            defaults: Mapping[str, Any] | None = None, contents: Any = None,
            contents_newline: bool = True, replace: bool = True, create: bool = True,
            show_changes: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Manage a file's content (``source``/``contents``, optionally templated) and owner/mode."""
    ret = _ret(name)
    name = os.path.expanduser(str(name))
    if not os.path.isabs(name):
        return {**ret, "result": False, "comment": f"Specified file {name} is not an absolute path"}
    if source is not None and contents is not None:
        return {**ret, "result": False,
                "comment": "Only one of 'contents', 'contents_pillar', and 'contents_grains' "
                           "is permitted"}
    nmode = _norm_mode(mode)
    exists = os.path.lexists(name)
    if exists and os.path.isdir(name) and not os.path.islink(name):
        return {**ret, "result": False,
                "comment": f"Specified target {name} is a directory"}
    if not exists and not create:
        return {**ret, "comment": "File not present and create is false; nothing to do"}
    data: bytes | None = None
    if contents is not None:
        text = "\n".join(str(c) for c in contents) if isinstance(contents, list) \
            else str(contents)
        if contents_newline and not text.endswith("\n"):
            text += "\n"
        data = text.encode("utf-8")
    elif source is not None:
        data, tried = _read_source(run, source)
        if data is None:
            return {**ret, "result": False,
                    "comment": f"Source file {tried} not found in saltenv '{run.saltenv}'"}
    if data is not None and template:
        if str(template).lower() != "jinja":
            return {**ret, "result": False,
                    "comment": f"The specified template format {template} is not supported"}
        extra = dict(defaults or {})
        extra.update(context or {})
        try:
            data = run.render(data, run.saltenv, str(run.low.get("__sls__") or ""),
                              str(source if isinstance(source, str) else name), extra)
        except Exception as exc:
            return {**ret, "result": False, "comment": f"Unable to manage file: {exc}"}
        if isinstance(data, str):
            data = data.encode("utf-8")
    parent = os.path.dirname(name)
    if not os.path.isdir(parent) and not makedirs:
        if run.test:
            return {**ret, "result": None, "changes": {"newfile": name},
                    "comment": f"The file {name} is set to be changed{_NOTE}"}
        return {**ret, "result": False, "comment": "Parent directory not present"}
    changes: dict[str, Any] = {}
    old = b""
    if exists:
        with open(name, "rb") as fh:
            old = fh.read()
    if data is not None and (not exists or (replace and old != data)):
        changes["diff"] = _diff(old, data) if exists else "New file"
    try:
        perm = _perm_changes(name, user, group, nmode) if exists else {
            k: v for k, v in (("user", user), ("group", group), ("mode", nmode))
            if v is not None}
    except ValueError as exc:
        return {**ret, "result": False, "comment": str(exc)}
    if not exists and data is None:
        changes["diff"] = "New file"
        data = b""
    changes.update(perm)
    if not changes:
        return {**ret, "comment": f"File {name} is in the correct state"}
    if run.test:
        shown = {"newfile": name} if not exists else changes
        return {**ret, "result": None, "changes": shown,
                "comment": f"The file {name} is set to be changed{_NOTE}"}
    try:
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=int(_norm_mode(dir_mode) or "0755", 8))
        if "diff" in changes:
            keep = int(_cur_mode(name), 8) if exists else None
            _write_atomic(name, data or b"", int(nmode, 8) if nmode else keep)
        _apply_perms(name, perm)
    except OSError as exc:
        return {**ret, "result": False, "comment": f"Unable to manage file: {exc}"}
    if not show_changes and "diff" in changes:
        changes["diff"] = "<show_changes=False>"
    comment = f"File {name} updated" if exists or data else f"Empty file {name} created"
    return {**ret, "changes": changes, "comment": comment}


def directory(run: StateRun, name: str, user: str | None = None, group: str | None = None,
              dir_mode: Any = None, mode: Any = None, makedirs: bool = False,
              clean: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Ensure a directory exists with the given owner and mode."""
    ret = _ret(name)
    name = os.path.expanduser(str(name)).rstrip("/") or "/"
    if not os.path.isabs(name):
        return {**ret, "result": False, "comment": f"Specified file {name} is not an absolute path"}
    nmode = _norm_mode(dir_mode if dir_mode is not None else mode)
    if os.path.lexists(name) and not os.path.isdir(name):
        return {**ret, "result": False,
                "comment": f"Specified location {name} exists and is a file"}
    if not os.path.isdir(name):
        if not os.path.isdir(os.path.dirname(name)) and not makedirs:
            if run.test:
                return {**ret, "result": None, "changes": {name: {"directory": "new"}},
                        "comment": f"The following files will be changed:\n{name}: directory "
                                   "- new\n"}
            return {**ret, "result": False, "comment": f"No directory to create {name} in"}
        if run.test:
            return {**ret, "result": None, "changes": {name: {"directory": "new"}},
                    "comment": f"The following files will be changed:\n{name}: directory - new\n"}
        try:
            os.makedirs(name, exist_ok=True)
            perm = {k: v for k, v in (("user", user), ("group", group), ("mode", nmode))
                    if v is not None}
            _apply_perms(name, perm)
        except (OSError, KeyError) as exc:
            return {**ret, "result": False, "comment": f"Failed to create directory {name}: {exc}"}
        return {**ret, "changes": {name: {"directory": "new"}}, "comment": ""}  # Salt: no comment
    try:
        perm = _perm_changes(name, user, group, nmode)
    except ValueError as exc:
        return {**ret, "result": False, "comment": str(exc)}
    removed: list[str] = []
    if clean:
        keep = {os.path.join(name, "")}
        removed = [os.path.join(name, e) for e in sorted(os.listdir(name))
                   if os.path.join(name, e) not in keep]
    if not perm and not removed:
        return {**ret, "comment": f"The directory {name} is in the correct state"}
    changes: dict[str, Any] = dict(perm)
    if removed:
        changes["removed"] = removed
    if run.test:
        lines = "".join(f"{name}: {k} - {v}\n" for k, v in perm.items())
        return {**ret, "result": None, "changes": {name: changes},
                "comment": f"The following files will be changed:\n{lines}"}
    _apply_perms(name, perm)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return {**ret, "changes": changes, "comment": f"Directory {name} updated"}


def absent(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Ensure a file, symlink or directory (recursively) is absent."""
    ret = _ret(name)
    name = os.path.expanduser(str(name))
    if not os.path.isabs(name):
        return {**ret, "result": False, "comment": f"Specified file {name} is not an absolute path"}
    if name == "/":
        return {**ret, "result": False, "comment": 'Refusing to make "/" absent'}
    if not os.path.lexists(name):
        return {**ret, "comment": f"File {name} is not present"}
    is_dir = os.path.isdir(name) and not os.path.islink(name)
    if run.test:
        kind = "Directory" if is_dir else "File"
        return {**ret, "result": None, "changes": {"removed": name},
                "comment": f"{kind} {name} is set for removal"}
    try:
        if is_dir:
            shutil.rmtree(name)
        else:
            os.unlink(name)
    except OSError as exc:
        return {**ret, "result": False, "comment": f"Failed to remove {name}: {exc}"}
    kind = "directory" if is_dir else "file"
    return {**ret, "changes": {"removed": name}, "comment": f"Removed {kind} {name}"}


def symlink(run: StateRun, name: str, target: str, force: bool = False,
            makedirs: bool = False, user: str | None = None, group: str | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Ensure ``name`` is a symlink to ``target``."""
    ret = _ret(name)
    name = os.path.expanduser(str(name))
    if not os.path.isabs(name):
        return {**ret, "result": False, "comment": f"Specified file {name} is not an absolute path"}
    if os.path.islink(name) and os.readlink(name) == str(target):
        return {**ret, "comment": f"Symlink {name} is present and owned by "
                                  f"{_owner(name)}"}
    if os.path.lexists(name) and not os.path.islink(name) and not force:
        return {**ret, "result": False,
                "comment": f"File exists where the symlink {name} should be"}
    no_dir = ""
    if not os.path.isdir(os.path.dirname(name)) and not makedirs:
        no_dir = f"Directory {os.path.dirname(name)} for symlink is not present"
        if not run.test:
            return {**ret, "result": False, "comment": no_dir}
    if run.test:
        if not os.path.lexists(name):
            comment, changes = f"Symlink {name} to {target} is set for creation", {"new": name}
        else:
            comment = f"Link {name} target is set to be changed to {target}"
            changes = {"change": name}
        return {**ret, "result": None, "changes": changes,
                "comment": comment + (f"\n{no_dir}" if no_dir else "")}
    replaced = os.path.lexists(name)
    try:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        if replaced:
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name)
            else:
                os.unlink(name)
        os.symlink(str(target), name)
        if user is not None or group is not None:
            _apply_perms(name, {k: v for k, v in (("user", user), ("group", group)) if v})
    except (OSError, KeyError) as exc:
        return {**ret, "result": False, "comment": f"Unable to create new symlink {name} -> "
                                                   f"{target}: {exc}"}
    if replaced:
        return {**ret, "changes": {"new": name}, "comment": f"Set target of symlink {name} -> "
                                                            f"{target}"}
    return {**ret, "changes": {"new": name},
            "comment": f"Created new symlink {name} -> {target}"}


def _owner(path: str) -> str:
    st = os.lstat(path)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def append(run: StateRun, name: str, text: Any = None, makedirs: bool = False,
           **kwargs: Any) -> dict[str, Any]:
    """Append the lines of ``text`` that the file does not contain yet."""
    ret = _ret(name)
    name = os.path.expanduser(str(name))
    lines: list[str] = []
    for chunk in text if isinstance(text, list) else [text or ""]:
        lines.extend(str(chunk).splitlines())
    old = ""
    if os.path.isfile(name):
        with open(name, encoding="utf-8", errors="replace") as fh:
            old = fh.read()
    elif not os.path.isdir(os.path.dirname(name)) and not makedirs and not run.test:
        return {**ret, "result": False, "comment": f"No such file or directory: {name}"}
    have = set(old.splitlines())
    add = [ln for ln in lines if ln not in have]
    if not add:
        return {**ret, "comment": f"File {name} is in correct state"}
    new = old + ("" if not old or old.endswith("\n") else "\n") + "".join(a + "\n" for a in add)
    if run.test:
        if not os.path.exists(name):
            return {**ret, "result": None, "changes": {"new": name},
                    "comment": f"File {name} is set to be created"}
        return {**ret, "result": None, "changes": {"diff": _diff(old.encode(), new.encode())},
                "comment": f"File {name} is set to be updated"}
    os.makedirs(os.path.dirname(name), exist_ok=True)
    keep = int(_cur_mode(name), 8) if os.path.exists(name) else None
    _write_atomic(name, new.encode("utf-8"), keep)
    return {**ret, "changes": {"diff": _diff(old.encode(), new.encode())},
            "comment": f"Appended {len(add)} lines"}


def replace(run: StateRun, name: str, pattern: str, repl: str, count: int = 0,
            flags: Any = 8, append_if_not_found: bool = False,
            prepend_if_not_found: bool = False, not_found_content: str | None = None,
            ignore_if_missing: bool = False, show_changes: bool = True,
            **kwargs: Any) -> dict[str, Any]:
    """``re.sub`` over the file's text (``flags`` an int or a list of ``re`` flag names)."""
    import re

    ret = _ret(name)
    name = os.path.expanduser(str(name))
    if not os.path.isfile(name):
        if ignore_if_missing:
            return {**ret, "comment": f"No changes needed to be made: {name} not found"}
        return {**ret, "result": False, "comment": f"{name}: file not found"}
    if isinstance(flags, list):
        fl = 0
        for f in flags:
            fl |= getattr(re, str(f).upper(), 0)
    else:
        fl = int(flags)
    with open(name, encoding="utf-8", errors="surrogateescape") as fh:
        old = fh.read()
    new, n = re.subn(pattern, str(repl), old, count=int(count), flags=fl)
    if n == 0 and (append_if_not_found or prepend_if_not_found):
        content = str(repl if not_found_content is None else not_found_content)
        if content not in old.splitlines():
            if append_if_not_found:
                new = old + ("" if not old or old.endswith("\n") else "\n") + content + "\n"
            else:
                new = content + "\n" + old
    if new == old:
        return {**ret, "comment": "No changes needed to be made"}
    diff = _diff(old.encode("utf-8", "surrogateescape"), new.encode("utf-8", "surrogateescape"))
    changes = {"diff": diff if show_changes else "<show_changes=False>"}
    if run.test:
        return {**ret, "result": None, "changes": changes,
                "comment": "Changes would have been made"}
    _write_atomic(name, new.encode("utf-8", "surrogateescape"), int(_cur_mode(name), 8))
    return {**ret, "changes": changes, "comment": "Changes were made"}


def recurse(run: StateRun, name: str, source: str, clean: bool = False,
            user: str | None = None, group: str | None = None, dir_mode: Any = None,
            file_mode: Any = None, template: str | None = None,
            context: Mapping[str, Any] | None = None,
            defaults: Mapping[str, Any] | None = None, replace: bool = True,
            **kwargs: Any) -> dict[str, Any]:
    """Mirror the ``salt://`` directory ``source`` into ``name`` (each file as
    ``file.managed``, each directory as ``file.directory``; ``clean`` removes the rest)."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": {}}
    name = os.path.expanduser(str(name)).rstrip("/")
    if not os.path.isabs(name):
        return {**ret, "result": False, "comment": f"Specified file {name} is not an absolute path"}
    src = str(source).split("?", 1)[0].rstrip("/")
    if not src.startswith("salt://"):
        return {**ret, "result": False,
                "comment": f"Invalid source '{source}' (must be a salt:// URI)"}
    prefix = src[len("salt://"):]
    files = run.list_files(src, run.saltenv) if run.list_files else []
    if not files:
        return {**ret, "result": False,
                "comment": f"The directory '{source}' does not exist on the salt fileserver "
                           f"in saltenv '{run.saltenv}'"}
    if os.path.lexists(name) and not os.path.isdir(name):
        return {**ret, "result": False,
                "comment": f"The path {name} exists and is not a directory"}

    if not os.path.isdir(name) and not run.test:  # Salt creates the root first, unreported
        os.makedirs(name, exist_ok=True)
        _apply_perms(name, {k: v for k, v in (("user", user), ("group", group),
                                              ("mode", _norm_mode(dir_mode))) if v})

    def merge(path: str, sub: dict[str, Any]) -> None:
        if sub["result"] is False or ret["result"] is True:
            ret["result"] = sub["result"]
        if sub["result"] is not True and sub["comment"]:
            ret["comment"].setdefault(path, []).append(sub["comment"])
        if sub["changes"]:
            ret["changes"][path] = sub["changes"]

    dests = {os.path.join(name, f[len(prefix) + 1:]): f for f in files}
    dirs = sorted({os.path.dirname(d) for d in dests} | {name})
    for d in dirs:
        merge(d, directory(run, d, user=user, group=group, dir_mode=dir_mode, makedirs=True))
    for dest, rel in sorted(dests.items()):
        merge(dest, managed(run, dest, source=f"salt://{rel}", user=user, group=group,
                            mode=file_mode, template=template, makedirs=True, context=context,
                            defaults=defaults, replace=replace))
    if clean and os.path.isdir(name):
        keep = set(dests) | set(dirs)
        removed = []
        for root, dnames, fnames in os.walk(name, topdown=False):
            for entry in fnames + dnames:
                path = os.path.join(root, entry)
                if path not in keep and not any(k.startswith(path + "/") for k in keep):
                    removed.append(path)
        if removed:
            if run.test:
                if ret["result"]:
                    ret["result"] = None
                ret["comment"].setdefault("removed", []).extend(sorted(removed))
            else:
                for path in removed:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.lexists(path):
                        os.unlink(path)
                ret["changes"]["removed"] = sorted(removed)
    comment = "\n".join(f"\n#### {k} ####\n" + "\n".join(v)
                        for k, v in ret["comment"].items()).strip()
    ret["comment"] = comment or f"Recursively updated {name}"
    if not ret["changes"] and ret["result"]:
        ret["comment"] = f"The directory {name} is in the correct state"
    return ret
