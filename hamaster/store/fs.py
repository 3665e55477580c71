"""The filesystem store: a directory tree, local or NFS-mounted, watched by cheap polling.

Every key is a file under ``root``; a value is the file's bytes. Writers never rely on locks or
symlinks (neither is dependable on NFS): a write goes to a ``.tmp-<random>`` file in the target
directory, is fsync'ed and renamed over the key, so readers see the old or the new value.
Names starting with ``.`` (our temp files, rsync's ``.NAME.XXXXXX`` temps, the root marker) are
never keys.

Changes made by other processes or hosts are found by polling: per watched prefix a snapshot
``{key: (mtime_ns, size, inode)}`` plus the mtime of every directory. A pass stats the
directories and re-lists (stat'ing every entry) only those whose mtime changed or changed very
recently (coarse mtimes). Every ``FULL_RESCAN_EVERY`` passes every directory is re-listed by name
(stale NFS directory attributes), and every ``STAT_RESCAN_EVERY`` passes every file is stat'ed
(in-place edits by non-atomic writers, renames hidden by a stale directory mtime). On NFS the
client's attribute cache (``acdirmin``/``actimeo``) bounds how fast directory changes show.

``compare_and_put``: create-if-absent uses ``os.link`` of a fully written temp file, which fails
if the target exists; that is atomic locally and on an NFS server, so it is safe across hosts.
Replacing or deleting an expected value re-reads and then renames/unlinks under a per-root
lock that covers all threads of this process; across processes or hosts that path is best
effort (a concurrent writer between the re-read and the rename can be overwritten).

Leader lease (no ``flock``: it is not dependable across NFS/sshfs mounts): lease ``name`` is
a series of epoch records ``leases/<name>/<epoch>`` (12 digits), each created create-if-absent
(``os.link``), so exactly one member gets each epoch. The holder renews by rewriting *its own*
record (a ``beat`` counter) every ttl/3; nobody else ever writes it. Expiry is judged by each
observer on its **own monotonic clock**: a record whose content has not changed for ``ttl``
seconds since this observer first saw it is expired, and the observer then tries to create the
next epoch. Clocks of different hosts are never compared. The holder counts its lease valid
until ``ttl`` after the *start* of its last successful renewal, which is never later than an
observer's expiry (the observer starts counting when it reads the renewed record). A holder
that was frozen and resumes finds its validity passed, and a higher epoch on its next call.
``fenced_create`` checks that no higher epoch exists and the lease is still valid, then
creates: the window between the two is the limit of a filesystem without a compare-and-swap
across keys (a stale holder can still create in that window; the keys it fences are
create-if-absent themselves, so at most one writer acts either way). Old epochs are pruned.

Unavailability (root gone, EIO, ESTALE, EACCES, the root marker missing because the share is
unmounted) raises :class:`StoreUnavailable` from operations and turns ``healthy()`` False; the
watcher logs once per outage, keeps polling and resyncs (emitting the diff) on recovery.
An error that belongs to one key (``ENAMETOOLONG``, ``EINVAL``, ``EILSEQ``: a name the file system
refuses) raises :class:`InvalidKey` (a ``ValueError``) instead and leaves the store healthy.
"""

from __future__ import annotations

import base64
import builtins
import errno
import json
import logging
import os
import secrets
import shutil
import stat as stat_mod
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hamaster.options import HOST, STR_OR_NONE, Option, opt
from hamaster.store.base import (
    LEASES_PREFIX,
    MEMBERS_PREFIX,
    Change,
    InvalidKey,
    Lease,
    LeaseInfo,
    LeaseUnsupported,
    Store,
    StoreError,
    StoreUnavailable,
    WatchCallback,
    validate_key,
    validate_lease_name,
    validate_prefix,
)

log = logging.getLogger(__name__)

#: Epoch records kept per lease (older ones are pruned by the member that creates a new one).
LEASE_KEEP_EPOCHS = 5

