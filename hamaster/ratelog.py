"""Log refusals of bad network input without letting that input flood the log.

Two limits apply to every line: the same (reason, peer) is logged at most once per ``window``,
and all lines together (whatever the peer: a peer or id is attacker-chosen and new ids cost
nothing) at most ``burst`` per ``window``. What is held back is counted and reported by the next
line that gets through (``N similar lines suppressed``). Text arguments are cut and kept on one
line (:func:`hamaster.ids.one_line`); the memory kept per peer is bounded too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hamaster.ids import one_line

#: Longest text argument (characters) a refusal line prints.
MAX_ARG_CHARS = 300


class RateLimitedLog:
    """``warn(reason, peer, msg, *args)``: a warning, unless one of the two limits holds it back."""

    def __init__(self, logger: logging.Logger, window: float = 60.0, max_entries: int = 10000,
                 burst: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        """Log to ``logger``: once per (reason, peer) and at most ``burst`` lines per ``window``."""
        self.logger = logger
        self.window = window
        self.max_entries = max_entries
        self.burst = burst
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._window_start = clock()
        self._in_window = 0
        self._last_flush = self._window_start
        #: Lines held back since the last line logged (reported by the next one).
        self.suppressed = 0
        #: Lines held back in total (for tests and metrics).
        self.suppressed_total = 0

    def warn(self, reason: str, peer: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a limit holds it back; True if it was logged."""
        now = self.clock()
        key = (reason, peer[:128])
        last = self._seen.get(key)
        if last is not None and now - last < self.window:
            self._hold()
            return False
        if now - self._window_start >= self.window:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self._hold()
            return False
        self._in_window += 1
        if len(self._seen) >= self.max_entries:
            self._seen.clear()
        self._seen[key] = now
        safe = tuple(one_line(a, MAX_ARG_CHARS) if isinstance(a, str) else a for a in args)
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} similar lines suppressed before this one)"
            self.suppressed = 0
        self.logger.warning(msg, *safe, stacklevel=2)  # the caller's line, not this one
        return True

    def flush(self) -> None:
        """Report lines held back since the last line logged, at most once per window.

        Call it now and then (the master does every housekeeping pass), so a flood that stops
        still leaves its count in the log.
        """
        now = self.clock()
        if self.suppressed and now - self._last_flush >= self.window:
            self._last_flush = now
            self.logger.warning("%d refusal log lines suppressed (rate limit: %d lines per %gs)",
                                self.suppressed, self.burst, self.window)
            self.suppressed = 0

    def _hold(self) -> None:
        self.suppressed += 1
        self.suppressed_total += 1
