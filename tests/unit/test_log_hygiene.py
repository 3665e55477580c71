"""Log hygiene: refusal lines under a global rate limit, one-line messages, private log files."""

from __future__ import annotations

import logging
import os
import stat

from hamaster.config import setup_logging
from hamaster.ratelog import MAX_ARG_CHARS, RateLimitedLog


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ratelog(caplog, **kw) -> tuple[RateLimitedLog, _Clock]:
    clock = _Clock()
    logger = logging.getLogger("test.ratelog")
    caplog.set_level(logging.WARNING, logger="test.ratelog")
    return RateLimitedLog(logger, window=60.0, burst=30, clock=clock, **kw), clock


def test_new_ids_cannot_flood_the_log(caplog):
    """Two thousand refusals from two thousand different (512 KiB) ids: at most `burst` lines,
    each short; the count of what was held back is logged."""
    rl, clock = _ratelog(caplog)
    big = "A" * (512 * 1024)
    for i in range(2_000):
        rl.warn("invalid_id", f"{i}{big}", "refused _auth from %s: minion id too long", f"{i}{big}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 30
    assert sum(len(m) for m in lines) < 30 * (MAX_ARG_CHARS + 100)
    assert rl.suppressed == 2_000 - 30
    clock.now += 61
    rl.flush()
    assert caplog.records[-1].getMessage().startswith(f"{2_000 - 30} refusal log lines suppressed")
    assert rl.suppressed == 0


def test_suppressed_count_rides_on_the_next_line(caplog):
    rl, clock = _ratelog(caplog)
    assert rl.warn("bad", "p1", "first %s", "x")
    assert not rl.warn("bad", "p1", "again %s", "x")  # same (reason, peer) within the window
    clock.now += 61
    assert rl.warn("bad", "p2", "later %s", "y")
    assert caplog.records[-1].getMessage() == "later y (1 similar lines suppressed before this one)"
    rl.flush()  # nothing held back since: no extra line
    assert len(caplog.records) == 2


def test_refusal_arguments_are_one_line(caplog):
    rl, _ = _ratelog(caplog)
    rl.warn("bad", "p", "from %s", "x\n2026-12-06 [hamaster][ERROR] forged\x1b[2J")
    msg = caplog.records[-1].getMessage()
    assert "\n" not in msg and "\x1b" not in msg and "\\n2026" in msg and "\\x1b[2J" in msg


def test_log_file_is_private_and_lines_are_escaped(tmp_path):
    path = tmp_path / "logs" / "master"
    try:
        setup_logging({"log_file": str(path), "log_level": "warning"})
        hostile = "web1\n2026 [x][CRITICAL] forged\x1b]0;t\x07"
        logging.getLogger("test.hygiene").warning("id %s", hostile)
        for h in logging.getLogger().handlers:
            h.flush()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        text = path.read_text()
        assert text.count("\n") == 1 and "\x1b" not in text and "\x07" not in text
        assert "web1\\n2026 [x][CRITICAL] forged\\x1b]0;t\\x07" in text
        # a log file left 0644 by an older version is made private at the next start
        os.chmod(path, 0o644)
        setup_logging({"log_file": str(path), "log_level": "warning"})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        setup_logging({"log_file": None, "log_level": "warning"})
