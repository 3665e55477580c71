"""A real process that swaps a directory for a symlink in a tight loop (file server race tests).

``flipping(base, target)`` runs, in its own process group, a Python subprocess that cycles
``base/d`` between the real directory ``base/d.real`` (which the test fills) and a symlink to
``target``, with plain renames, until the context exits (the group is killed by its pid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_SCRIPT = r"""
import os, sys
base, target = sys.argv[1], sys.argv[2]
d, real, link = (os.path.join(base, n) for n in ("d", "d.real", "d.link"))
os.symlink(target, link)
open(os.path.join(base, "flipper.ready"), "w").close()
while True:
    os.rename(real, d)
    os.rename(d, real)
    os.rename(link, d)
    os.rename(d, link)
"""


@contextlib.contextmanager
def flipping(base: Path, target: Path, timeout: float = 10.0) -> Iterator[subprocess.Popen]:
    """Swap ``base/d`` between ``base/d.real`` and a symlink to ``target`` while inside."""
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(base), str(target)],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (base / "flipper.ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"flipper did not start (exit {proc.poll()})")
            time.sleep(0.01)
        yield proc
        assert proc.poll() is None, "the flipper died: the race was not exercised"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
