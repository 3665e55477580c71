"""``hamaster-master``: run a master."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from hamaster.cli.common import add_config_args, die

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
    return p


async def _serve(opts: dict) -> None:
    from hamaster.master.daemon import Master

    master = Master(opts)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.stop)
    await master.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    from hamaster.config import ConfigError, load_master_config, setup_logging

    try:
        opts = load_master_config(args.config_dir)
        setup_logging(opts, args.log_level)
    except ConfigError as exc:
        return die(str(exc))
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
