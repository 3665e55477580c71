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
    parser.add_argument(*flags, dest="log_level", choices=LOG_LEVELS, default=None, help="console log level")


def die(msg: str, code: int = 2) -> int:
    """Print an error for the operator and return ``code``."""
    print(f"Error: {msg}", file=sys.stderr)
    return code
