"""A real process that swaps a directory for a symlink in a tight loop (file server race tests).

``flipping(base, target)`` runs, in its own process group, a Python subprocess that cycles
``base/d`` between the real directory ``base/d.real`` (which the test fills) and a symlink to
``target``, with plain renames, until the context exits (the group is killed by its pid).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.kit import kill_group, wait_until

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
        wait_until(lambda: (base / "flipper.ready").exists() or proc.poll() is not None,
                   timeout, 0.01, "the flipper to start")
        assert proc.poll() is None, f"flipper did not start (exit {proc.poll()})"
        yield proc
        assert proc.poll() is None, "the flipper died: the race was not exercised"
    finally:
        kill_group(proc)
