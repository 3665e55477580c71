"""The ``cmd`` execution module: run shell commands on the minion (Salt's ``cmd.run`` family).

Commands run in their own session (process group) so a timeout kills the command and every
child it started. Environment values are never logged: they may hold secrets.
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hamaster.ids import shown
from hamaster.minion.modules.context import CommandExecutionError, ExecContext

log = logging.getLogger(__name__)

DEFAULT_SHELL = "/bin/sh"
_LOG_LEVELS = {
    "trace": logging.DEBUG, "garbage": logging.DEBUG, "debug": logging.DEBUG,
    "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


@dataclass
class _Completed:
    pid: int
    retcode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def _normalize_env(env: Any) -> dict[str, str]:
    """Accept a dict or Salt's list of single-key dicts; values become strings."""
    if env is None or env == "":
        return {}
    if isinstance(env, Mapping):
        pairs = env.items()
    elif isinstance(env, Sequence) and not isinstance(env, str):
        pairs = []
        for entry in env:
            if not isinstance(entry, Mapping):
                raise CommandExecutionError(
                    "env must be a mapping or a list of single-key mappings"
                )
            pairs.extend(entry.items())
    else:
        raise CommandExecutionError("env must be a mapping or a list of single-key mappings")
    return {str(k): "" if v is None else str(v) for k, v in pairs}


def _user_info(runas: str | None) -> pwd.struct_passwd | None:
    if not runas:
        return None
    try:
        return pwd.getpwnam(runas)
    except KeyError:
        raise CommandExecutionError(f"user {runas!r} does not exist") from None


def _build_argv(cmd: Any, shell: str | None, python_shell: bool) -> list[str]:
    if isinstance(cmd, (list, tuple)):
        if not cmd:
            raise CommandExecutionError("cmd must not be empty")
        return [str(part) for part in cmd]
    text = str(cmd)
    if not text.strip():
        raise CommandExecutionError("cmd must not be empty")
    if python_shell:
        return [shell or DEFAULT_SHELL, "-c", text]
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise CommandExecutionError(f"cannot split command {text!r}: {exc}") from None
    return argv


def _program(cmd: Any) -> str:
    """The program a command runs, for log lines above ``output_loglevel``.

    A failing or timed-out command is logged by its program name only: the whole command line
    (which may carry a password) goes only to the "Executing command" line, at the job's
    ``output_loglevel`` (debug by default, nothing with ``quiet``).
    """
    if isinstance(cmd, (list, tuple)):
        first = str(cmd[0]) if cmd else ""
    else:
        first = str(cmd).strip().split(None, 1)[0] if str(cmd).strip() else ""
    return shown(os.path.basename(first) or first, 60)


