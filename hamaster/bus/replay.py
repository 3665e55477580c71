"""Replay guard for authenticated requests: a time window plus a nonce memory that never forgets
into reopening a replay. Pure code: the caller passes the clock in.

Every v3 request carries ``nonce`` (uuid4 hex) and ``ts`` (the sender's clock, whole seconds).
A request is admitted when its ``ts`` is within ``ttl`` seconds of ``now`` (``request_server_ttl``;
checked by :func:`hamaster.bus.messages.open_aes_request`), its nonce was not seen in this session,
and its ``ts`` is above the session's *floor*. The nonce memory drops entries only when they can
no longer pass the window (``ts < now - ttl``), or, past ``cap`` entries, the oldest one, which
raises the floor to that entry's ``ts``: a request as old as anything forgotten is refused, so no
eviction ever reopens a replay. The session itself (its key) lives until the minion's key changes
or the master restarts, and a captured request does not decrypt under any other session key.
"""

from __future__ import annotations

import math
from collections import OrderedDict

DEFAULT_CAP = 4096


class RequestReplayGuard:
    """Nonces seen in one session, with the time window and the eviction floor."""

    __slots__ = ("ttl", "cap", "floor", "_seen")

    def __init__(self, ttl: float, cap: int = DEFAULT_CAP) -> None:
        self.ttl = float(ttl)
        self.cap = max(1, int(cap))
        self.floor = -math.inf
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, nonce: str, ts: float | None, now: float) -> str | None:
        """Record a request; ``None`` when admitted, else why it is refused (a replay).

        ``ts`` is None only for a request without a timestamp (accepted by the caller only when
        the window is off): such a request is judged by its nonce alone.
        """
        if nonce in self._seen:
            return f"nonce {nonce} already used in this session"
        if ts is not None and ts <= self.floor:
            return f"timestamp {ts} is not above the session's replay floor {self.floor}"
        self._seen[nonce] = -math.inf if ts is None else float(ts)
        self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        seen = self._seen
        if self.ttl > 0:
            horizon = now - self.ttl
            while seen:
                first = next(iter(seen.values()))
                if first >= horizon:
                    break
                seen.popitem(last=False)
        while len(seen) > self.cap:
            _, ts = seen.popitem(last=False)
            if ts > self.floor:
                self.floor = ts
