"""``hamaster``: publish a job through the local master and print the returns as they arrive.

Waiting follows Salt's CLI (the master does it, :mod:`hamaster.master.waiting`): ``-t`` is the
first wait, then minions still missing are asked ``saltutil.find_job`` every
``gather_job_timeout`` and waited for while they run the job. Output and exit codes follow
``salt`` 3008: ``-v`` / ``--show-jid`` / ``--summary`` / ``-p`` / ``-b``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from hamaster.cli.common import add_config_args, die

NO_RETURN = "Minion did not return. [No response]"
LOOKUP_HINT = (
    "The minions may not have all finished running and any remaining minions will return upon"
    " completion. To look up the return data for this job later, run the following command:"
    "\n\nhamaster-run jobs.lookup_jid {jid}"
)
NON_ZERO = "ERROR: Minions returned with non-zero exit code"


def no_return_text(reason: str, jid: str) -> str:
    """Salt's text for a minion that did not return (``reason``: "No response"/"Not connected")."""
    if reason == "Not connected":
        return "Minion did not return. [Not connected]"
    return f"Minion did not return. [No response]\n{LOOKUP_HINT.format(jid=jid)}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster",
        description="Run FUN on the minions matching TARGET, through the local "
                    "master (like `salt`).",
        epilog=(
            "Examples:\n"
            "  hamaster '*' test.ping\n"
            "  hamaster -L web1,web2 cmd.run 'uptime'\n"
            "  hamaster -G os:Debian test.version\n"
            "  hamaster -C 'G@os:Debian and web*' cmd.run 'id' cwd=/tmp\n"
            "  hamaster --out json --static '*' grains.items\n"
            "  hamaster -b 10% -p '*' state.apply\n"
            "Waiting: after -t seconds, minions that have not returned are asked whether\n"
            "they still run the job (saltutil.find_job, every gather_job_timeout seconds)\n"
            "and waited for while they do. Ctrl-C stops waiting; the job keeps running.\n"
            "Exit status: 0 when every targeted minion returned with retcode 0, 1 otherwise\n"
            "(--retcode-passthrough: the highest retcode; -b: the highest retcode), 2 when no\n"
            "minion matched or the master could not be reached."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, log_short=False)
    tg = p.add_mutually_exclusive_group()
    tg.add_argument("-L", "--list", dest="tgt_type", action="store_const", const="list",
                    help="target is a comma-separated list of ids")
    tg.add_argument("-E", "--pcre", dest="tgt_type", action="store_const", const="pcre",
                    help="target is a regular expression on ids")
    tg.add_argument("-G", "--grain", dest="tgt_type", action="store_const", const="grain",
                    help="target is grain:value (glob)")
    tg.add_argument("-P", "--grain-pcre", dest="tgt_type", action="store_const", const="grain_pcre",
                    help="target is grain:regex")
    tg.add_argument("-I", "--pillar", dest="tgt_type", action="store_const", const="pillar",
                    help="target is pillar:value (glob), judged on the minion data cache")
    tg.add_argument("-J", "--pillar-pcre", dest="tgt_type", action="store_const",
                    const="pillar_pcre", help="target is pillar:regex")
    tg.add_argument("-N", "--nodegroup", dest="tgt_type", action="store_const", const="nodegroup",
                    help="target is a nodegroup (the master's nodegroups option)")
    tg.add_argument("-C", "--compound", dest="tgt_type", action="store_const", const="compound",
                    help="compound target (and/or/not, G@, L@, E@, P@, I@, J@, S@, N@)")
    p.add_argument("-t", "--timeout", type=float, default=None,
                   help="seconds to wait before asking the minions still missing whether they run "
                        "the job (default: master's `timeout`, 5)")
    p.add_argument("--gather-job-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds between saltutil.find_job probes (default: the config's "
                        "`gather_job_timeout`, 10; 0: no probes, give up after -t)")
    p.add_argument("--out", default=None,
                   choices=["nested", "json", "yaml", "txt", "raw", "quiet", "highstate"],
                   help="output format (default: what the function declares, e.g. highstate "
                        "for state.apply, else nested)")
    p.add_argument("-s", "--static", action="store_true",
                   help="print all returns at the end as one document")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="publish and print the jid without waiting")
    p.add_argument("--no-color", action="store_true", help="no colors in nested output")
    p.add_argument("-p", "--progress", action="store_true",
                   help="show a progress bar of returns (on a terminal) and a summary")
    p.add_argument("--summary", action="store_true",
                   help="print how many minions were targeted, returned, did not return, failed")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the jid first, and who did not respond in the summary")
    p.add_argument("--show-jid", action="store_true", help="print the jid first")
    p.add_argument("-b", "--batch", "--batch-size", dest="batch", default=None, metavar="N|N%",
                   help="run on at most N minions (or N%% of them) at once; the next starts as "
                        "each returns")
    p.add_argument("--retcode-passthrough", action="store_true",
                   help="exit with the highest retcode of the minions")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("fun", metavar="FUN")
    p.add_argument("args", nargs="*", metavar="ARG",
                   help="positional args and key=value keyword args")
    return p


