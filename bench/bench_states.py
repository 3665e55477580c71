"""State run time: ``hamaster-call --local state.apply`` versus ``salt-call --local`` 3008.5.

Run: ``python bench/bench_states.py [--files 200] [--cmds 50] [--rounds 3]``. Prints figures,
asserts nothing. Trees (issue #16): a 50-state tree (40 ``file.managed`` from a templated
``salt://`` source with a ``map.jinja``, 10 ``cmd.run`` with ``unless``), and the issue's
200 ``file.managed`` + 50 ``cmd.run`` (``unless``) highstate. Each tool runs the highstate on
its own copy of the tree and output directory: a first (converging) run, then ``--rounds``
converged runs (no changes), wall time of the whole process including interpreter start-up.
The salt-call side runs only when the cached Salt venv exists (tests/integration/interop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SALT_CALL = Path("/var/cache/hamaster-interop/salt-3008.5/bin/salt-call")


def make_tree(root: Path, out: Path, files: int, cmds: int) -> None:
    """top.sls → ``bench`` (includes ``bench.files`` and ``bench.cmds``)."""
    (root / "bench").mkdir(parents=True)
    (root / "top.sls").write_text("base:\n  '*':\n    - bench\n")
    (root / "bench" / "map.jinja").write_text(
        "{% set cfg = salt['grains.filter_by']({'Debian': {'user': 'root'}, "
        "'RedHat': {'user': 'root'}}, default='Debian') %}\n")
    (root / "bench" / "tpl.j2").write_text("n={{ n }} host={{ grains['id'] }}\n")
    (root / "bench" / "init.sls").write_text("include:\n  - .files\n  - .cmds\n")
    fl = ["{% from 'bench/map.jinja' import cfg with context %}"]
    for i in range(files):
        fl += [f"{out}/d{i % 10}/f{i}.conf:", "  file.managed:",
               "    - source: salt://bench/tpl.j2", "    - template: jinja",
               "    - makedirs: True", "    - mode: '0644'", "    - user: {{ cfg.user }}",
               f"    - context: {{n: {i}}}"]
    (root / "bench" / "files.sls").write_text("\n".join(fl) + "\n")
    cl = []
    for i in range(cmds):
        cl += [f"cmd{i}:", "  cmd.run:", f"    - name: touch {out}/c{i}",
               f"    - unless: test -e {out}/c{i}"]
    (root / "bench" / "cmds.sls").write_text("\n".join(cl) + "\n")


def setup(base: Path, name: str, files: int, cmds: int) -> Path:
    roots, out, conf = base / f"{name}-roots", base / f"{name}-out", base / f"{name}-conf"
    make_tree(roots, out, files, cmds)
    conf.mkdir()
    (conf / "minion").write_text(yaml.safe_dump({
        "id": "bench", "file_client": "local", "root_dir": str(base / f"{name}-root"),
        "file_roots": {"base": [str(roots)]}, "pillar_roots": {"base": [str(base / "none")]},
        "log_level": "error"}))
    return conf


def run_once(argv: list[str], conf: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    res = subprocess.run([*argv, "-c", str(conf), "--local", "state.apply", "--out", "json"],
                         capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    ret = json.loads(res.stdout)["local"]
    changed = sum(1 for r in ret.values() if r.get("changes"))
    return took, len(ret), changed


def bench(label: str, argv: list[str], conf: Path, rounds: int) -> float:
    first, n, changed = run_once(argv, conf)
    times = []
    for _ in range(rounds):
        took, n2, changed2 = run_once(argv, conf)
        times.append(took)
    med = statistics.median(times)
    print(f"  {label:<22} states={n} first run {first:6.2f} s ({changed} changed); converged "
          f"median {med:6.2f} s (changed={changed2}, {rounds} rounds)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    hm = [str(Path(sys.executable).parent / "hamaster-call")]
    env_pp = os.environ.get("PYTHONPATH")
    print(f"python {sys.version.split()[0]}, PYTHONPATH={env_pp}")
    for files, cmds in ((40, 10), (200, 50)):
        base = Path(tempfile.mkdtemp(prefix="bench-states-"))
        try:
            print(f"tree: {files} file.managed + {cmds} cmd.run(unless)")
            ours = bench("hamaster-call --local", hm, setup(base, "hm", files, cmds),
                         args.rounds)
            if SALT_CALL.exists():
                theirs = bench("salt-call --local", [str(SALT_CALL)],
                               setup(base, "salt", files, cmds), args.rounds)
                print(f"  ratio salt-call / hamaster-call (converged): {theirs / ours:.1f}x")
        finally:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
