"""One master keypair for the cluster on the rsync backend, agreed before any master serves.

fs and etcd have an atomic create-if-absent across masters, so the first master to start creates
``master.pem`` and every other adopts it
(:func:`~hamaster.pki_sync.keys.load_or_create_master_keypair`).
The rsync backend has no such operation: each master writes its own tree and the trees are
merged later by newer-wins. Two masters started on empty trees would each create a pair and
serve it. So on rsync a master whose tree has no ``master.pem``:

1. writes a *candidate* private key under ``pki/master/candidates/<master_id>`` (kept across
   its own restarts) and lets the pusher send it to every peer;
2. waits until either ``master.pem`` arrives from a peer (it adopts it) or it holds the
   candidates of all ``1 + len(ha_rsync_peers)`` masters; then every master picks the same
   winner (the candidate of the smallest ``master_id``) and writes the same bytes as
   ``master.pem``;
3. removes its own candidate (a tombstone tells the peers), and only then serves.

A master that cannot reach all its peers waits, says so in its log (once, then every minute)
and in its ``cluster/masters/<id>`` record (``state: waiting_for_master_key``, shown by
``hamaster-run cluster.status`` on the other masters). An operator can decide explicitly with
``hamaster-master --create-cluster-key`` (option ``ha_create_master_key: true``) on ONE master:
it creates the pair at once if its tree has none, and the waiting peers adopt it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hamaster.pki_sync.keys import (
    KeyRegistryError,
    _join_prefix,
    generate_keypair,
    load_or_create_master_keypair,
    master_key_names,
    public_pem_of,
    read_master_keypair,
    write_master_pub,
)
from hamaster.store.base import Store, StoreError

log = logging.getLogger(__name__)

CANDIDATES = "candidates"
#: Seconds between two "still waiting" log lines.
WAIT_LOG_EVERY = 60.0

WaitCallback = Callable[[dict], None]


def candidates_prefix(prefix: str) -> str:
    """Where the candidates of a key agreement live (``pki/master/candidates``)."""
    return f"{_join_prefix(prefix)}{CANDIDATES}"


def _valid_candidates(store: Store, prefix: str) -> dict[str, bytes]:
    base = candidates_prefix(prefix)
    out: dict[str, bytes] = {}
    for key, raw in store.get_many(base).items():
        mid = key[len(base) + 1:]
        if not mid or "/" in mid:
            continue
        try:
            public_pem_of(raw)
        except (ValueError, TypeError):
            log.warning("ignoring candidate master key %s: not a valid private key", key)
            continue
        out[mid] = raw
    return out


def _drop_candidate(store: Store, key: str) -> None:
    try:
        if store.get(key) is not None:
            store.delete(key)
    except StoreError as exc:
        log.warning("could not remove candidate master key %s: %s", key, exc)


def agree_master_keypair(store: Store, prefix: str, *, member_id: str, expected: int,
                         keysize: int = 2048, create_now: bool = False,
                         stop: threading.Event | None = None, poll: float = 0.2,
                         on_wait: WaitCallback | None = None,
                         timeout: float | None = None) -> tuple[bytes, bytes]:
    """Return the cluster's (private PEM, public PEM), agreeing on it with the peers first.

    ``expected`` is how many masters share the keypair (this one included). ``create_now``
    is the operator's explicit decision (create the pair now if the tree has none). Raises
    :class:`KeyRegistryError` when ``stop`` is set or ``timeout`` passes before agreement.
    """
    pair = read_master_keypair(store, prefix)
    cand_key = f"{candidates_prefix(prefix)}/{member_id}"
    if pair is None and (create_now or expected <= 1):
        if create_now:
            log.warning("creating the cluster's master keypair now, without waiting for the "
                        "peers (operator decision: ha_create_master_key / --create-cluster-key)")
        pair = load_or_create_master_keypair(store, prefix, keysize)
    if pair is not None:
        write_master_pub(store, prefix, pair[1])
        _drop_candidate(store, cand_key)
        return pair
    own = store.get(cand_key)
    try:
        if own is not None:
            public_pem_of(own)
    except (ValueError, TypeError):
        own = None
    if own is None:
        own, _ = generate_keypair(keysize)
        store.put(cand_key, own)
    pem_key, _ = master_key_names(prefix)
    t0 = time.monotonic()
    last_log = 0.0
    while True:
        pair = read_master_keypair(store, prefix)
        if pair is not None:
            log.info("adopted the cluster's master keypair from the store (%s)", pem_key)
            break
        cands = _valid_candidates(store, prefix)
        if len(cands) >= expected:
            winner = min(cands)
            if store.compare_and_put(pem_key, None, cands[winner]):
                log.info("cluster master keypair agreed: the candidate of %s among %s",
                         winner, ", ".join(sorted(cands)))
            continue    # read it back (a peer's identical copy may have landed first)
        status = {"state": "waiting_for_master_key", "candidates": sorted(cands),
                  "expected": expected, "waiting_s": round(time.monotonic() - t0, 1)}
        if on_wait is not None:
            try:
                on_wait(status)
            except Exception:
                log.debug("wait callback failed", exc_info=True)
        now = time.monotonic()
        if now - last_log >= WAIT_LOG_EVERY or last_log == 0.0:
            last_log = now
            (log.info if now - t0 < WAIT_LOG_EVERY else log.warning)(
                "waiting for the cluster's master keypair: %s has none yet; have candidates "
                "from %d of %d masters (%s). Start the other masters (their rsync peers must "
                "reach each other), or decide explicitly on ONE master with "
                "`hamaster-master --create-cluster-key`", pem_key, len(cands), expected,
                ", ".join(sorted(cands)) or "none")
        if timeout is not None and now - t0 > timeout:
            raise KeyRegistryError(f"no cluster master keypair agreed within {timeout:g}s")
        if stop is not None:
            if stop.wait(poll):
                raise KeyRegistryError("stopped while waiting for the cluster master keypair")
        else:
            time.sleep(poll)
    write_master_pub(store, prefix, pair[1])
    _drop_candidate(store, cand_key)
    return pair
