"""Auth shedding: ``_auth`` requests wait in a bounded queue and are answered with spare time.

An ``_auth`` costs the master RSA work (decrypting the token, encrypting two keys, signing): a
few milliseconds of CPU where any other request costs tens of microseconds. When a fleet
re-authenticates at once (a master restart, a publish-key rotation, a thousand new minions),
answering auths in arrival order starves the heartbeats and returns of minions already
connected; they time out, reconnect and re-authenticate in turn, and the master ends up doing
auth work only for minions that have already given up on it (a retry collapse).

So the request loop answers every other request first and takes ``_auth`` requests from this
queue with the time left. The queue is bounded and sheds work nobody waits for any more:

- **duplicate**: a newer ``_auth`` from the same minion id replaces the waiting one (the minion
  timed out and retried: its old request socket is closed, the answer would be lost);
- **stale**: a request that waited longer than ``auth_queue_max_age`` seconds (the minion's
  ``auth_timeout``, 5 s by default for Salt and hamaster minions, is about to expire);
- **full**: with ``auth_queue_max`` requests waiting, the oldest one is dropped.

A dropped request is simply not answered: the minion's request times out and it retries after
``acceptance_wait_time`` (with jitter for hamaster minions), as stock Salt minions do. Every drop
is counted in ``hamaster_auth_shed_total{reason}``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from hamaster.bus import codec

#: Default ``auth_queue_max``: requests waiting at most (a memory bound: ~2 KB each).
DEFAULT_MAX = 5000
#: Default ``auth_queue_max_age`` (seconds): below the minions' 5 s ``auth_timeout``, so that
#: what is answered still finds its minion waiting.
DEFAULT_MAX_AGE = 4.0
#: Time per event-loop pass spent answering queued auths while other requests may be waiting.
DEFAULT_SLICE_S = 0.05


def auth_minion_id(payload: bytes) -> str | None:
    """The claimed minion id if ``payload`` is a clear ``_auth`` request, else None.

    Cheap (a msgpack decode, no crypto) and never raises: anything odd is left to the request
    handler, which refuses it properly.
    """
    if len(payload) > 64 * 1024 or b"clear" not in payload:
        # every request goes through here: an encrypted one (the heartbeats, returns …) is told
        # apart by a byte search, without decoding it twice ("clear", however msgpack encodes
        # the string, is in the bytes of every clear request)
        return None
    try:
        env = codec.loads(payload, max_size=64 * 1024, max_objects=codec.ENVELOPE_MAX_OBJECTS)
    except Exception:  # noqa: BLE001 - the handler refuses it
        return None
    if not isinstance(env, dict) or env.get("enc") != "clear":
        return None
    load = env.get("load")
    if not isinstance(load, dict) or load.get("cmd") != "_auth":
        return None
    mid = load.get("id")
    return mid if isinstance(mid, str) and mid else None


class AuthQueue:
    """Bounded FIFO of waiting ``_auth`` requests, one per minion id."""

    def __init__(self, max_len: int = DEFAULT_MAX, max_age: float = DEFAULT_MAX_AGE,
                 on_shed: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_len = max(1, int(max_len))
        self.max_age = float(max_age)
        self.on_shed = on_shed or (lambda reason: None)
        self.clock = clock
        self._waiting: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @classmethod
    def from_opts(cls, opts: dict, on_shed: Callable[[str], None] | None = None) -> AuthQueue:
        """Sized by ``auth_queue_max`` / ``auth_queue_max_age`` from the master config."""
        return cls(int(opts.get("auth_queue_max") or DEFAULT_MAX),
                   float(opts.get("auth_queue_max_age") or DEFAULT_MAX_AGE), on_shed)

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, minion_id: str, item: Any) -> None:
        """Queue ``item`` (the request) for ``minion_id``, shedding what it makes useless."""
        if self._waiting.pop(minion_id, None) is not None:
            self.on_shed("duplicate")
        while len(self._waiting) >= self.max_len:
            self._waiting.popitem(last=False)
            self.on_shed("full")
        self._waiting[minion_id] = (self.clock(), item)

    def take(self) -> Any | None:
        """The oldest request still worth answering, or None; stale ones are dropped."""
        now = self.clock()
        while self._waiting:
            _, (since, item) = self._waiting.popitem(last=False)
            if now - since <= self.max_age:
                return item
            self.on_shed("stale")
        return None
