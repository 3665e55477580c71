"""The test kit itself: ports, waits, and teardown of real process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit import (
    WaitTimeout,
    free_port,
    free_ports,
    group_members,
    kill_group,
    stop_group,
    wait_until,
)

# A leader that forks a child ignoring SIGTERM, prints the child's pid, then waits forever.
STUBBORN_CHILD = r"""
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
print(pid, flush=True)
while True:
    time.sleep(1)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    socks = []
    try:
        for p in [*ports, free_port()]:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def test_wait_until_returns_the_value_and_names_what_timed_out() -> None:
    calls = []
    assert wait_until(lambda: calls.append(1) or (len(calls) >= 3 and "yes"), 5, 0.001) == "yes"
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waiting for the moon \(last: 0\)"):
        wait_until(lambda: 0, 0.2, 0.05, "the moon")
    assert 0.2 <= time.monotonic() - t0 < 2
    # a test failure, and a TimeoutError for callers that catch that
    assert issubclass(WaitTimeout, AssertionError) and issubclass(WaitTimeout, TimeoutError)


def test_wait_until_ignores_only_the_named_exceptions() -> None:
    tries = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError("not yet")
        return "up"

    assert wait_until(flaky, 5, 0.001, ignore=(OSError,)) == "up"
    with pytest.raises(WaitTimeout, match="not yet"):
        wait_until(lambda: (_ for _ in ()).throw(OSError("not yet")), 0.1, 0.01, ignore=(OSError,))
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), 1, ignore=(OSError,))


def test_stop_group_stops_a_stopped_leader_and_a_child_that_ignores_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert sorted(group_members(proc.pid)) == sorted([proc.pid, child])
    os.kill(proc.pid, signal.SIGSTOP)               # a stopped leader still gets the SIGTERM
    took = stop_group(proc, timeout=5, linger=0.3)
    assert took is not None and took < 5
    assert proc.returncode == -signal.SIGTERM
    wait_until(lambda: not _alive(child), 5, 0.02, "the child killed after the linger")
    assert proc.stdout.closed
    assert stop_group(proc) is None                 # idempotent


def test_stop_group_kills_a_leader_that_ignores_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(1, flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
    stop_group(proc, timeout=0.3)
    assert proc.returncode == -signal.SIGKILL


def test_kill_group_and_a_reaped_process_is_not_signalled() -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    kill_group(proc)                                # reaped: no signal to a reused pid
    done = subprocess.Popen(["true"], start_new_session=True)
    done.wait()
    assert stop_group(done) is None and done.returncode == 0