def _log_command(cmd: Any, output_loglevel: str, cwd: str, runas: str | None) -> None:
    level_name = str(output_loglevel).lower()
    if level_name == "quiet":
        return
    level = _LOG_LEVELS.get(level_name, logging.DEBUG)
    who = f" as user {runas!r}" if runas else ""
    log.log(level, "Executing command %r in directory %r%s", cmd, cwd, who)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _run(cmd: Any, *, cwd: str | None, env: Any, timeout: Any, shell: str | None,
         python_shell: bool, stdin: str | bytes | None, runas: str | None,
         output_loglevel: str, redirect_stderr: bool, rstrip: bool = True) -> _Completed:
    """Run one command; return its pid, exit code and decoded output."""
    user = _user_info(runas)
    if user is not None and os.getuid() != 0 and user.pw_uid != os.getuid():
        raise CommandExecutionError(f"runas={runas!r} needs the minion to run as root")
    if cwd is None:
        cwd = user.pw_dir if user is not None else os.path.expanduser("~")
    if not os.path.isdir(cwd):
        raise CommandExecutionError(f"specified cwd {cwd!r} either not absolute or does not exist")
    argv = _build_argv(cmd, shell, python_shell)
    run_env = dict(os.environ)
    if user is not None:
        run_env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    run_env.update(_normalize_env(env))
    seconds: float | None = None
    if timeout not in (None, "", 0):
        try:
            seconds = float(timeout)
        except (TypeError, ValueError):
            raise CommandExecutionError(f"timeout must be a number, got {timeout!r}") from None
    _log_command(cmd, output_loglevel, cwd, runas)
    extra: dict[str, Any] = {}
    if user is not None and user.pw_uid != os.getuid():
        extra = {"user": user.pw_uid, "group": user.pw_gid,
                 "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=run_env,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if redirect_stderr else subprocess.PIPE,
            start_new_session=True, **extra,
        )
    except OSError as exc:
        raise CommandExecutionError(f"unable to run command {argv[0]!r}: {exc}") from None
    try:
        out, err = proc.communicate(input=data, timeout=seconds)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("command %s (pid %d) left pipes open after being killed", _program(cmd),
                        proc.pid)
        proc.wait()
        log.info("command %s timed out after %s seconds; process group killed", _program(cmd),
                 timeout)
        return _Completed(proc.pid, 1, f"Timed out after {timeout} seconds", "", timed_out=True)

    def decode(raw: bytes | None) -> str:
        text = (raw or b"").decode("utf-8", errors="replace")
        return text.rstrip() if rstrip else text

    return _Completed(proc.pid, proc.returncode, decode(out), decode(err))


def _set_retcode(ctx: ExecContext, result: _Completed, ignore_retcode: bool, cmd: Any) -> None:
    if result.retcode != 0 and not ignore_retcode:
        log.error("Command %s... (pid %d) failed with return code: %d", _program(cmd), result.pid,
                  result.retcode)
        ctx.retcode = result.retcode


