"""The README's main command, ``hamaster-cluster demo``, run as an operator runs it (own dir)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.integration.harness import BIN


def test_demo_passes_and_cleans_up() -> None:
    base = Path(tempfile.mkdtemp(prefix="hmdemo-", dir="/tmp"))
    try:
        res = subprocess.run([str(BIN / "hamaster-cluster"), "demo", "--dir", str(base)],
                             capture_output=True, text=True, timeout=180)
        out = res.stdout
        assert res.returncode == 0 and out.rstrip().endswith("demo passed"), out + res.stderr
        # Every minion answered through the survivor while master1 was dead, and through
        # master1 again after its restart.
        assert re.search(r"ping through master2 with master1 dead: 3/3 in", out), out
        assert re.search(r"ping through master1 again: 3/3", out), out
        state = json.loads((base / "cluster.json").read_text())
        for entry in (state.get("services", []) + state.get("masters", [])
                      + state.get("minions", [])):
            assert not entry.get("pid"), f"{entry['name']} still recorded as running after the demo"
    finally:
        subprocess.run([str(BIN / "hamaster-cluster"), "down", "--dir", str(base)],
                       capture_output=True, timeout=90)
        shutil.rmtree(base, ignore_errors=True)
