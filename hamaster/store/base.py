"""The shared-state contract every backend (fs, rsync, etcd) implements, and its change events.

Keys are '/'-separated relative paths that mirror Salt's on-disk layout
(``pki/master/minions/web1``, ``jobs/<jid>/load``); values are bytes. Changes made by any process or
master are delivered to ``watch`` callbacks in batches. Backends keep working (and report
``healthy() is False``) when the storage behind them goes away; they never crash their watcher
thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from hamaster.options import Option

#: Store keys of leader leases live under this prefix (``leases/<name>/…``).
LEASES_PREFIX = "leases"
#: Presence keys written by :meth:`Store.heartbeat` live under this prefix (``…/<member_id>``).
MEMBERS_PREFIX = "cluster/members"


@dataclass(frozen=True)
class Change:
    """One change seen under a watched prefix; ``value is None`` means the key was deleted."""

    key: str
    value: bytes | None


class StoreError(Exception):
    """A store operation failed."""


class StoreUnavailable(StoreError):
    """The backend is unreachable (I/O error, unmounted share, permission denied, no quorum)."""


class InvalidKey(StoreError, ValueError):
    """This key cannot be stored by this backend (a name too long, bytes the file system refuses).

    A caller's error, like the ``ValueError`` of :func:`validate_key`: the store is fine and
    stays healthy.
    """

class LeaseUnsupported(StoreError):
    """This backend cannot give a leader lease (mutual exclusion) honestly."""


@dataclass(frozen=True)
class Lease:
    """A leader lease as its holder sees it.

    ``epoch`` is the fencing number: it grows by one with every new holder, cluster-wide.
    ``valid_until`` is on *this process's* ``time.monotonic()`` clock: past it the holder must
    act as if it had lost the lease (the others may already have taken it over).
    """

    name: str
    holder: str
    epoch: int
    valid_until: float


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease, as any observer sees it (``epoch`` 0: never held)."""

    holder: str | None
    epoch: int


