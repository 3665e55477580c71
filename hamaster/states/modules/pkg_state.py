"""The ``pkg`` state module on Debian-family systems (dpkg-query to read, apt-get to change).

``pkg.installed``/``pkg.removed`` with ``name`` or ``pkgs``; ``version`` pins are passed to
apt-get as ``name=version``. On machines without dpkg the states fail with a clear comment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from hamaster.states.runner import StateRun

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}


def _installed_version(pkg: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def _targets(name: str, pkgs: Any) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in pkgs if pkgs else [name]:
        if isinstance(item, dict):
            for k, v in item.items():
                out.append((str(k), None if v in (None, "") else str(v)))
        else:
            out.append((str(item), None))
    return out


def _unsupported(name: str) -> dict[str, Any] | None:
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        return {"name": name, "changes": {}, "result": False,
                "comment": "pkg states need dpkg and apt-get (Debian family); not found"}
    return None


def installed(run: StateRun, name: str, version: str | None = None, pkgs: Any = None,
              refresh: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Ensure packages are installed (at ``version`` when given)."""
    bad = _unsupported(name)
    if bad:
        return bad
    targets = _targets(name, pkgs)
    if version is not None and not pkgs:
        targets = [(name, str(version))]
    missing = []
    for pkg, ver in targets:
        cur = _installed_version(pkg)
        if cur is None or (ver is not None and cur != ver):
            missing.append((pkg, ver, cur))
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if not missing:
        ret["comment"] = ("All specified packages are already installed" if len(targets) > 1
                          or pkgs else "All specified packages are already installed")
        return ret
    names = ", ".join(p for p, _, _ in missing)
    if run.test:
        ret["result"] = None
        ret["comment"] = f"The following packages would be installed/updated: {names}"
        return ret
    env = {**os.environ, **_APT_ENV}
    if refresh:
        subprocess.run(["apt-get", "-q", "update"], env=env, capture_output=True, check=False)
    args = [p if v is None else f"{p}={v}" for p, v, _ in missing]
    proc = subprocess.run(["apt-get", "-q", "-y", "-o", "DPkg::Options::=--force-confold",
                           "install", *args], env=env, capture_output=True, text=True,
                          check=False)
    for pkg, _ver, cur in missing:
        new = _installed_version(pkg)
        if new is not None and new != cur:
            ret["changes"][pkg] = {"old": cur or "", "new": new}
    failed = [p for p, _, _ in missing if p not in ret["changes"]]
    if proc.returncode != 0 or failed:
        ret["result"] = False
        err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        ret["comment"] = f"The following packages failed to install/update: " \
                         f"{', '.join(failed) or names}: {err[0]}"
        return ret
    ret["comment"] = f"The following packages were installed/updated: {names}"
    return ret


def removed(run: StateRun, name: str, pkgs: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure packages are not installed (``apt-get remove``)."""
    bad = _unsupported(name)
    if bad:
        return bad
    present = [(p, v) for p, _ in _targets(name, pkgs)
               if (v := _installed_version(p)) is not None]
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if not present:
        ret["comment"] = "All specified packages are already absent"
        return ret
    names = ", ".join(p for p, _ in present)
    if run.test:
        ret["result"] = None
        ret["comment"] = f"The following packages will be removed: {names}"
        return ret
    env = {**os.environ, **_APT_ENV}
    proc = subprocess.run(["apt-get", "-q", "-y", "remove", *[p for p, _ in present]],
                          env=env, capture_output=True, text=True, check=False)
    for pkg, old in present:
        if _installed_version(pkg) is None:
            ret["changes"][pkg] = {"old": old, "new": ""}
    if proc.returncode != 0 or len(ret["changes"]) != len(present):
        ret["result"] = False
        ret["comment"] = f"The following packages failed to be removed: {names}"
        return ret
    ret["comment"] = "All targeted packages were removed."
    return ret


def _candidate(pkg: str) -> str | None:
    proc = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                          check=False, env={**os.environ, "LC_ALL": "C"})
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            return None if cand == "(none)" else cand
    return None


def latest(run: StateRun, name: str, pkgs: Any = None, refresh: bool = False,
           **kwargs: Any) -> dict[str, Any]:
    """Ensure packages are installed at the newest version apt knows (``apt-cache policy``)."""
    bad = _unsupported(name)
    if bad:
        return bad
    if refresh and not run.test:
        subprocess.run(["apt-get", "-q", "update"], env={**os.environ, **_APT_ENV},
                       capture_output=True, check=False)
    targets = [p for p, _ in _targets(name, pkgs)]
    stale = []
    for pkg in targets:
        cand = _candidate(pkg)
        if cand is None:
            return {"name": name, "changes": {}, "result": False,
                    "comment": f"No information found for '{pkg}'."}
        if _installed_version(pkg) != cand:
            stale.append(pkg)
    if not stale:
        comment = (f"Package {targets[0]} is already up-to-date" if len(targets) == 1
                   else f"All {len(targets)} packages are up-to-date.")
        return {"name": name, "changes": {}, "result": True, "comment": comment}
    if run.test:
        return {"name": name, "changes": {}, "result": None,
                "comment": "The following packages would be installed/upgraded: "
                           + ", ".join(stale)}
    return installed(run, name, pkgs=stale if pkgs else None, **kwargs)
