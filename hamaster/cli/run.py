"""``hamaster-run``: call a runner (jobs.*, manage.*, cluster.*) on the local master."""

from __future__ import annotations

import argparse

from hamaster.cli.common import add_config_args, die


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster-run",
        description="Run a runner function on the local master (like `salt-run`).",
        epilog=(
            "Runners: jobs.list_jobs, jobs.lookup_jid JID, jobs.print_job JID, "
            "manage.status,\nmanage.up, manage.down, cluster.status, state.event [TAGMATCH] "
            "[count=N]\n[pretty=True] [position=P], schedule.list, salt.execute TGT FUN "
            "[ARG]\nExamples:\n  hamaster-run jobs.lookup_jid 20261125225206145339\n  hamaster-run "
            "manage.status --out json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--out", default="nested", choices=["nested", "json", "yaml", "txt", "raw"])
    p.add_argument("fun", metavar="FUN")
    p.add_argument("args", nargs="*", metavar="ARG")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    from hamaster.cliargs import parse_cli_args, split_args
    from hamaster.config import ConfigError, load_master_config
    from hamaster.localapi import LocalApiError, LocalClient
    from hamaster.output import render_value

    try:
        opts = load_master_config(args.config_dir)
    except ConfigError as exc:
        return die(str(exc))
    pos, kw = split_args(parse_cli_args(args.args))
    if args.fun == "state.event":
        return _state_event(opts, pos, kw, args.out)
    if args.fun.startswith("jobs.") and pos:
        pos = [str(a) for a in pos]  # jids are strings even though they look like numbers
    try:
        with LocalClient(opts["sock_dir"]) as client:
            reply = client.call({"cmd": "runner", "fun": args.fun, "arg": pos, "kwarg": kw})
    except LocalApiError as exc:
        return die(str(exc), 1)
    print(render_value(reply.get("return"), args.out))
    return 0


def _state_event(opts: dict, pos: list, kw: dict, out: str) -> int:
    """``state.event [tagmatch] [count=N] [pretty=True] [position=P]``: follow the cluster's
    event stream through the local master; each event as Salt prints it (``tag\tdata``), or one
    JSON object per line with ``--out json`` (with its ``position``: pass the last one back as
    ``position=`` to resume, through any master)."""
    import json
    import sys

    from hamaster.localapi import LocalApiError, LocalClient

    tagmatch = str(kw.pop("tagmatch", pos[0] if pos else "*"))
    count = int(kw.pop("count", -1))
    pretty = bool(kw.pop("pretty", False))
    position = kw.pop("position", None)
    seen = 0
    try:
        with LocalClient(opts["sock_dir"]) as client:
            if count == 0:   # only the position (now, or after ``position``): resume from it later
                reply = client.call({"cmd": "runner", "fun": "state.event", "arg": [],
                                     "kwarg": {"position": position, "wait": 0, "limit": 10**6,
                                               "tagmatch": "*"}})
                print(json.dumps({"position": (reply.get("return") or {}).get("position")}))
                return 0
            while count < 0 or seen < count:
                left = 1000 if count < 0 else count - seen
                reply = client.call({"cmd": "runner", "fun": "state.event", "arg": [],
                                     "kwarg": {"tagmatch": tagmatch, "position": position,
                                               "wait": 2.0, "limit": left}})
                if "error" in reply:
                    return die(str(reply["error"]), 1)
                ret = reply.get("return") or {}
                position = ret.get("position") or position
                for ev in ret.get("events", []):
                    if out == "json":
                        print(json.dumps(ev, default=str), flush=True)
                    else:
                        data = json.dumps(ev.get("data"), default=str, sort_keys=True,
                                          indent=4 if pretty else None)
                        print(f"{ev.get('tag')}\t{data}", flush=True)
                    seen += 1
    except LocalApiError as exc:
        print(f"# resume with position={position}", file=sys.stderr)
        return die(str(exc), 1)
    except KeyboardInterrupt:
        print(f"# resume with position={position}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
