"""``hamaster-master``: run a master."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from hamaster.cli.common import add_config_args, die, raise_fd_limit

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hamaster-master",
        description="Run a hamaster master: publishes jobs on publish_port (4505) and serves "
        "auth, returns and files on ret_port (4506), speaking Salt's ZeroMQ protocol v3.",
        epilog="Example: hamaster-master -c /etc/hamaster -l info",
    )
    add_config_args(p)
    p.add_argument(
        "--create-cluster-key", action="store_true",
        help="rsync backend: if this master's tree has no master keypair, create the cluster's "
        "pair now instead of waiting for the candidates of all peers (use on ONE master, at the "
        "cluster's first start, when the peers cannot be reached yet); same as "
        "ha_create_master_key: true",
    )
    return p


async def _serve(opts: dict) -> None:
    from hamaster.master.daemon import Master

    master = Master(opts)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.stop)
    await master.run()


def _with_shared_config(opts: dict, confdir: str | None) -> dict:
    """Apply the cluster's shared ``config/master.d/*.conf`` fragments (HA only)."""
    from hamaster.config import ConfigError, load_master_config
    from hamaster.master.shared import is_ha, open_store, shared_config
    from hamaster.store.base import StoreError

    if not is_ha(opts):
        return opts
    try:
        store = open_store(opts)
        fragment, names = shared_config(store)
        store.close()
    except StoreError as exc:
        log.error("cannot read shared config fragments (%s); using the local config only", exc)
        return opts
    if not fragment:
        return opts
    try:
        merged = load_master_config(confdir, overrides=fragment)
    except ConfigError as exc:
        raise ConfigError(f"shared config fragments {names}: {exc}") from None
    log.info("applied shared config fragments: %s", ", ".join(names))
    return merged


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    from hamaster.config import ConfigError, load_master_config, setup_logging

    try:
        opts = load_master_config(args.config_dir)
        setup_logging(opts, args.log_level)
        opts = _with_shared_config(opts, args.config_dir)
        if args.create_cluster_key:
            opts["ha_create_master_key"] = True
    except ConfigError as exc:
        return die(str(exc))
    from hamaster.localdirs import UnsafeDirectory, check_daemon_dirs
    from hamaster.master.shared import is_ha

    try:  # pki_dir holds the keys only without a shared store
        check_daemon_dirs(opts, ("sock_dir", "cachedir") if is_ha(opts) else
                          ("sock_dir", "cachedir", "pki_dir"))
    except (UnsafeDirectory, OSError) as exc:
        return die(f"refusing to start: {exc}")
    try:
        asyncio.run(_serve(opts))
    except OSError as exc:
        return die(f"master failed to start: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - report any start-up failure clearly
        log.exception("master failed")
        return die(f"master failed: {exc}", 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