#: Hidden file marking a store root; if it vanishes the share is taken as unmounted.
MARKER_NAME = ".hamaster-store"
TMP_PREFIX = ".tmp-"


def internal_name(name: str) -> bool:
    """True for a name an fs store uses for itself (its marker file, its temp files)."""
    return name == MARKER_NAME or name.startswith(TMP_PREFIX)


#: Every this many passes every watched directory is re-listed (names; new entries stat'ed).
FULL_RESCAN_EVERY = 20
#: Every this many passes every file is stat'ed too (finds in-place edits, stale mtimes).
STAT_RESCAN_EVERY = 120
#: A directory whose mtime is this close to now is re-listed again next pass (coarse mtimes).
HOT_WINDOW_NS = 2_000_000_000

_Sig = tuple[int, int, int]

#: Longest file name (bytes) on Linux file systems; longer key segments are refused up front.
NAME_MAX = 255
#: errnos that are about one key's name, not the store: a caller's error, never an outage.
KEY_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})

# One lock per store root shared by every FsStore of this process (compare_and_put replace).
_ROOT_LOCKS: dict[str, threading.Lock] = {}
_ROOT_LOCKS_GUARD = threading.Lock()


def _root_lock(root: Path) -> threading.Lock:
    real = os.path.realpath(root)
    with _ROOT_LOCKS_GUARD:
        return _ROOT_LOCKS.setdefault(real, threading.Lock())


@dataclass
class _DirState:
    mtime_ns: int
    files: set[str] = field(default_factory=set)
    subdirs: set[str] = field(default_factory=set)
    hot: bool = False


