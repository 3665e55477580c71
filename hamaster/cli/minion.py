"""``hamaster-minion``: run a minion (or a swarm of minion identities in one process)."""

from __future__ import annotations

from hamaster.cli.lean import import_lean

import_lean()  # before anything imports asyncio or hashlib (see hamaster.cli.lean)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

from hamaster.cli.common import add_config_args, die, raise_fd_limit  # noqa: E402

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster-minion",
        description="Run a hamaster minion. It connects to every master in its `master:` list at "
        "once and runs the jobs any of them publishes.",
        epilog="Examples:\n  hamaster-minion -c /etc/hamaster\n"
        "  hamaster-minion -c /tmp/swarm --swarm 1000 --swarm-prefix load-   # bench/test only",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--swarm", type=int, default=0, metavar="N",
                   help="run N minion identities in this process (each with its own keys "
                        "and connections)")
    p.add_argument("--swarm-prefix", default=None,
                   help="id prefix for swarm identities (default: <id>-)")
    p.add_argument("--procs", type=int, default=1, metavar="P",
                   help="with --swarm: spread the N identities over P processes (one command; "
                   "each process runs its share on its own event loop and core)")
    p.add_argument("--swarm-first", type=int, default=0, metavar="I", help=argparse.SUPPRESS)
    p.add_argument("--swarm-forget-master", action="store_true",
                   help="with --swarm: forget the master key each identity pinned in an "
                   "earlier run (a new test cluster has a new key); the identities' own "
                   "keys are kept and reused")
    return p


async def _serve(opts: dict, swarm: int, prefix: str | None, first: int = 0,
                 forget_master: bool = False) -> None:
    import zmq.asyncio

    from hamaster.minion.daemon import Minion
    from hamaster.minion.grains_core import collect_grains
    from hamaster.minion.identity import MinionIdentity, resolve_minion_id
    from hamaster.minion.modules.registry import FunctionRegistry

    ctx = zmq.asyncio.Context()
    if swarm > 0:
        # per identity and master: one SUB and one REQ socket (more REQs only while requests
        # overlap or an auth runs; closed sockets count until ZeroMQ's reaper frees them)
        n_masters = len(opts.get("master_list") or [1])
        ctx.max_sockets = max(1024, swarm * n_masters * 8 + 256)
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=int(opts.get("worker_threads_minion", 32)), thread_name_prefix="job")
    registry = FunctionRegistry()
    base_id = resolve_minion_id(opts)
    minions: list[Minion] = []
    if swarm > 0:
        pfx = prefix if prefix is not None else f"{base_id}-"
        base_grains = collect_grains(dict(opts, id=base_id))
        for i in range(first, first + swarm):
            mid = f"{pfx}{i:05d}"
            ident = MinionIdentity(opts, mid, os.path.join(opts["pki_dir"], "swarm", mid))
            if forget_master:
                ident.pinned_path.unlink(missing_ok=True)
                ident._pinned = None
            minions.append(Minion(opts, ident, ctx, pool, registry, dict(base_grains)))
    else:
        ident = MinionIdentity(opts, base_id)
        minions.append(Minion(opts, ident, ctx, pool, registry))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for m in minions:
        m.start()
    log.info("minion %s started (%d identities, masters %s)", base_id,
             len(minions), opts.get("master_list"))
    await stop.wait()
    await asyncio.gather(*(m.stop() for m in minions), return_exceptions=True)
    pool.shutdown(wait=False, cancel_futures=True)
    ctx.term()


def _limit_malloc_arenas() -> None:
    """Cap glibc malloc arenas: job threads otherwise each grow their own (RSS for nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = 2
    except (OSError, AttributeError):
        pass


def _run_procs(args: argparse.Namespace, swarm: int, argv: list[str] | None) -> int:
    """``--swarm N --procs P``: P child processes with consecutive shares of the N identities
    (the ids are those of one ``--swarm N`` process); SIGTERM/SIGINT are passed on to them."""
    import subprocess
    import sys

    base = list(sys.argv[1:] if argv is None else argv)
    procs = min(args.procs, swarm)
    children: list[subprocess.Popen] = []
    start = 0
    for k in range(procs):
        share = swarm // procs + (1 if k < swarm % procs else 0)
        cmd = [sys.executable, "-m", "hamaster.cli.minion", *base, "--procs", "1",
               "--swarm", str(share), "--swarm-first", str(args.swarm_first + start)]
        children.append(subprocess.Popen(cmd))
        start += share

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [c.wait() for c in children]
    return max(codes, key=abs) if codes else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    _limit_malloc_arenas()
    raise_fd_limit()
    from hamaster.config import ConfigError, load_minion_config, setup_logging

    try:
        opts = load_minion_config(args.config_dir)
        setup_logging(opts, args.log_level)
    except ConfigError as exc:
        return die(str(exc))
    from hamaster.localdirs import UnsafeDirectory, check_daemon_dirs

    try:
        check_daemon_dirs(opts, ("pki_dir", "cachedir"))
    except (UnsafeDirectory, OSError) as exc:
        return die(f"refusing to start: {exc}")
    from hamaster.ids import minion_id_problem, shown
    from hamaster.minion.identity import resolve_minion_id

    mid = resolve_minion_id(opts)
    problem = minion_id_problem(mid)
    if problem is not None:
        return die(f"minion id {shown(mid)} {problem}; masters refuse such an id at _auth: set a "
                   "valid `id` in the minion config (at most 240 bytes, printable, no '/', '\\', "
                   "'..' or leading '.')")
    swarm = args.swarm or int(opts.get("swarm_count") or 0)
    if swarm > 0 and args.procs > 1:
        return _run_procs(args, swarm, argv)
    try:
        asyncio.run(_serve(opts, swarm, args.swarm_prefix, args.swarm_first,
                           args.swarm_forget_master))
    except Exception as exc:  # noqa: BLE001
        log.exception("minion failed")
        return die(f"minion failed: {exc}", 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
