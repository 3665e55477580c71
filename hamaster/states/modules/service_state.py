"""The ``service`` state module, for systemd (``systemctl``) only.

Where systemd is not the running init (containers, this project's CI) the states fail with the
comment "no supported init system" rather than guessing; ``test=True`` says the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from hamaster.states.runner import StateRun


def _systemd() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def _no_init(name: str) -> dict[str, Any]:
    return {"name": name, "changes": {}, "result": False,
            "comment": "no supported init system: the service states need systemd, which is "
                       "not running on this machine"}


def _enable(run: StateRun, name: str, ret: dict[str, Any], enable: bool) -> None:
    enabled = _ctl("is-enabled", name).returncode == 0
    if enabled == enable:
        return
    if run.test:
        ret["result"] = None
        ret["comment"] += f"\nService {name} set to be {'enabled' if enable else 'disabled'}"
        return
    proc = _ctl("enable" if enable else "disable", name)
    if proc.returncode != 0:
        ret["result"] = False
        ret["comment"] += f"\nFailed when setting service {name} to start at boot"
        return
    ret["changes"][name] = True
    ret["comment"] += f"\nService {name} has been {'enabled' if enable else 'disabled'}"


def running(run: StateRun, name: str, enable: bool | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Ensure the service is running (and enabled/disabled when ``enable`` is given)."""
    if not _systemd():
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if _ctl("is-active", name).returncode == 0:
        ret["comment"] = f"The service {name} is already running"
    elif run.test:
        ret["result"] = None
        ret["comment"] = f"Service {name} is set to start"
    else:
        if _ctl("start", name).returncode != 0:
            return {**ret, "result": False, "comment": f"Service {name} failed to start"}
        ret["changes"][name] = True
        ret["comment"] = f"Started service {name}"
    if enable is not None:
        _enable(run, name, ret, bool(enable))
    return ret


def dead(run: StateRun, name: str, enable: bool | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure the service is stopped."""
    if not _systemd():
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if _ctl("is-active", name).returncode != 0:
        ret["comment"] = f"The service {name} is already dead"
    elif run.test:
        ret["result"] = None
        ret["comment"] = f"Service {name} is set to be killed"
    else:
        if _ctl("stop", name).returncode != 0:
            return {**ret, "result": False, "comment": f"Service {name} failed to die"}
        ret["changes"][name] = True
        ret["comment"] = f"Service {name} was killed"
    if enable is not None:
        _enable(run, name, ret, bool(enable))
    return ret


def enabled(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Ensure the service starts at boot."""
    if not _systemd():
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True,
                           "comment": f"Service {name} is already enabled, and is in the "
                                      "desired state"}
    before = dict(ret)
    _enable(run, name, ret, True)
    if ret != before:
        ret["comment"] = ret["comment"].split("\n", 1)[-1]
    return ret


def mod_watch(run: StateRun, name: str, sfun: str | None = None, reload: bool = False,
              **kwargs: Any) -> dict[str, Any]:
    """A watched state changed: restart (or reload) a running service."""
    if not _systemd():
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if sfun not in ("running",):
        ret["comment"] = "Unable to trigger watch for service.{sfun}"
        ret["result"] = False
        return ret
    verb = "reload" if reload else "restart"
    if run.test:
        return {**ret, "result": None, "comment": f"Service is set to be {verb}ed"}
    proc = _ctl(verb, name)
    ret["result"] = proc.returncode == 0
    ret["changes"] = {name: ret["result"]}
    ret["comment"] = f"Service {'reloaded' if reload else 'restarted'}"
    return ret
