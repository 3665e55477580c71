"""The ``service`` state module, for systemd (``systemctl``) and, where systemd is not the
running init (containers, this project's CI), System V init scripts (``/etc/init.d/<name>`` run
directly, LSB exit codes; boot links through ``update-rc.d``).

A service with neither (no systemd running, no init script) fails with the comment "no supported
init system" rather than guessing; ``test=True`` says the same.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from typing import Any

from hamaster.states.runner import StateRun

INIT_D = "/etc/init.d"


class _Systemd:
    """systemctl."""

    @staticmethod
    def _ctl(*args: str) -> bool:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                              check=False).returncode == 0

    def active(self, name: str) -> bool:
        return self._ctl("is-active", name)

    def do(self, verb: str, name: str) -> bool:
        """``start``, ``stop``, ``restart``, ``reload``, ``enable`` or ``disable``."""
        return self._ctl(verb, name)

    def enabled(self, name: str) -> bool:
        return self._ctl("is-enabled", name)


class _SysV:
    """``/etc/init.d/<name>`` scripts (LSB: ``status`` exits 0 when running)."""

    @staticmethod
    def _script(verb: str, name: str) -> bool:
        # No pipes: a daemon the script leaves behind would hold them open for ever.
        return subprocess.run([os.path.join(INIT_D, name), verb], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              check=False, start_new_session=True).returncode == 0

    def active(self, name: str) -> bool:
        return self._script("status", name)

    def do(self, verb: str, name: str) -> bool:
        if verb in ("enable", "disable"):
            args = ["defaults"] if verb == "enable" else ["disable"]
            if verb == "enable":   # links may exist as K (disabled): re-enable them
                subprocess.run(["update-rc.d", name, "enable"], capture_output=True,
                               check=False)
            return subprocess.run(["update-rc.d", name, *args], capture_output=True,
                                  check=False).returncode == 0 and (
                self.enabled(name) == (verb == "enable"))
        return self._script(verb, name)

    def enabled(self, name: str) -> bool:
        return bool(glob.glob(f"/etc/rc[2345].d/S[0-9][0-9]{glob.escape(name)}"))


def _init_for(name: str) -> _Systemd | _SysV | None:
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None:
        return _Systemd()
    script = os.path.join(INIT_D, name)
    if "/" not in name and os.path.isfile(script) and os.access(script, os.X_OK):
        return _SysV()
    return None


def _no_init(name: str) -> dict[str, Any]:
    return {"name": name, "changes": {}, "result": False,
            "comment": f"no supported init system: systemd is not running on this machine and "
                       f"there is no init script {INIT_D}/{name}"}


def _enable(run: StateRun, init: _Systemd | _SysV, name: str, ret: dict[str, Any],
            enable: bool) -> None:
    enabled = init.enabled(name)
    if enabled == enable:
        return
    if run.test:
        ret["result"] = None
        ret["comment"] += f"\nService {name} set to be {'enabled' if enable else 'disabled'}"
        return
    if not init.do("enable" if enable else "disable", name):
        ret["result"] = False
        ret["comment"] += f"\nFailed when setting service {name} to start at boot"
        return
    ret["changes"][name] = True
    ret["comment"] += f"\nService {name} has been {'enabled' if enable else 'disabled'}"


def running(run: StateRun, name: str, enable: bool | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Ensure the service is running (and enabled/disabled when ``enable`` is given)."""
    init = _init_for(name)
    if init is None:
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if init.active(name):
        ret["comment"] = f"The service {name} is already running"
    elif run.test:
        ret["result"] = None
        ret["comment"] = f"Service {name} is set to start"
    else:
        if not init.do("start", name):
            return {**ret, "result": False, "comment": f"Service {name} failed to start"}
        ret["changes"][name] = True
        ret["comment"] = f"Started service {name}"
    if enable is not None:
        _enable(run, init, name, ret, bool(enable))
    return ret


def dead(run: StateRun, name: str, enable: bool | None = None, **kwargs: Any) -> dict[str, Any]:
    """Ensure the service is stopped."""
    init = _init_for(name)
    if init is None:
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if not init.active(name):
        ret["comment"] = f"The service {name} is already dead"
    elif run.test:
        ret["result"] = None
        ret["comment"] = f"Service {name} is set to be killed"
    else:
        if not init.do("stop", name):
            return {**ret, "result": False, "comment": f"Service {name} failed to die"}
        ret["changes"][name] = True
        ret["comment"] = f"Service {name} was killed"
    if enable is not None:
        _enable(run, init, name, ret, bool(enable))
    return ret


def enabled(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Ensure the service starts at boot."""
    init = _init_for(name)
    if init is None:
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True,
                           "comment": f"Service {name} is already enabled, and is in the "
                                      "desired state"}
    before = dict(ret)
    _enable(run, init, name, ret, True)
    if ret != before:
        ret["comment"] = ret["comment"].split("\n", 1)[-1]
    return ret


def mod_watch(run: StateRun, name: str, sfun: str | None = None, reload: bool = False,
              **kwargs: Any) -> dict[str, Any]:
    """A watched state changed: restart (or reload) a running service."""
    init = _init_for(name)
    if init is None:
        return _no_init(name)
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": True, "comment": ""}
    if sfun not in ("running",):
        ret["comment"] = f"Unable to trigger watch for service.{sfun}"
        ret["result"] = False
        return ret
    verb = "reload" if reload else "restart"
    if run.test:
        return {**ret, "result": None, "comment": f"Service is set to be {verb}ed"}
    ret["result"] = init.do(verb, name)
    ret["changes"] = {name: ret["result"]}
    ret["comment"] = f"Service {'reloaded' if reload else 'restarted'}"
    return ret