def _ignore_extra(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(k for k in kwargs if not k.startswith("__"))
    if unknown:
        log.debug("cmd: ignoring unsupported arguments: %s", ", ".join(unknown))


def run(ctx: ExecContext, cmd: str | list[str], cwd: str | None = None, env: Any = None,
        timeout: float | None = None, shell: str | None = None, python_shell: bool = True,
        stdin: str | None = None, runas: str | None = None, output_loglevel: str = "debug",
        ignore_retcode: bool = False, redirect_stderr: bool = True, rstrip: bool = True,
        **kwargs: Any) -> str:
    """Run ``cmd`` and return its output (stderr merged into stdout), trailing whitespace removed.

    With ``redirect_stderr=False`` only stdout is returned.
    A non-zero exit code fails the job (unless ``ignore_retcode=True``). ``cmd`` given as a
    list runs without a shell; ``python_shell=False`` splits a string without a shell.
    ``env`` is merged over the minion's environment; ``timeout`` (seconds) kills the command's
    whole process group. ``cwd`` defaults to the home directory of ``runas`` or of the minion.

    CLI Example: ``hamaster '*' cmd.run "ls -l | awk '/foo/{print \\$2}'"``
    """
    _ignore_extra(kwargs)
    result = _run(cmd, cwd=cwd, env=env, timeout=timeout, shell=shell, python_shell=python_shell,
                  stdin=stdin, runas=runas, output_loglevel=output_loglevel,
                  redirect_stderr=redirect_stderr, rstrip=rstrip)
    _set_retcode(ctx, result, ignore_retcode, cmd)
    if result.stderr:
        log.debug("stderr of %r is not part of cmd.run's return (redirect_stderr=False)", cmd)
    return result.stdout


def run_all(ctx: ExecContext, cmd: str | list[str], cwd: str | None = None, env: Any = None,
            timeout: float | None = None, shell: str | None = None, python_shell: bool = True,
            stdin: str | None = None, runas: str | None = None, output_loglevel: str = "debug",
            ignore_retcode: bool = False, redirect_stderr: bool = False, rstrip: bool = True,
            **kwargs: Any) -> dict[str, Any]:
    """Run ``cmd`` and return ``{"pid", "retcode", "stdout", "stderr"}``.

    A non-zero exit code fails the job unless ``ignore_retcode=True``. Other arguments as
    for ``cmd.run``; stderr is kept separate unless ``redirect_stderr=True``.

    CLI Example: ``hamaster '*' cmd.run_all "ls -l | awk '/foo/{print \\$2}'"``
    """
    _ignore_extra(kwargs)
    result = _run(cmd, cwd=cwd, env=env, timeout=timeout, shell=shell, python_shell=python_shell,
                  stdin=stdin, runas=runas, output_loglevel=output_loglevel,
                  redirect_stderr=redirect_stderr, rstrip=rstrip)
    _set_retcode(ctx, result, ignore_retcode, cmd)
    return {"pid": result.pid, "retcode": result.retcode,
            "stdout": result.stdout, "stderr": result.stderr}


def retcode(ctx: ExecContext, cmd: str | list[str], cwd: str | None = None, env: Any = None,
            timeout: float | None = None, shell: str | None = None, python_shell: bool = True,
            stdin: str | None = None, runas: str | None = None, output_loglevel: str = "debug",
            ignore_retcode: bool = False, redirect_stderr: bool = False,
            **kwargs: Any) -> int:
    """Run ``cmd`` and return its exit code; a non-zero code does not fail the job.

    CLI Example: ``hamaster '*' cmd.retcode "file /bin/bash"``
    """
    _ignore_extra(kwargs)
    result = _run(cmd, cwd=cwd, env=env, timeout=timeout, shell=shell, python_shell=python_shell,
                  stdin=stdin, runas=runas, output_loglevel=output_loglevel,
                  redirect_stderr=redirect_stderr)
    if result.retcode != 0 and not ignore_retcode:
        log.info("Command %s... returned code %d", _program(cmd), result.retcode)
    return result.retcode


def run_stdout(ctx: ExecContext, cmd: str | list[str], cwd: str | None = None, env: Any = None,
               timeout: float | None = None, shell: str | None = None,
               python_shell: bool = True, stdin: str | None = None, runas: str | None = None,
               output_loglevel: str = "debug", ignore_retcode: bool = False,
               rstrip: bool = True, **kwargs: Any) -> str:
    """Run ``cmd`` and return only its standard output; a non-zero exit code fails the job.

    CLI Example: ``hamaster '*' cmd.run_stdout "ls -l | grep foo"``
    """
    _ignore_extra(kwargs)
    result = _run(cmd, cwd=cwd, env=env, timeout=timeout, shell=shell, python_shell=python_shell,
                  stdin=stdin, runas=runas, output_loglevel=output_loglevel,
                  redirect_stderr=False, rstrip=rstrip)
    _set_retcode(ctx, result, ignore_retcode, cmd)
    return result.stdout


def run_stderr(ctx: ExecContext, cmd: str | list[str], cwd: str | None = None, env: Any = None,
               timeout: float | None = None, shell: str | None = None,
               python_shell: bool = True, stdin: str | None = None, runas: str | None = None,
               output_loglevel: str = "debug", ignore_retcode: bool = False,
               rstrip: bool = True, **kwargs: Any) -> str:
    """Run ``cmd`` and return only its standard error; a non-zero exit code fails the job.

    CLI Example: ``hamaster '*' cmd.run_stderr "ls /nonexistent"``
    """
    _ignore_extra(kwargs)
    result = _run(cmd, cwd=cwd, env=env, timeout=timeout, shell=shell, python_shell=python_shell,
                  stdin=stdin, runas=runas, output_loglevel=output_loglevel,
                  redirect_stderr=False, rstrip=rstrip)
    _set_retcode(ctx, result, ignore_retcode, cmd)
    return result.stdout if result.timed_out else result.stderr