@dataclass
class _Watch:
    prefix: str
    callbacks: list[WatchCallback] = field(default_factory=list)
    files: dict[str, _Sig] = field(default_factory=dict)
    #: Keys this process wrote that no pass has seen yet (see :meth:`FsStore._wrote`).
    own: set[str] = field(default_factory=set)
    dirs: dict[str, _DirState] = field(default_factory=dict)
    synced: bool = False


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _makedirs_private(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0700 (``os.makedirs`` would create
    the parents ``0777 & ~umask``: ``pki/`` and ``jobs/`` readable by anyone who can reach
    the store root)."""
    missing = []
    d = Path(directory)
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class _Outage(Exception):
    """Internal: the store root is unreachable during a watch pass."""


class FsStore(Store):
    """A :class:`Store` on a directory (local disk or an NFS mount)."""

    NAME = "fs"
    OPTIONS = (
        Option("ha_dir", None, STR_OR_NONE, "fs: the directory every master shares (NFS); "
               "rsync: this master's own tree.", HOST),
    )
    LEASES = True
    SHARED_DIR = True

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> FsStore:
        """The store on ``ha_dir``."""
        if not opts.get("ha_dir"):
            raise StoreError("ha_backend fs needs ha_dir (the shared directory, e.g. an NFS mount)")
        return cls(opts["ha_dir"], poll_interval=float(opt(opts, "ha_poll_interval")))

    def __init__(self, root: str | Path, poll_interval: float = 0.5, create: bool = True):
        """Open the store at ``root`` (created with mode 0700 when ``create``)."""
        self.root = Path(root)
        self.poll_interval = float(poll_interval)
        self._lock = _root_lock(self.root)
        self._poll_lock = threading.RLock()
        self._watches: dict[str, _Watch] = {}
        self._healthy = True
        self._resync = False
        self._passes = 0
        self._bad_files: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Lease state: held leases (name -> (epoch, raw record)) and what this observer last
        # saw of each lease (name -> (epoch, raw record, monotonic time first seen)).
        self._lease_lock = threading.Lock()
        self._held: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._observed: dict[str, tuple[int, bytes | None, float]] = {}
        if create:
            try:
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create store directory {self.root}: {exc}") from exc
        self._marker_expected = self._ensure_marker()

    # ------------------------------------------------------------------ helpers

    def _ensure_marker(self) -> bool:
        marker = self.root / MARKER_NAME
        if marker.exists():
            return True
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            return True
        except OSError as exc:
            log.debug("no marker in %s (%s); cannot detect an unmounted share", self.root, exc)
            return False

    def _check_root(self) -> None:
        """Raise StoreUnavailable unless the root (and its marker) is reachable."""
        try:
            st = os.stat(self.root)
            if not stat_mod.S_ISDIR(st.st_mode):
                raise StoreUnavailable(f"store root {self.root} is not a directory")
            if self._marker_expected:
                os.stat(self.root / MARKER_NAME)
        except FileNotFoundError as exc:
            raise StoreUnavailable(
                f"store root {self.root} is missing or not mounted ({exc.filename} not found)"
            ) from exc
        except OSError as exc:
            raise StoreUnavailable(f"store root {self.root} unreachable: {exc}") from exc

    def _path(self, key: str) -> Path:
        validate_key(key)
        for seg in key.split("/"):
            if seg.startswith("."):
                raise ValueError(f"invalid store key {key[:200]!r}: segments must not start "
                                 "with '.'")
            if len(seg) > NAME_MAX // 4 and len(os.fsencode(seg)) > NAME_MAX:
                raise InvalidKey(f"store {self.root}: key {key[:200]!r}... has a name longer than "
                                 f"{NAME_MAX} bytes (File name too long)")
        return self.root / key

    def _prefix_path(self, prefix: str) -> tuple[str, Path]:
        prefix = validate_prefix(prefix)
        if prefix:
            self._path(prefix)
        return prefix, (self.root / prefix if prefix else self.root)

    def _ok(self) -> None:
        if not self._healthy:
            log.warning("store %s is reachable again; resyncing watches", self.root)
            self._resync = True
        self._healthy = True

    def _down(self, exc: BaseException) -> None:
        if self._healthy:
            log.error("store %s unavailable: %s (serving from memory until it returns)",
                      self.root, exc)
        self._healthy = False

    def _unavailable(self, what: str, exc: OSError) -> StoreError:
        """The exception for a failed operation: InvalidKey for a per-key errno, else an outage."""
        if len(what) > 200:
            what = what[:200] + f"...({len(what)} chars)"
        if exc.errno in KEY_ERRNOS:
            return InvalidKey(f"store {self.root}: {what} failed: {exc.strerror or exc}")
        err = StoreUnavailable(f"store {self.root}: {what} failed: {exc}")
        self._down(err)
        return err

    # ------------------------------------------------------------------ basic ops

    def get(self, key: str) -> bytes | None:
        """Return the bytes stored at ``key`` or None."""
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            try:
                self._check_root()
            except StoreUnavailable as exc:
                self._down(exc)
                raise
            self._ok()
            return None
        except IsADirectoryError:
            self._ok()
            return None
        except OSError as exc:
            raise self._unavailable(f"reading {key!r}", exc) from exc
        self._ok()
        return data

    def _write_tmp(self, directory: Path, value: bytes, mode: int, sync: bool = True) -> Path:
        """Write ``value`` to a fresh temp file in ``directory`` (fsync'ed when ``sync``)."""
        for attempt in range(3):
            tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._check_root()
                _makedirs_private(directory)
                continue
            try:
                os.fchmod(fd, mode)
                view = memoryview(value)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if sync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quiet(tmp)
                raise
            os.close(fd)
            return tmp
        raise AssertionError("unreachable")

    def _fsync_dir(self, directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def put(self, key: str, value: bytes, mode: int = 0o600) -> None:
        """Atomically replace ``key`` with ``value`` (temp file + fsync + rename)."""
        path = self._path(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"store values are bytes, got {type(value).__name__} for {key!r}")
        try:
            tmp = self._write_tmp(path.parent, bytes(value), mode)
            try:
                os.rename(tmp, path)
            except BaseException:
                _unlink_quiet(tmp)
                raise
        except StoreUnavailable as exc:
            self._down(exc)
            raise
        except IsADirectoryError as exc:
            raise StoreError(f"store {self.root}: {key!r} is a directory, not a key") from exc
        except OSError as exc:
            raise self._unavailable(f"writing {key!r}", exc) from exc
        self._fsync_dir(path.parent)
        self._wrote(key)
        self._ok()

    def _wrote(self, key: str) -> None:
        """Remember that this process wrote ``key`` for the watches that cover it.

        A watch learns of keys by polling, so a key written here and deleted by another
        process before the next pass would never be reported at all, neither put nor delete:
        a master's own auto-accept, then `hamaster-key -d` from the CLI, left the key accepted
        in that master's memory. A pass that finds such a key gone reports its deletion.
        """
        for w in builtins.list(self._watches.values()):
            if not w.prefix or key == w.prefix or key.startswith(w.prefix + "/"):
                w.own.add(key)

    def _settle_own(self, w: _Watch, changes: builtins.list[Change]) -> None:
        """After a pass: own writes the pass saw are done; those gone again are deletions."""
        for key in builtins.list(w.own):
            if key in w.files:
                w.own.discard(key)
            elif not os.path.lexists(self.root / key):
                w.own.discard(key)
                changes.append(Change(key, None))

    def put_many(self, items: builtins.list[tuple[str, bytes]], mode: int = 0o600) -> None:
        """Write many keys with one flush: temp files, one ``syncfs``, renames, one fsync per dir.

        The durability is that of :meth:`put` (data on disk before it becomes visible), at the
        cost of one flush for the batch instead of one per key — a 1,000-return burst goes from
        seconds to tens of milliseconds.
        """
        if len(items) < 4 or not _syncfs_available():
            for key, value in items:
                self.put(key, value, mode)
            return
        staged: builtins.list[tuple[Path, Path]] = []
        paths = [self._path(key) for key, _ in items]  # a bad key fails the batch before any write
        for key, value in items:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"store values are bytes, got {type(value).__name__} for {key!r}")
        try:
            for path, (_, value) in zip(paths, items, strict=True):
                staged.append((self._write_tmp(path.parent, bytes(value), mode, sync=False), path))
            _syncfs(self.root)
            for tmp, path in staged:
                os.rename(tmp, path)
        except StoreUnavailable as exc:
            for tmp, _ in staged:
                _unlink_quiet(tmp)
            self._down(exc)
            raise
        except OSError as exc:
            for tmp, _ in staged:
                _unlink_quiet(tmp)
            raise self._unavailable(f"writing {len(items)} keys", exc) from exc
        for directory in {path.parent for _, path in staged}:
            self._fsync_dir(directory)
        for key, _ in items:
            self._wrote(key)
        self._ok()

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            try:
                self._check_root()
            except StoreUnavailable as exc:
                self._down(exc)
                raise
            self._ok()
            return False
        except IsADirectoryError:
            return False
        except OSError as exc:
            raise self._unavailable(f"deleting {key!r}", exc) from exc
        self._ok()
        return True

    def delete_tree(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (and its directories); returns how many keys."""
        prefix, base = self._prefix_path(prefix)
        if not prefix:
            raise ValueError("refusing to delete the whole store")
        keys = self.list(prefix)
        if not keys:
            return 0
        if not base.is_dir():
            return 1 if self.delete(prefix) else 0
        hidden = base.parent / f"{TMP_PREFIX}del-{secrets.token_hex(8)}"
        try:
            os.rename(base, hidden)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._unavailable(f"deleting {prefix!r}", exc) from exc
        shutil.rmtree(hidden, ignore_errors=True)
        self._ok()
        return len(keys)

    def list(self, prefix: str) -> builtins.list[str]:
        """All keys under ``prefix`` (a path prefix, whole segments), recursive and sorted."""
        prefix, base = self._prefix_path(prefix)
        out: builtins.list[str] = []
        try:
            if prefix and base.is_file():
                out.append(prefix)
            else:
                self._walk(base, prefix, out)
        except FileNotFoundError:
            try:
                self._check_root()
            except StoreUnavailable as exc:
                self._down(exc)
                raise
        except OSError as exc:
            raise self._unavailable(f"listing {prefix!r}", exc) from exc
        self._ok()
        out.sort()
        return out

    def _walk(self, directory: Path, rel: str, out: builtins.list[str]) -> None:
        with os.scandir(directory) as it:
            entries = builtins.list(it)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = _join(rel, entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    self._walk(Path(entry.path), key, out)
                elif entry.is_file(follow_symlinks=False):
                    out.append(key)
            except FileNotFoundError:
                continue

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes | None) -> bool:
        """Write ``value`` (None deletes) only if ``key`` currently holds ``expected``."""
        path = self._path(key)
        if expected is None and value is None:
            return self.get(key) is None
        try:
            with self._lock:
                if expected is None:
                    assert value is not None
                    tmp = self._write_tmp(path.parent, bytes(value), 0o600)
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    finally:
                        _unlink_quiet(tmp)
                    self._fsync_dir(path.parent)
                    self._wrote(key)
                    self._ok()
                    return True
                current = self.get(key)
                if current != expected:
                    return False
                if value is None:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        return False
                    return True
                tmp = self._write_tmp(path.parent, bytes(value), 0o600)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    _unlink_quiet(tmp)
                    raise
                self._fsync_dir(path.parent)
                self._wrote(key)
                return True
        except StoreUnavailable as exc:
            self._down(exc)
            raise
        except OSError as exc:
            raise self._unavailable(f"compare_and_put {key!r}", exc) from exc

    # ------------------------------------------------------------------ membership

    def heartbeat(self, member_id: str, info: bytes, ttl: float) -> None:
        """Write ``cluster/members/<member_id>`` with a timestamp, ttl and ``info``."""
        record = {"ts": time.time(), "ttl": float(ttl),
                  "info": base64.b64encode(info).decode("ascii")}
        self.put(f"{MEMBERS_PREFIX}/{member_id}", json.dumps(record).encode())

    def members(self) -> dict[str, bytes]:
        """Members whose last heartbeat is younger than its ttl (clocks must be roughly synced)."""
        now = time.time()
        live: dict[str, bytes] = {}
        for key in self.list(MEMBERS_PREFIX):
            raw = self.get(key)
            if raw is None:
                continue
            try:
                record = json.loads(raw)
                if now <= float(record["ts"]) + float(record["ttl"]):
                    live[key.rsplit("/", 1)[-1]] = base64.b64decode(record["info"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("store %s: ignoring malformed member record %s: %s",
                            self.root, key, exc)
        return live

    # ------------------------------------------------------------------ leader lease

    def lease_unsupported(self) -> str | None:
        """None: the fs store gives a lease (create-if-absent epochs, observer-clock expiry)."""
        return None

    def _lease_epochs(self, name: str) -> builtins.list[int]:
        out = []
        for key in self.list(f"{LEASES_PREFIX}/{name}"):
            tail = key.rsplit("/", 1)[-1]
            if tail.isdigit():
                out.append(int(tail))
        return sorted(out)

    @staticmethod
    def _lease_key(name: str, epoch: int) -> str:
        return f"{LEASES_PREFIX}/{name}/{epoch:012d}"

    @staticmethod
    def _lease_record(raw: bytes | None) -> dict | None:
        if raw is None:
            return None
        try:
            rec = json.loads(raw)
        except ValueError:
            return None
        return rec if isinstance(rec, dict) else None

    def _lease_top(self, name: str) -> tuple[int, bytes | None]:
        epochs = self._lease_epochs(name)
        if not epochs:
            return 0, None
        top = epochs[-1]
        return top, self.get(self._lease_key(name, top))

    def lease_acquire(self, name: str, member_id: str, ttl: float) -> Lease | None:
        """Renew our epoch record, or create the next epoch once the current one expired."""
        unsupported = self.lease_unsupported()
        if unsupported:
            raise LeaseUnsupported(unsupported)
        validate_lease_name(name)
        ttl = float(ttl)
        with self._lease_lock:
            started = time.monotonic()
            top, raw = self._lease_top(name)
            rec = self._lease_record(raw)
            held = self._held.get((name, member_id))
            if held is not None:
                epoch, mine = held
                if top == epoch and raw == mine and rec is not None:
                    beat = dict(rec, beat=int(rec.get("beat", 0)) + 1)
                    new = json.dumps(beat, sort_keys=True).encode()
                    if self.compare_and_put(self._lease_key(name, epoch), mine, new):
                        self._held[(name, member_id)] = (epoch, new)
                        return Lease(name, member_id, epoch, started + ttl)
                log.warning("lease %s: epoch %d lost (current epoch %d)", name, epoch, top)
                del self._held[(name, member_id)]
            seen = self._observed.get(name)
            if seen is None or seen[0] != top or seen[1] != raw:
                self._observed[name] = (top, raw, started)
                expired = top == 0 or rec is None or bool(rec.get("released"))
            else:
                rttl = float(rec.get("ttl", ttl)) if rec else ttl
                expired = started - seen[2] > rttl or bool(rec and rec.get("released"))
            if not expired:
                return None
            epoch = top + 1
            new = json.dumps({"holder": member_id, "epoch": epoch, "ttl": ttl, "beat": 0},
                             sort_keys=True).encode()
            if not self.compare_and_put(self._lease_key(name, epoch), None, new):
                return None
            self._held[(name, member_id)] = (epoch, new)
            self._observed[name] = (epoch, new, started)
            for old in self._lease_epochs(name)[:-LEASE_KEEP_EPOCHS]:
                try:
                    self.delete(self._lease_key(name, old))
                except StoreError:
                    break
            log.info("lease %s: %s took epoch %d", name, member_id, epoch)
            return Lease(name, member_id, epoch, started + ttl)

    def lease_info(self, name: str) -> LeaseInfo:
        """The newest epoch record; holder None if released or (to this observer) expired."""
        validate_lease_name(name)
        with self._lease_lock:
            top, raw = self._lease_top(name)
            rec = self._lease_record(raw)
            if rec is None:
                return LeaseInfo(None, top)
            now = time.monotonic()
            seen = self._observed.get(name)
            if seen is None or seen[0] != top or seen[1] != raw:
                self._observed[name] = (top, raw, now)
                seen = self._observed[name]
            if rec.get("released") or now - seen[2] > float(rec.get("ttl", 5.0)):
                return LeaseInfo(None, top)
            return LeaseInfo(str(rec.get("holder")), top)

    def lease_release(self, name: str, member_id: str, epoch: int) -> None:
        """Mark our epoch record released (others take over at their next call)."""
        with self._lease_lock:
            held = self._held.pop((name, member_id), None)
            if held is None or held[0] != epoch:
                return
            rec = self._lease_record(held[1]) or {}
            new = json.dumps(dict(rec, released=True), sort_keys=True).encode()
            self.compare_and_put(self._lease_key(name, epoch), held[1], new)

    def fenced_create(self, key: str, value: bytes, lease: Lease) -> bool:
        """Create ``key`` if absent while ``lease`` is valid and no higher epoch exists."""
        if time.monotonic() >= lease.valid_until:
            return False
        epochs = self._lease_epochs(lease.name)
        if not epochs or epochs[-1] != lease.epoch:
            return False
        return self.compare_and_put(key, None, value)

    def healthy(self) -> bool:
        """True if the last operation or watch pass reached the store."""
        return self._healthy

    # ------------------------------------------------------------------ watching

    def watch(self, prefix: str, callback: WatchCallback) -> None:
        """Call ``callback`` with batches of changes under ``prefix``.

        The current content is taken as the baseline now, so only later changes are reported.
        """
        prefix, _ = self._prefix_path(prefix)
        with self._poll_lock:
            w = self._watches.get(prefix)
            if w is None:
                w = _Watch(prefix)
                self._watches[prefix] = w
                try:
                    self._check_root()
                    self._scan_watch(w, full=True)
                    w.synced = True
                except (_Outage, StoreUnavailable) as exc:
                    self._down(exc)
            w.callbacks.append(callback)

    def start(self) -> None:
        """Start the daemon watcher thread polling every ``poll_interval`` seconds."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"fsstore-watch:{self.root}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_now()
            except Exception:  # never let the watcher die
                log.exception("store %s: watch pass failed", self.root)

    def close(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, self.poll_interval * 4))
        self._thread = None

    def poll_now(self) -> builtins.list[Change]:
        """Run one watch pass: find changes, dispatch them to callbacks and return them."""
        batches: builtins.list[tuple[_Watch, builtins.list[Change]]] = []
        with self._poll_lock:
            self._passes += 1
            full = self._passes % FULL_RESCAN_EVERY == 0
            stat_all = self._passes % STAT_RESCAN_EVERY == 0
            try:
                self._check_root()
            except StoreUnavailable as exc:
                self._down(exc)
                return []
            self._ok()
            if self._resync:
                full = stat_all = True
                self._resync = False
            for w in builtins.list(self._watches.values()):
                changes: builtins.list[Change] = []
                try:
                    resync = not w.synced
                    self._scan_watch(w, full=full or resync, changes=changes,
                                     stat_all=stat_all or resync)
                    self._settle_own(w, changes)
                    w.synced = True
                except (_Outage, StoreUnavailable) as exc:
                    self._down(exc)
                    w.synced = False
                if changes:
                    batches.append((w, changes))
                if not self._healthy:
                    break
        result: builtins.list[Change] = []
        for w, changes in batches:
            result.extend(changes)
            for cb in builtins.list(w.callbacks):
                try:
                    cb(changes)
                except Exception:
                    log.exception("store %s: watch callback for %r failed", self.root, w.prefix)
        return result

    # The scanning below mutates the snapshot as it goes; ``changes`` gets what was found.

    def _scan_watch(self, w: _Watch, full: bool,
                    changes: builtins.list[Change] | None = None,
                    stat_all: bool = True) -> None:
        emit = changes if changes is not None else []
        base = self.root / w.prefix if w.prefix else self.root
        try:
            st = os.stat(base)
        except (FileNotFoundError, NotADirectoryError):
            self._check_root_or_outage()
            self._drop_dir(w, w.prefix, emit)
            return
        except OSError as exc:
            raise _Outage(str(exc)) from exc
        if not stat_mod.S_ISDIR(st.st_mode):
            return
        if w.prefix not in w.dirs:
            w.dirs[w.prefix] = _DirState(mtime_ns=-1)
        now = time.time_ns()
        for d in sorted(w.dirs):
            ds = w.dirs.get(d)
            if ds is None:
                continue
            dpath = self.root / d if d else self.root
            try:
                dst = os.stat(dpath)
            except (FileNotFoundError, NotADirectoryError):
                self._check_root_or_outage()
                self._drop_dir(w, d, emit)
                continue
            except OSError as exc:
                raise _Outage(str(exc)) from exc
            if ds.hot or dst.st_mtime_ns != ds.mtime_ns:
                self._relist(w, d, dst, now, emit, stat_all=True)
            elif full:
                self._relist(w, d, dst, now, emit, stat_all=stat_all)

    def _check_root_or_outage(self) -> None:
        try:
            self._check_root()
        except StoreUnavailable as exc:
            raise _Outage(str(exc)) from exc

    def _relist(self, w: _Watch, d: str, dst: os.stat_result, now: int,
                emit: builtins.list[Change], stat_all: bool = True) -> None:
        dpath = self.root / d if d else self.root
        ds = w.dirs[d]
        try:
            with os.scandir(dpath) as it:
                # In name order: changes come out in key order (the event bus relies on a
                # source's batches arriving in sequence order within a pass).
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            self._check_root_or_outage()
            self._drop_dir(w, d, emit)
            return
        except OSError as exc:
            raise _Outage(str(exc)) from exc
        files: set[str] = set()
        subdirs: set[str] = set()
        retry = False
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            key = _join(d, name)
            try:
                if not stat_all:  # names only: d_type from the listing, no stat for known keys
                    if key in w.files and entry.is_file(follow_symlinks=False):
                        files.add(name)
                        continue
                    if key in w.dirs and entry.is_dir(follow_symlinks=False):
                        subdirs.add(name)
                        continue
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _Outage(str(exc)) from exc
            if stat_mod.S_ISDIR(est.st_mode):
                subdirs.add(name)
                if key not in w.dirs:
                    w.dirs[key] = _DirState(mtime_ns=-1)
                    self._relist(w, key, est, now, emit)
            elif stat_mod.S_ISREG(est.st_mode):
                files.add(name)
                sig = _sig(est)
                if w.files.get(key) == sig:
                    continue
                value = self._read_stable(key, est)
                if value is None:  # keep the old signature: retried next pass
                    retry = True
                    if not (self.root / key).exists():
                        files.discard(name)
                    continue
                w.files[key] = sig
                emit.append(Change(key, value))
        for name in ds.files - files:
            key = _join(d, name)
            if w.files.pop(key, None) is not None:
                emit.append(Change(key, None))
        for name in ds.subdirs - subdirs:
            self._drop_dir(w, _join(d, name), emit)
        ds.files = files
        ds.subdirs = subdirs
        ds.mtime_ns = dst.st_mtime_ns
        ds.hot = retry or abs(now - dst.st_mtime_ns) < HOT_WINDOW_NS

    def _read_stable(self, key: str, est: os.stat_result) -> bytes | None:
        """Read a file; None if it vanished, failed to read or changed while being read."""
        path = self.root / key
        try:
            with open(path, "rb") as fh:
                before = os.fstat(fh.fileno())
                data = fh.read()
                after = os.fstat(fh.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ESTALE, errno.ENOTCONN):
                raise _Outage(str(exc)) from exc
            if key not in self._bad_files:
                self._bad_files.add(key)
                log.warning("store %s: cannot read %s (%s); skipping it", self.root, key, exc)
            return None
        if (len(data) != after.st_size or before.st_mtime_ns != after.st_mtime_ns
                or before.st_size != after.st_size):
            if key not in self._bad_files:
                self._bad_files.add(key)
                log.warning("store %s: %s changed while being read (a writer is not atomic?); "
                            "will retry", self.root, key)
            return None
        self._bad_files.discard(key)
        return data

    def _drop_dir(self, w: _Watch, d: str, emit: builtins.list[Change]) -> None:
        """Forget directory ``d`` and everything below it, emitting deletions."""
        pre = d + "/" if d else ""
        for key in sorted(k for k in w.files if k.startswith(pre)):
            del w.files[key]
            emit.append(Change(key, None))
        for sub in [k for k in w.dirs if k == d or k.startswith(pre)]:
            del w.dirs[sub]


_LIBC: Any = None


def _syncfs_available() -> bool:
    """True when libc's ``syncfs(2)`` can be called (Linux/glibc)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
            _LIBC.syncfs  # noqa: B018 - probe the symbol
        except (OSError, AttributeError):
            _LIBC = False
    return bool(_LIBC)


def _syncfs(root: Path) -> None:
    """Flush the filesystem holding ``root`` (one flush for a whole batch of writes)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
