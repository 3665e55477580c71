"""``hamaster``: publish a job through the local master and print the returns as they arrive."""

from __future__ import annotations

import argparse
import sys

from hamaster.cli.common import add_config_args, die

NO_RETURN = "Minion did not return. [No response]"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster",
        description="Run FUN on the minions matching TARGET, through the local master (like `salt`).",
        epilog=(
            "Examples:\n"
            "  hamaster '*' test.ping\n"
            "  hamaster -L web1,web2 cmd.run 'uptime'\n"
            "  hamaster -G os:Debian test.version\n"
            "  hamaster -C 'G@os:Debian and web*' cmd.run 'id' cwd=/tmp\n"
            "  hamaster --out json --static '*' grains.items\n"
            "Exit status: 0 when every targeted minion returned with retcode 0, 1 otherwise,\n"
            "2 when no minion matched or the master could not be reached."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, log_short=False)
    tg = p.add_mutually_exclusive_group()
    tg.add_argument("-L", "--list", dest="tgt_type", action="store_const", const="list", help="target is a comma-separated list of ids")
    tg.add_argument("-E", "--pcre", dest="tgt_type", action="store_const", const="pcre", help="target is a regular expression on ids")
    tg.add_argument("-G", "--grain", dest="tgt_type", action="store_const", const="grain", help="target is grain:value (glob)")
    tg.add_argument("-P", "--grain-pcre", dest="tgt_type", action="store_const", const="grain_pcre", help="target is grain:regex")
    tg.add_argument("-I", "--pillar", dest="tgt_type", action="store_const", const="pillar", help="target is pillar:value (glob), judged on the minion data cache")
    tg.add_argument("-J", "--pillar-pcre", dest="tgt_type", action="store_const", const="pillar_pcre", help="target is pillar:regex")
    tg.add_argument("-N", "--nodegroup", dest="tgt_type", action="store_const", const="nodegroup", help="target is a nodegroup (the master's nodegroups option)")
    tg.add_argument("-C", "--compound", dest="tgt_type", action="store_const", const="compound", help="compound target (and/or/not, G@, L@, E@, P@, I@, J@, S@, N@)")
    p.add_argument("-t", "--timeout", type=float, default=None, help="seconds to wait for returns (default: master's `timeout`, 5)")
    p.add_argument("--out", default=None, choices=["nested", "json", "yaml", "txt", "raw", "highstate"],
                   help="output format (default: what the function declares, e.g. highstate for "
                        "state.apply, else nested)")
    p.add_argument("--static", action="store_true", help="print all returns at the end as one document")
    p.add_argument("--async", dest="async_", action="store_true", help="publish and print the jid without waiting")
    p.add_argument("--no-color", action="store_true", help="no colors in nested output")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("fun", metavar="FUN")
    p.add_argument("args", nargs="*", metavar="ARG", help="positional args and key=value keyword args")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    from hamaster.cliargs import parse_cli_args
    from hamaster.config import ConfigError, load_master_config
    from hamaster.localapi import LocalApiError, LocalClient
    from hamaster.output import render

    try:
        opts = load_master_config(args.config_dir)
    except ConfigError as exc:
        return die(str(exc))
    tgt_type = args.tgt_type or "glob"
    tgt: object = args.target
    if tgt_type == "list":
        tgt = [t for t in args.target.split(",") if t]
    timeout = args.timeout if args.timeout is not None else float(opts.get("timeout", 5))
    color = not args.no_color and sys.stdout.isatty()
    try:
        client = LocalClient(opts["sock_dir"])
    except LocalApiError as exc:
        return die(str(exc))
    with client:
        try:
            client.send({
                "cmd": "publish", "tgt": tgt, "tgt_type": tgt_type, "fun": args.fun,
                "arg": parse_cli_args(args.args), "timeout": timeout, "wait": not args.async_,
            })
            pub = client.recv()
        except LocalApiError as exc:
            return die(str(exc))
        if not pub.get("jid"):
            print(pub.get("error") or "No minions matched the target.", file=sys.stderr)
            return 2
        if args.async_:
            print(f"Executed command with job ID: {pub['jid']}")
            return 0
        failed = False
        collected: dict = {}
        fmt = args.out or "nested"
        try:
            for msg in client.stream():
                if "ret" in msg:
                    for mid, ret in msg["ret"].items():
                        if args.out is None and ret.get("out") == "highstate":
                            fmt = "highstate"  # the minion's declared outputter, as salt does
                        retcode = ret.get("retcode", 0) or 0
                        if retcode or ret.get("success") is False:
                            failed = True
                        if args.static:
                            collected[mid] = ret.get("return")
                        else:
                            print(render({mid: ret.get("return")}, fmt, color=color, retcode=retcode), flush=True)
                if msg.get("done"):
                    for mid in msg.get("missing", []):
                        failed = True
                        if args.static:
                            collected[mid] = NO_RETURN
                        else:
                            print(render({mid: NO_RETURN}, fmt, color=color, retcode=1), flush=True)
        except LocalApiError as exc:
            return die(str(exc), 1)
        if args.static:
            print(render(collected, fmt, static=True, color=color), flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
