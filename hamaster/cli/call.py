"""``hamaster-call``: run an execution function on this minion, like ``salt-call``.

With ``--local`` the function runs right here with no master. Without it the call goes
through the minion's masters (``hamaster.minion.remote_call``).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

from hamaster.output import FORMATS, render

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  hamaster-call --local test.ping
  hamaster-call --local grains.get os
  hamaster-call --local cmd.run 'uname -a'
  hamaster-call --local cmd.run 'ls /nonexistent' --retcode-passthrough
  hamaster-call --local cmd.run_all 'echo hi' env='{"LANG": "C"}' --out json
  hamaster-call --local test.arg 1 two key=value 'list=[1, 2]'
  hamaster-call --local sys.doc test

exit status:
  0 on success; 1 when the function is not available, got invalid arguments, raised, set a
  non-zero return code (a failed command or state) or returned a dict with result/success
  false; with --retcode-passthrough the function's own
  return code (e.g. the exit code of cmd.run); 2 on usage or configuration errors.
"""


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config-dir", dest="config_dir", default=None,
                        help="configuration directory holding the 'minion' file "
                             "(default: $HAMASTER_CONFIG_DIR or /etc/hamaster)")
    parser.add_argument("-l", "--log-level", dest="log_level", default=None,
                        help="console log level: debug, info, warning, error, critical, quiet "
                             "(default: the config's log_level, else warning)")
    parser.add_argument("--local", action="store_true",
                        help="run locally without contacting a master")
    parser.add_argument("--id", dest="minion_id", default=None,
                        help="minion id to use instead of the configured one")
    parser.add_argument("--out", "--output", dest="out", default="nested", choices=FORMATS,
                        help="output format (default: nested)")
    parser.add_argument("--retcode-passthrough", action="store_true",
                        help="exit with the function's return code")
    color = parser.add_mutually_exclusive_group()
    color.add_argument("--no-color", "--no-colour", dest="color", action="store_false",
                       default=None, help="disable colored output")
    color.add_argument("--force-color", "--force-colour", dest="color", action="store_true",
                       help="force colored output")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for ``hamaster-call``."""
    parser = argparse.ArgumentParser(
        prog="hamaster-call",
        description="Run an execution module function on this minion (like salt-call).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(parser)
    parser.add_argument("fun", help="function to run, as module.function (e.g. test.ping)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="positional arguments and key=value keyword arguments")
    return parser


def _exit_status(result: Any, passthrough: bool) -> int:
    """salt-call's rule: errors and a non-zero retcode exit 1; the function's own retcode
    only with passthrough."""
    if passthrough:
        return int(result.retcode)
    if getattr(result, "error", None) or result.retcode:
        return 1  # salt-call exits EX_GENERIC for any non-zero retcode (a failed state too)
    ret = result.ret
    if isinstance(ret, dict) and (ret.get("result") is False or ret.get("success") is False):
        return 1
    return 0


def _load_opts(args: argparse.Namespace) -> dict[str, Any]:
    from hamaster.config import load_minion_config, setup_logging

    overrides = {"id": args.minion_id} if args.minion_id else None
    opts = load_minion_config(args.config_dir, overrides=overrides)
    setup_logging(opts, args.log_level)
    if not opts.get("id"):
        opts["id"] = socket.gethostname()
    return opts


def _run_local(opts: dict[str, Any], fun: str, arg: list[Any]) -> Any:
    from hamaster.minion.executor import execute
    from hamaster.minion.grains_core import collect_grains
    from hamaster.minion.modules.context import ExecContext
    from hamaster.minion.modules.registry import FunctionRegistry

    registry = FunctionRegistry()
    ctx = ExecContext(opts=opts, grains=collect_grains(opts), minion_id=opts["id"],
                      registry=registry)
    pub = {"fun": fun, "arg": arg, "jid": None, "tgt": opts["id"], "tgt_type": "glob",
           "user": "hamaster-call"}
    return execute(registry, ctx, fun, arg, pub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hamaster-call``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Like salt-call, options may also follow FUN: parse them out of the remaining words.
    late = argparse.ArgumentParser(prog="hamaster-call", add_help=False)
    _add_options(late)
    _, rest = late.parse_known_args(args.args, namespace=args)

    from hamaster.minion.executor import parse_cli_args

    try:
        opts = _load_opts(args)
    except ImportError as exc:
        print(f"hamaster-call: configuration support is missing: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # ConfigError and unreadable files: an operator-facing message
        print(f"hamaster-call: {exc}", file=sys.stderr)
        return 2

    arg = parse_cli_args(rest)
    if args.local:
        result = _run_local(opts, args.fun, arg)
    else:
        try:
            from hamaster.minion import remote_call
        except ImportError:
            print("hamaster-call without --local is not available in this build",
                  file=sys.stderr)
            return 2
        result = remote_call.run(opts, args.fun, arg)

    color = sys.stdout.isatty() if args.color is None else args.color
    text = render({"local": result.ret}, args.out, static=True, color=color,
                  retcode=result.retcode)
    if text:
        print(text)
    return _exit_status(result, args.retcode_passthrough)


if __name__ == "__main__":
    sys.exit(main())