def _retcode(ret: Any) -> int:
    """A return's retcode as Salt's CLI reads it (a dict of retcodes: the highest)."""
    code = ret.get("retcode", 0) if isinstance(ret, dict) else 0
    if isinstance(code, dict):
        code = max((c for c in code.values() if isinstance(c, int)), default=0)
    return code if isinstance(code, int) else 1


class ProgressBar:
    """Salt's progress bar (``-p``): `` 50% |#####     | Elapsed Time: 0:00:04 Returns: [3/6]``."""

    WIDTH = 30

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.count = 0
        self.started = time.monotonic()
        self.shown = False

    def line(self) -> str:
        """The bar's text now."""
        frac = min(self.count / self.total, 1.0)
        fill = int(frac * self.WIDTH)
        secs = int(time.monotonic() - self.started)
        elapsed = f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        bar = "#" * fill + " " * (self.WIDTH - fill)
        return (f"{int(frac * 100):3d}% |{bar}| Elapsed Time: {elapsed}"
                f" Returns: [{self.count}/{self.total}]")

    def draw(self) -> None:
        """(Re)draw the bar on its line."""
        self.stream.write("\r\033[K" + self.line())
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Blank the bar's line (before printing something above it)."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def finish(self) -> None:
        """Draw the final state and end its line."""
        self.draw()
        self.stream.write("\n")
        self.stream.flush()
        self.shown = False


def summary_lines(results: dict[str, tuple[Any, int, str | None]], verbose: bool) -> list[str]:
    """Salt's ``--summary`` block. ``results``: ``{id: (return, retcode, no_return_reason)}``."""
    returned = [m for m, r in results.items() if r[2] is None]
    not_conn = [m for m, r in results.items() if r[2] == "Not connected"]
    no_resp = [m for m, r in results.items() if r[2] is not None and r[2] != "Not connected"]
    failed = [m for m in returned if results[m][1]]
    bar = "-" * 43
    lines = ["\n", bar, "Summary", bar,
             f"# of minions targeted: {len(results)}",
             f"# of minions returned: {len(returned)}",
             f"# of minions that did not return: {len(not_conn) + len(no_resp)}",
             f"# of minions with errors: {len(failed)}"]
    if verbose:
        if not_conn:
            lines.append("Minions not connected: " + " ".join(not_conn))
        if no_resp:
            lines.append("Minions not responding: " + " ".join(no_resp))
        if failed:
            lines.append("Minions with failures: " + " ".join(failed))
    lines.append(bar)
    return lines


class Printer:
    """Prints returns as they arrive (or keeps them for ``--static``), around a progress bar."""

    def __init__(self, args: argparse.Namespace, color: bool, bar: ProgressBar | None) -> None:
        self.args = args
        self.out = args.out or "nested"
        self.color = color
        self.bar = bar
        self.results: dict[str, tuple[Any, int, str | None]] = {}
        self.collected: dict[str, Any] = {}

    def text(self, text: str) -> None:
        """Print a line of text above the bar."""
        if self.bar is not None:
            self.bar.clear()
        print(text, flush=True)
        if self.bar is not None:
            self.bar.draw()

    def ret(self, mid: str, ret: dict) -> None:
        """One minion's return."""
        if self.args.out is None and isinstance(ret, dict) and ret.get("out") == "highstate":
            self.out = "highstate"  # the minion's declared outputter, as salt does
        self._show(mid, ret.get("return") if isinstance(ret, dict) else ret, _retcode(ret), None)

    def missing(self, mid: str, reason: str, jid: str) -> None:
        """One minion that did not return."""
        self._show(mid, no_return_text(reason, jid), 1, reason or "No response")

    def _show(self, mid: str, value: Any, retcode: int, reason: str | None) -> None:
        from hamaster.output import render

        first = mid not in self.results
        self.results[mid] = (value, retcode, reason)
        if self.bar is not None and reason is None and first:
            self.bar.count += 1
        if self.args.static:
            self.collected[mid] = value
            if self.bar is not None:
                self.bar.draw()
            return
        text = render({mid: value}, self.out, color=self.color, retcode=retcode)
        if text:
            self.text(text)
        elif self.bar is not None:
            self.bar.draw()

    def tick(self) -> None:
        """Refresh the bar's elapsed time."""
        if self.bar is not None:
            self.bar.draw()

    def finish(self) -> None:
        """End the bar, print ``--static`` output."""
        from hamaster.output import render

        if self.bar is not None:
            self.bar.finish()
        if self.args.static:
            print(render(self.collected, self.out, static=True, color=self.color), flush=True)


