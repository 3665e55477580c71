"""``hamaster-drill``: run a scripted failure against a live cluster and check the objectives."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from hamaster.cli.common import die

EPILOG = """\
examples:
  hamaster-cluster up --dir /tmp/hamaster-demo --masters 2 --minions 3
  hamaster-drill list
  hamaster-drill run examples/drills/kill.yaml
  hamaster-drill run examples/drills/freeze.yaml --out json --json-file /tmp/freeze.json

a drill file (YAML):
  name: kill master1
  scenario: kill                 # hamaster-drill list
  cluster_dir: /tmp/hamaster-demo  # or masters: [...] / minions: [...] with commands
  victim: master1
  hold_s: 1                      # keep the failure this long after it is detected
  objectives: {max_failed_pings: 0, max_detect_s: 10, max_recovery_s: 5,
               max_lost_results: 0, key_change_visible: true}

Ctrl-C (or SIGTERM/SIGHUP) at any time restores what the drill stopped, froze, cut or moved,
then exits 130. See docs/drills.md.

exit status: 0 every objective met, 1 an objective missed, 2 bad drill file or usage,
3 the drill could not run (cluster unhealthy before it, a command failed), 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster-drill",
        description="Failover drills: break one thing on purpose, measure what users feel, restore "
        "it, and fail loudly when an objective is missed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a drill file", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("drill", metavar="DRILL.yaml", help="the drill file")
    r.add_argument("--out", choices=["table", "json"], default="table",
                   help="what to print on stdout (default table)")
    r.add_argument("--json-file", metavar="FILE", help="also write the JSON result to FILE")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    lp = sub.add_parser("list", help="show the scenarios, one line each")
    lp.add_argument("-v", "--verbose", action="store_true", help="also show each scenario's limits")
    c = sub.add_parser("check", help="validate a drill file without running it")
    c.add_argument("drill", metavar="DRILL.yaml")
    return p


def cmd_list(verbose: bool = False) -> int:
    from hamaster.drill.spec import SCENARIOS

    for s in SCENARIOS.values():
        caveat = " [limits: list -v]" if s.note and not verbose else ""
        print(f"{s.name:<16} {s.summary}{caveat}")
        if s.note and verbose:
            print(textwrap.indent(textwrap.fill(f"note: {s.note}", 84), " " * 17))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.cmd == "list":
        return cmd_list(args.verbose)
    from hamaster.drill import DrillError
    from hamaster.drill.spec import load_drill

    try:
        drill = load_drill(args.drill)
    except DrillError as exc:
        return die(str(exc))
    if args.cmd == "check":
        print(f"{args.drill}: ok (scenario {drill.scenario}, {len(drill.masters)} masters, "
              f"{len(drill.minions)} minions)")
        return 0
    from hamaster.drill.run import DrillRun, exit_code, render_table

    progress = (lambda s: None) if args.quiet else None
    try:
        res = DrillRun(drill, progress=progress).execute()
    except DrillError as exc:  # set-up failures before anything was broken
        return die(str(exc), 3)
    doc = json.dumps(res, indent=2, default=str)
    if args.json_file:
        try:
            with open(args.json_file, "w") as fh:
                fh.write(doc + "\n")
        except OSError as exc:
            print(f"Error: cannot write {args.json_file}: {exc}", file=sys.stderr)
    print(doc if args.out == "json" else render_table(res), flush=True)
    return exit_code(res)


if __name__ == "__main__":
    raise SystemExit(main())
