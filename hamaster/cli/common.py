"""Shared pieces of the command-line entry points: config and log options."""

from __future__ import annotations

import argparse
import sys

LOG_LEVELS = ["garbage", "trace", "debug", "info", "warning", "error", "critical", "quiet"]


def add_config_args(parser: argparse.ArgumentParser, log_short: bool = True) -> None:
    """Add ``-c/--config-dir`` and ``-l/--log-level``."""
    parser.add_argument(
        "-c", "--config-dir", metavar="CONFDIR", default=None,
        help="directory holding the config file (default: $HAMASTER_CONFIG_DIR or /etc/hamaster)",
    )
    flags = ["-l", "--log-level"] if log_short else ["--log-level"]
    parser.add_argument(*flags, dest="log_level", choices=LOG_LEVELS, default=None,
                        help="console log level")


def die(msg: str, code: int = 2) -> int:
    """Print an error for the operator and return ``code``."""
    print(f"Error: {msg}", file=sys.stderr)
    return code


def raise_fd_limit() -> None:
    """Raise the open-files soft limit to the hard limit (each minion connection needs fds)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
