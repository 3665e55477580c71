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
            "Runners: jobs.list_jobs, jobs.lookup_jid JID, jobs.print_job JID, manage.status,\n"
            "manage.up, manage.down, cluster.status\n"
            "Examples:\n  hamaster-run jobs.lookup_jid 20261125225206145339\n  hamaster-run manage.status --out json"
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
    if args.fun.startswith("jobs.") and pos:
        pos = [str(a) for a in pos]  # jids are strings even though they look like numbers
    try:
        with LocalClient(opts["sock_dir"]) as client:
            reply = client.call({"cmd": "runner", "fun": args.fun, "arg": pos, "kwarg": kw})
    except LocalApiError as exc:
        return die(str(exc), 1)
    print(render_value(reply.get("return"), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