def validate_lease_name(name: str) -> str:
    """A lease name is one key segment (letters, digits, ``-_.``), else ``ValueError``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"invalid lease name {name!r}")
    return name


WatchCallback = Callable[[list[Change]], None]


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid store key, else raise ``ValueError``.

    A key is a relative '/'-separated path: no leading '/', no empty, '.' or '..' segments,
    no NUL byte.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid store key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"invalid store key {key!r}: must not start with '/'")
    if "\0" in key or "\\" in key:
        raise ValueError(f"invalid store key {key!r}: must not contain NUL or backslash")
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise ValueError(f"invalid store key {key!r}: empty, '.' or '..' path segment")
    return key


def validate_prefix(prefix: str) -> str:
    """Return a normalised prefix ('' for everything, else ``key`` without a trailing '/')."""
    if prefix in ("", "/"):
        return ""
    return validate_key(prefix.rstrip("/"))


class Store(ABC):
    """Abstract shared key/value store with watches, presence heartbeats and leader leases.

    A backend is one module with one subclass, registered by name in
    :mod:`hamaster.store.registry`; the class says what it reads and what it can do.
    """

    #: The ``ha_backend`` name.
    NAME: ClassVar[str] = ""
    #: The options :meth:`from_opts` reads (merged into the master's option table).
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: Gives an honest leader lease (:meth:`lease_unsupported` is None).
    LEASES: ClassVar[bool] = False
    #: Cannot hold large file_roots blobs: masters serve them to each other
    #: (``file_blob_port: 0`` starts the blob server).
    PEER_BLOBS: ClassVar[bool] = False
    #: No create-if-absent across masters: they agree on the cluster's master keypair first
    #: (:mod:`hamaster.pki_sync.masterkey`).
    AGREES_MASTER_KEY: ClassVar[bool] = False
    #: ``ha_dir`` is one directory every master shares (a drill can take it away).
    SHARED_DIR: ClassVar[bool] = False

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> Store:
        """The store a master's options describe (a ``StoreError`` names a missing option)."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from options")

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """Return the value of ``key`` or None if absent."""

    @abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` at ``key``; readers see either the old or the new value, never a mix."""

    def get_keys(self, keys: list[str]) -> dict[str, bytes | None]:
        """The values of several keys by name (None: absent); backends may read them at once
        (etcd: one transaction, so the values are of one revision). The default gets each."""
        return {key: self.get(key) for key in keys}

    def get_many(self, prefix: str) -> dict[str, bytes]:
        """Every ``key → value`` under ``prefix``; backends may read them at once (etcd: one range).

        The default lists, then gets each key (a key deleted in between is left out).
        """
        out: dict[str, bytes] = {}
        for key in self.list(prefix):
            value = self.get(key)
            if value is not None:
                out[key] = value
        return out

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store many ``(key, value)`` pairs; backends may batch them (etcd: transactions).

        Each pair is atomic on its own; the batch as a whole need not be (a failure part way
        raises after some pairs were written). The default loops over :meth:`put`.
        """
        for key, value in items:
            self.put(key, value)

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Return all keys under ``prefix`` (recursive), sorted."""

    def delete_tree(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many. Backends may do it faster."""
        keys = self.list(prefix)
        return sum(1 for key in keys if self.delete(key))

    @abstractmethod
    def compare_and_put(self, key: str, expected: bytes | None, value: bytes | None) -> bool:
        """Set ``key`` to ``value`` (None deletes) only if its current value is ``expected``.

        ``expected is None`` means the key must be absent. Returns False if the precondition
        failed (nothing written).
        """

    @abstractmethod
    def watch(self, prefix: str, callback: WatchCallback) -> None:
        """Register ``callback`` for batches of changes under ``prefix`` made by anyone."""

    @abstractmethod
    def start(self) -> None:
        """Start the background watcher (idempotent)."""

    @abstractmethod
    def poll_now(self) -> list[Change]:
        """Run one watch pass synchronously, dispatch to callbacks, return the changes."""

    # -- presence (the liveness primitive :mod:`hamaster.master.membership` builds on) -------
    #
    # A member calls ``heartbeat`` more often than its ttl; ``members`` lists, on any store
    # instance of the cluster, those whose last heartbeat has not expired. Each backend decides
    # expiry its honest way: etcd with a lease of ``ttl`` seconds (expired by etcd itself), fs
    # and rsync with the writer's wall-clock timestamp against the reader's clock.

    @abstractmethod
    def heartbeat(self, member_id: str, info: bytes, ttl: float) -> None:
        """Announce ``member_id`` as present for ``ttl`` seconds, with opaque ``info``."""

    @abstractmethod
    def members(self) -> dict[str, bytes]:
        """Members present now (last heartbeat not expired) → the ``info`` of that heartbeat."""

    # -- leader lease (a fencing epoch) -----------------------------------------------------
    #
    # One member at a time holds lease ``name``; every new holder gets a higher ``epoch``.
    # ``lease_acquire`` is called periodically (every ttl/3 or faster) by every candidate: it
    # renews a lease held, or takes over one that expired or was released. ``fenced_create``
    # writes a key create-if-absent only while the caller's epoch is still the current one
    # (etcd: one transaction; fs: checked just before the create, see its module).

    def lease_unsupported(self) -> str | None:
        """Why this backend gives no lease (None: it does)."""
        from hamaster.store.registry import lease_backends

        return (f"the {type(self).__name__} backend offers no leader lease; the features that "
                f"must run once per cluster need ha_backend {' or '.join(lease_backends())}")

    def lease_acquire(self, name: str, member_id: str, ttl: float) -> Lease | None:
        """Renew or take lease ``name`` for ``member_id``; the lease if held now, else None.

        Raises :class:`StoreUnavailable` when the store cannot be reached (the caller must
        then stop acting as holder at ``valid_until`` of its last lease).
        """
        raise LeaseUnsupported(self.lease_unsupported() or "no lease")

    def lease_info(self, name: str) -> LeaseInfo:
        """The current holder and epoch of lease ``name`` (holder None if none holds it now)."""
        raise LeaseUnsupported(self.lease_unsupported() or "no lease")

    def lease_release(self, name: str, member_id: str, epoch: int) -> None:
        """Give up the lease (a graceful stop) so another member takes over without waiting."""
        raise LeaseUnsupported(self.lease_unsupported() or "no lease")

    def fenced_create(self, key: str, value: bytes, lease: Lease) -> bool:
        """Create ``key`` if absent **and** ``lease`` is still the current one; True if created.

        False when the key exists or the lease has passed to another epoch.
        """
        raise LeaseUnsupported(self.lease_unsupported() or "no lease")

    @abstractmethod
    def healthy(self) -> bool:
        """True if the last operation or poll reached the backend."""

    @abstractmethod
    def close(self) -> None:
        """Stop the watcher and release resources."""
