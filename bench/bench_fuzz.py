"""Fuzz the master's request path for longer than the unit suite does, and print figures.

Run: ``python bench/bench_fuzz.py [--seconds 60] [--seed 0] [--unguided]``. The target is the
sans-io request handler (``tests/unit/request_fuzz.py``: a real ``RequestHandler`` over a real
key registry, an accepted minion with a live session). Inputs are byte-level mutations of valid
frames; an input that reaches a line of ``hamaster/bus`` or the handler not reached before joins
the corpus (coverage-guided). The property checked on every input: ``handle`` never raises and
answers with a frame Salt's minion can decode. Also prints the cost of refusing the hostile
frames of issue #18 (no tracer: the figure the event loop sees).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.request_fuzz import check, fuzz, make_rig  # noqa: E402


def refusal_costs(rig) -> dict[str, float]:
    """Milliseconds to answer hostile frames (median of 5), untraced."""
    n = 8 * 1024 * 1024
    frames = {
        "array_of_8M_empty_arrays": b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,
        "8M_nested_arrays": b"\x91" * n + b"\x90",
        "64KiB_of_fixarrays": b"\x9f" * 65536,
        "clear_over_cap": b"\x83\xa3enc\xa5clear\xa4load\xdb" + (200000).to_bytes(4, "big")
                          + b"x" * 200000 + b"\xa7version\x03",
    }
    out = {}
    for name, frame in frames.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            kind = check(rig, frame)
            times.append(time.perf_counter() - t0)
            assert kind == "refused", (name, kind)
        out[name + "_ms"] = round(sorted(times)[2] * 1000, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unguided", action="store_true", help="no coverage feedback (faster execs)")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # every refusal logs a line; the figures are the output
    rig = make_rig()
    try:
        costs = refusal_costs(rig)
        report = fuzz(rig, args.seconds, seed=args.seed, guided=not args.unguided)
    finally:
        rig.close()
    print(json.dumps({
        "seconds": round(report.seconds, 1),
        "execs": report.execs,
        "execs_per_s": round(report.execs / max(report.seconds, 1e-9)),
        "corpus": report.corpus,
        "lines_covered": report.lines,
        "replies": report.kinds,
        "slowest_exec_ms": round(report.slowest_s * 1000, 2),
        "failures": 0,
        **costs,
    }))


if __name__ == "__main__":
    main()
