"""Pillar compile time: a 50-file tree (top by glob and grain, includes, a map.jinja import).

Run: ``python bench/bench_pillar.py [--files 50] [--rounds 200] [--store]``. Prints figures,
asserts nothing. Target (pillar issue #13): ≤ 20 ms per compile for one minion.

The tree lives in a temporary directory: as a local ``pillar_roots`` directory, or with
``--store`` as ``ha_dir/pillar_roots/base/`` in an ``fs`` store (the clustered layout). The
tree snapshot is retaken every compile (``pillar_tree_ttl: 0``), so each compile lists the tree
and reads every file, as the first compile after a change does. ``cold`` compiles with the result
cache off (``pillar_cache_entries: 0``): the full render. ``warm`` is the same minion again with
the cache on: listing, reading and hashing the tree, then the cached result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hamaster.pillar.compiler import PillarCompiler  # noqa: E402
from hamaster.store.fs import FsStore  # noqa: E402


def make_tree(root: Path, files: int) -> None:
    """``files`` sls files: ``top.sls``, a ``map.jinja``, groups of role files with includes."""
    root.mkdir(parents=True, exist_ok=True)
    roles = max(1, (files - 3) // 2)
    top = ["base:", "  '*':", "    - common"]
    top += ["  'os:Debian':", "    - match: grain", "    - debian"]
    top += ["  'web*':"] + [f"    - roles.r{i}" for i in range(roles)]
    (root / "top.sls").write_text("\n".join(top) + "\n")
    (root / "map.jinja").write_text(
        "{% set settings = salt['grains.filter_by']({'Debian': {'pkg': 'nginx', 'port': 80},"
        " 'RedHat': {'pkg': 'httpd', 'port': 8080}}, grain='os', default='Debian') %}\n")
    (root / "common.sls").write_text("common:\n  motd: hello {{ grains['id'] }}\n  tz: UTC\n")
    (root / "debian.sls").write_text("#!yaml\npkg_manager: apt\n")
    (root / "roles").mkdir(exist_ok=True)
    for i in range(roles):
        (root / "roles" / f"r{i}.sls").write_text(
            f"include:\n  - roles.v{i}\n"
            "{% from 'map.jinja' import settings with context %}\n"
            f"role_{i}:\n  pkg: {{{{ settings.pkg }}}}\n  port: {{{{ settings.port + {i} }}}}\n"
            f"  users:\n{{% for u in range(5) %}}    - user{{{{ u }}}}_{i}\n{{% endfor %}}\n")
        (root / "roles" / f"v{i}.sls").write_text(
            f"role_{i}:\n  version: '1.{i}'\n  tags: [a, b, c]\n")


def run(files: int, rounds: int, store: bool, cache: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-pillar-"))
    try:
        if store:
            ha = tmp / "ha"
            make_tree(ha / "pillar_roots" / "base", files)
            opts = {"pillar_roots": {"base": [str(tmp / "none")]}, "pillar_tree_ttl": 0,
                    "pillar_cache_entries": 4096 if cache else 0}
            compiler = PillarCompiler.from_opts(opts, FsStore(ha))
        else:
            make_tree(tmp / "base", files)
            opts = {"pillar_roots": {"base": [str(tmp / "base")]}, "pillar_tree_ttl": 0,
                    "pillar_cache_entries": 4096 if cache else 0}
            compiler = PillarCompiler.from_opts(opts)
        n = len([p for p in (tmp).rglob("*") if p.is_file()])
        grains = {"id": "web1", "os": "Debian"}
        first0 = time.perf_counter()
        pillar = compiler.compile("web1", grains)
        first = time.perf_counter() - first0
        assert "_errors" not in pillar, pillar["_errors"]
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            compiler.compile("web1", grains)
            times.append(time.perf_counter() - t0)
        times.sort()
        return {
            "layout": "fs store (ha_dir/pillar_roots)" if store else "local pillar_roots dir",
            "result_cache": "warm" if cache else "cold (off)",
            "files": n, "keys": len(pillar), "rounds": rounds,
            "first_compile_ms": round(first * 1000, 2),
            "median_ms": round(statistics.median(times) * 1000, 2),
            "p95_ms": round(times[int(len(times) * 0.95) - 1] * 1000, 2),
            "target_ms": 20,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--store", action="store_true", help="tree in an fs store (ha_dir layout)")
    args = ap.parse_args()
    for cache in (False, True):
        print(json.dumps(run(args.files, args.rounds, args.store, cache), indent=2))


if __name__ == "__main__":
    main()
