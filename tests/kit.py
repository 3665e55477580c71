"""The test kit: free ports, waiting on a condition, tearing down processes we started.

One copy of each primitive for ``tests/unit``, ``tests/integration`` (whose ``harness.py`` builds
its ``Proc`` and ``Cluster`` on these) and ``bench/`` (the scripts put the repository root on
``sys.path`` and import ``tests.kit``). It lives with the tests, not in the ``hamaster`` package:
nothing shipped needs it, except ``free_port``, which ``hamaster-cluster`` needs at run time and
which is therefore the package's own (re-exported here, so there is still one copy).

Rules it encodes (the project's): no fixed sleep as synchronisation, a wait has a deadline and
says what it waited for; only processes we started are signalled, by their process group (every
process here is started with ``start_new_session=True``, so its pid is its group id).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hamaster.cluster_services import free_port

__all__ = ["WaitTimeout", "free_port", "free_ports", "group_members", "kill_group", "rss_mib",
           "stop_group", "wait_until"]

log = logging.getLogger(__name__)


class WaitTimeout(AssertionError, TimeoutError):
    """A ``wait_until`` deadline passed: a test failure (AssertionError), also a TimeoutError."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition", ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll ``cond`` until it returns a truthy value, and return that value.

    ``cond`` is called at least once, and once more at the deadline. An exception of a type in
    ``ignore`` counts as "not yet" (kept as the last value for the message). At the deadline
    raises :class:`WaitTimeout` naming ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(min(interval, left))


def group_members(pgid: int) -> list[int]:
    """The pids in process group ``pgid`` (Linux ``/proc``), zombies included."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            pids.append(int(entry))
    return pids


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(popen: subprocess.Popen) -> bool:
    """True once the leader has exited; it is NOT reaped, so its pid (= the group id) cannot be
    reused by a stranger while we still signal the group."""
    try:
        return os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _close_pipes(popen: subprocess.Popen) -> None:
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def stop_group(popen: subprocess.Popen | None, timeout: float = 10.0, linger: float = 3.0,
               sig: int = signal.SIGTERM) -> float | None:
    """Stop the process group led by ``popen`` (started with ``start_new_session=True``).

    SIGCONT (a stopped leader would never see the signal) and ``sig`` to the group; wait up to
    ``timeout`` s for the leader to exit, else SIGKILL the group. Whatever is still in the group
    then (workers, job processes) gets ``sig`` again and ``linger`` s before a SIGKILL. Only then
    is the leader reaped: until that moment its pid, the group id, cannot be given to another
    process, so no signal can reach a stranger. The pipes are closed. Idempotent; a process
    already reaped (``poll()`` saw it exit) is not signalled. Returns the seconds the leader took
    to exit after the signal, or None if it had exited already.
    """
    if popen is None:
        return None
    pgid = popen.pid
    took: float | None = None
    if popen.returncode is None:
        if not _exited(popen):
            t0 = time.monotonic()
            _signal_group(pgid, signal.SIGCONT)
            _signal_group(pgid, sig)
            try:
                wait_until(lambda: _exited(popen), timeout, 0.02, f"pid {pgid} exit")
            except WaitTimeout:
                log.warning("pid %s still running %.0f s after signal %s: killing its group",
                            pgid, timeout, sig)
                _signal_group(pgid, signal.SIGKILL)
                wait_until(lambda: _exited(popen), 10, 0.02, f"pid {pgid} exit after SIGKILL")
            took = time.monotonic() - t0
        if [p for p in group_members(pgid) if p != pgid]:
            _signal_group(pgid, sig)
            try:
                wait_until(lambda: group_members(pgid) in ([], [pgid]), linger, 0.05,
                           f"process group {pgid} exit")
            except WaitTimeout:
                _signal_group(pgid, signal.SIGKILL)
        popen.wait(10)
    _close_pipes(popen)
    return took


def kill_group(popen: subprocess.Popen | None) -> None:
    """SIGKILL the process group led by ``popen``, reap the leader, close the pipes."""
    if popen is None:
        return
    if popen.returncode is None:  # not reaped: the group id is still ours
        _signal_group(popen.pid, signal.SIGKILL)
        popen.wait(10)
    _close_pipes(popen)