def _stream(client: Any, printer: Printer, jid_box: list[str]) -> None:
    """Read frames until ``done``, handing them to ``printer``."""
    while True:
        if printer.bar is not None and not client.poll(0.5):
            printer.tick()
            continue
        msg = client.recv()
        if not isinstance(msg, dict):
            continue
        for mid, ret in (msg.get("ret") or {}).items():
            printer.ret(mid, ret)
        if msg.get("batch_start"):
            printer.text(f"\nExecuting run on {sorted(msg['batch_start'])}\n")
        if isinstance(msg.get("missing"), dict):  # a batch run's minion given up
            for mid, reason in msg["missing"].items():
                printer.missing(mid, reason, jid_box[0])
        if msg.get("done"):
            reasons = msg.get("not_returned")
            if not isinstance(reasons, dict):
                reasons = {mid: "No response" for mid in msg.get("missing") or []}
            for mid, reason in reasons.items():
                if mid not in printer.results:
                    printer.missing(mid, reason, jid_box[0])
            return


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    jid_box = [""]
    try:
        return _main(args, jid_box)
    except KeyboardInterrupt:
        # As salt: say how to find the returns later, exit 0; the job keeps running.
        msg = "\nExiting gracefully on Ctrl-c"
        if jid_box[0]:
            msg += f"\nThis job's jid is: {jid_box[0]}\n{LOOKUP_HINT.format(jid=jid_box[0])}"
        print(msg, file=sys.stderr, flush=True)
        return 0


def _main(args: argparse.Namespace, jid_box: list[str]) -> int:
    from hamaster.cliargs import parse_cli_args
    from hamaster.config import ConfigError, load_master_config
    from hamaster.localapi import LocalApiError, LocalClient

    if args.batch and args.async_:
        # salt hands an async batch to a master-side manager; hamaster has none (yet)
        return die("--async cannot be combined with --batch: the CLI runs the batches")
    try:
        opts = load_master_config(args.config_dir)
    except ConfigError as exc:
        return die(str(exc))
    tgt_type = args.tgt_type or "glob"
    tgt: object = args.target
    if tgt_type == "list":
        tgt = [t for t in args.target.split(",") if t]
    timeout = args.timeout if args.timeout and args.timeout > 0 else float(opts.get("timeout", 5))
    color = not args.no_color and sys.stdout.isatty()
    try:
        client = LocalClient(opts["sock_dir"])
    except LocalApiError as exc:
        return die(str(exc))
    req: dict[str, Any] = {
        "cmd": "publish", "tgt": tgt, "tgt_type": tgt_type, "fun": args.fun,
        "arg": parse_cli_args(args.args), "timeout": timeout, "wait": not args.async_,
        "gather_job_timeout": (args.gather_job_timeout if args.gather_job_timeout is not None
                               else float(opts.get("gather_job_timeout", 10))),
    }
    if args.batch:
        req["batch"] = args.batch
    with client:
        try:
            client.send(req)
            pub = client.recv()
        except LocalApiError as exc:
            return die(str(exc))
        if not pub.get("jid"):
            print(pub.get("error") or "No minions matched the target.", file=sys.stderr)
            if not args.batch or "batch data" not in str(pub.get("error")):
                print("ERROR: No return received", file=sys.stderr)
            return 2
        jid = jid_box[0] = pub["jid"]
        if args.async_:
            print(f"Executed command with job ID: {jid}")
            return 0
        if args.verbose:
            msg = f"Executing job with jid {jid}"
            print(msg)
            print("-" * len(msg) + "\n", flush=True)
        elif args.show_jid:
            print(f"jid: {jid}", flush=True)
        for mid in pub.get("down") or []:
            print(f"Minion {mid} did not respond. No job will be sent.", flush=True)
        bar = None
        if args.progress and sys.stdout.isatty():
            bar = ProgressBar(sys.stdout, len(pub.get("minions") or []))
        printer = Printer(args, color, bar)
        if args.batch and not pub.get("minions"):
            print("ERROR: No return received", file=sys.stderr)
            return 2
        if bar is not None:
            bar.draw()
        try:
            _stream(client, printer, jid_box)
        except KeyboardInterrupt:
            if bar is not None:
                bar.clear()
            raise
        except LocalApiError as exc:
            return die(str(exc), 1)
        printer.finish()
    if args.progress or (args.summary and args.out is None):
        for line in summary_lines(printer.results, args.verbose):
            print(line)
        sys.stdout.flush()
    codes = [code for _value, code, _reason in printer.results.values()]
    worst = max(codes, default=0)
    if args.batch:
        return worst
    if any(codes):
        print(NON_ZERO, file=sys.stderr, flush=True)
        return worst if args.retcode_passthrough else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
