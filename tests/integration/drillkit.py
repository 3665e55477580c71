"""Helpers shared by the drill tests: write a drill file from an example, run hamaster-drill."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from tests.integration.harness import BIN

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "drills"


def drill_file(base: Path, example: str, **changes: object) -> Path:
    """``examples/drills/<example>.yaml`` aimed at the cluster in ``base``, with ``changes``.

    Top-level keys are replaced, except ``backend``, which is merged into the example's.
    """
    doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    doc["cluster_dir"] = str(base)
    # CI shares 2 cores with everything else: a ping answered in 3-5 s is slow, not failed.
    doc.setdefault("ping_timeout_s", 5.0)
    for key, value in changes.items():
        if key == "backend":
            doc["backend"] = {**doc.get("backend", {}), **value}  # type: ignore[dict-item]
        else:
            doc[key] = value
    path = base / f"drill-{example}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_drill(path: Path, timeout: float = 150) -> tuple[int, dict, str]:
    """``hamaster-drill run PATH --out json``: (exit status, JSON document, stderr)."""
    res = subprocess.run([str(BIN / "hamaster-drill"), "run", str(path), "--out", "json"],
                         capture_output=True, text=True, timeout=timeout)
    try:
        doc = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON from hamaster-drill (rc "
                             f"{res.returncode}):\n{res.stdout}\n{res.stderr}") from None
    return res.returncode, doc, res.stderr


def assert_drill_passed(rc: int, doc: dict, err: str) -> dict:
    """Fail with every objective, note, ping failure and the drill's log unless the drill passed,
    the cluster was healthy afterwards and everything it touched was restored; returns the
    figures."""
    m = doc["measured"]
    assert rc == 0 and doc["ok"], (f"rc {rc}\n{json.dumps(doc['objectives'], indent=1)}\n"
                                   f"{doc['notes']}\nping failures: {m.get('ping_failures')}\n"
                                   f"{err}")
    assert m["healthy_after"] is True and not doc["restore_problems"], doc["restore_problems"]
    return m
