"""Log a repeated problem once per peer and reason per window, so bad input cannot flood logs."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """``warn(reason, peer, msg)`` logs at most once per ``window`` seconds per (reason, peer)."""

    def __init__(self, logger: logging.Logger, window: float = 60.0, max_entries: int = 10000) -> None:
        self.logger = logger
        self.window = window
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = {}

    def warn(self, reason: str, peer: str, msg: str, *args: object) -> bool:
        """Log ``msg`` unless the same (reason, peer) was logged within the window."""
        now = time.monotonic()
        key = (reason, peer)
        last = self._seen.get(key)
        if last is not None and now - last < self.window:
            return False
        if len(self._seen) >= self.max_entries:
            self._seen.clear()
        self._seen[key] = now
        self.logger.warning(msg, *args)
        return True
