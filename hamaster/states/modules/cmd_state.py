"""The ``cmd`` state module: ``cmd.run``, ``cmd.wait`` and ``cmd.script`` (local paths).

``unless``, ``onlyif`` and ``creates`` are handled by the runner for every state, as in Salt.
"""

from __future__ import annotations

from typing import Any

from hamaster.states.runner import StateRun


def run(run: StateRun, name: str, cwd: str | None = None, runas: str | None = None,
        shell: str | None = None, env: Any = None, timeout: float | None = None,
        stateful: bool = False, output_loglevel: str = "debug", success_retcodes: Any = None,
        **kwargs: Any) -> dict[str, Any]:
    """Run ``name`` in a shell; changes hold pid, retcode, stdout and stderr."""
    ret: dict[str, Any] = {"name": name, "changes": {}, "result": False, "comment": ""}
    if run.test:
        ret["result"] = None
        ret["comment"] = f'Command "{name}" would have been executed'
        ret["changes"] = {"cmd": name}
        return ret
    try:
        out = run.call("cmd.run_all", name, cwd=cwd, runas=runas, shell=shell, env=env,
                       timeout=timeout, python_shell=True, output_loglevel=output_loglevel,
                       ignore_retcode=True)
    except Exception as exc:
        ret["comment"] = str(exc)
        return ret
    ret["changes"] = out
    ok = [0] + ([int(c) for c in success_retcodes] if isinstance(success_retcodes, list)
                else [int(success_retcodes)] if success_retcodes is not None else [])
    ret["result"] = out.get("retcode") in ok
    ret["comment"] = f'Command "{name}" run'
    return ret


def wait(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Do nothing unless a ``watch`` fires (then ``mod_watch`` runs the command)."""
    return {"name": name, "changes": {}, "result": True, "comment": ""}


def script(run: StateRun, name: str, source: str | None = None, args: str = "",
           cwd: str | None = None, runas: str | None = None, env: Any = None,
           **kwargs: Any) -> dict[str, Any]:
    """Fetch ``source`` (``salt://`` or a local path) to a temporary file and run it."""
    import os
    import shlex
    import tempfile

    ret: dict[str, Any] = {"name": name, "changes": {}, "result": False, "comment": ""}
    src = source or name
    data = run.read(src, run.saltenv) if str(src).startswith("salt://") else None
    if data is None and os.path.isabs(str(src)) and os.path.isfile(str(src)):
        with open(str(src), "rb") as fh:
            data = fh.read()
    if data is None:
        ret["comment"] = f"Unable to cache script {src} from saltenv '{run.saltenv}'"
        return ret
    if run.test:
        ret["result"] = None
        ret["comment"] = f"Command '{name}' would have been executed"
        return ret
    fd, path = tempfile.mkstemp(prefix="hamaster-script-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o755)
        cmd = path + (" " + args if args else "")
        out = run.call("cmd.run_all", cmd, cwd=cwd, runas=runas, env=env, python_shell=True,
                       ignore_retcode=True)
    finally:
        os.unlink(path)
    ret["changes"] = out
    ret["result"] = out.get("retcode") == 0
    ret["comment"] = f"Command '{shlex.quote(name)}' run"
    return ret


def mod_watch(run: StateRun, name: str, sfun: str | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """A watched state changed: run the command (``cmd.wait``/``cmd.run``/``cmd.script``)."""
    kwargs.pop("__reqs__", None)
    if sfun == "script":
        return script(run, name, **kwargs)
    if sfun in ("wait", "run", "watch", None):
        return globals()["run"](run, name, **kwargs)
    return {"name": name, "changes": {}, "result": False,
            "comment": f"cmd.{sfun} does not work with the watch requisite, please use "
                       "cmd.wait or cmd.wait_script"}
