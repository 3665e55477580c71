"""docs/architecture.md's module map is the code's (one line per module, from its docstring)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_module_map_is_current_and_every_module_has_a_docstring() -> None:
    script = ROOT / "scripts" / "gen-module-map"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "(no docstring)" not in text
    modules = [p for p in (ROOT / "hamaster").rglob("*.py") if "__pycache__" not in p.parts]
    for p in modules:
        assert f"| `{p.relative_to(ROOT).as_posix()}` |" in text, p
