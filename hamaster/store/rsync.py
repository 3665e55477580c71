"""The rsync store: a local tree per master, pushed to every peer with real ``rsync``.

Each master reads and writes its own local directory (``ha_dir``) through :class:`FsStore`
(atomic temp-file + rename writes, polling watch), so reads, writes and watches never wait on
the network and keep working when peers are down. A pusher thread sends the tree to every peer
in ``ha_rsync_peers``; each peer's master sees the files arrive in *its* local tree and reports
them through its own watch, like any store change.

Peers: ``rsync://[user@]host[:port]/module[/path]`` (rsync daemon; ``ha_rsync_password_file``
is passed as ``--password-file``) or ``[user@]host:/path`` (rsync over ssh, command in
``ha_rsync_ssh``) or a local absolute path.

Transfer: ``rsync -rt --update --modify-window=-1 -p --chmod=D0700,F0600 --backup
--backup-dir=.hm-bak`` of the whole tree (``-t`` keeps modification times with nanoseconds;
``--update`` never overwrites a file that is newer on the receiver). No ``--delete``: deletions
travel only as tombstones. Filters: the root marker ``/.hamaster-store`` is never sent; ``/.tomb/``
is sent; every other dot-name is excluded (our ``.tmp-*`` write temps and rsync's own
``.NAME.XXXXXX`` receive temps, which :class:`FsStore` also never reports as keys).

Conflict rule: the newer change wins, by modification time in nanoseconds (the write time on
the master that made the change, kept by ``rsync -t``). rsync's own ``--update`` is coarse
(measured on rsync 3.5.0 with ``--modify-window=-1``: a file older by up to about a second, even
across a second boundary, replaces a newer one), so every push also runs with ``--backup
--backup-dir=.hm-bak`` (rsync hard-links the old file there, then renames the new one in: the key
never disappears): a file that rsync replaces on the receiver is kept under ``.hm-bak/``, and the
receiver's next watch pass restores it if it was newer than what replaced it (else drops the
backup), and then pushes, because the peer that sent the older value still holds it. A watcher
may briefly see the older value between the two; the final state is the newer one everywhere.
``--modify-window=-1`` makes rsync's quick check compare nanoseconds, so two same-size values
written in one second are still transferred. Clocks of the masters must be synchronised (NTP);
two writes of one key closer together than the clock skew may resolve either way.

Tombstones: deleting key ``k`` (``delete``, ``delete_tree``, ``compare_and_put(..., None)``)
removes the file and writes ``.tomb/k`` whose mtime is the deletion time (content: who and
when, informational). A put of ``k`` removes a local ``.tomb/k``. Every watch pass, before
reporting changes, the store *reconciles*: for each tombstone that is new or changed, and for
each live key that is new or changed (an internal full-tree watch finds both cheaply), it
compares the live file's mtime with the tombstone's: if the file is not newer, the file is
deleted (a peer that had not yet seen the delete pushed the old value back — it is never
resurrected); if the file is newer, the key was re-created after the delete and the tombstone
is removed. Tombstones older than ``tombstone_ttl`` (default 7 days) are swept; a peer that is
offline longer than that may resurrect keys deleted meanwhile.

Batching and retries: local writes mark the store dirty; the pusher waits ``debounce`` seconds
after the first change so a burst goes out as one rsync per peer. A full push also runs every
``interval`` seconds (anti-entropy). A peer whose push fails is retried with exponential backoff
(0.5 s doubling up to ``max_backoff``) and, because every push sends the whole tree, it is fully
caught up by its first successful push. ``healthy()`` is False while the local tree is
unreachable or any peer's last push failed (replication degraded); local writes still succeed
then — they are kept and delivered when the peer returns.

Limits: ``compare_and_put`` is atomic only within one master's tree; across masters concurrent
transitions resolve by the newer-wins rule (use etcd where cross-master transitions must not
race). A push sends the whole tree (rsync compares size+mtime, so unchanged files cost a stat on
each side): fine for thousands of keys, heavy for millions. Polling, not inotify, finds changes.
"""

from __future__ import annotations

import builtins
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hamaster.options import (
    BOOL,
    FLOAT,
    HOST,
    STR,
    STR_LIST,
    STR_OR_NONE,
    Option,
    opt,
    with_defaults,
)
from hamaster.store.base import Change, StoreError, StoreUnavailable, WatchCallback
from hamaster.store.fs import MARKER_NAME, FsStore, _unlink_quiet

log = logging.getLogger(__name__)

TOMB_DIR = ".tomb"
BACKUP_DIR = ".hm-bak"
DEFAULT_SSH = "ssh -o BatchMode=yes -o ConnectTimeout=5"
#: rsync exit codes that mean "transferred, but some source files vanished/changed meanwhile".
PARTIAL_OK = {23, 24}


@dataclass
class _Peer:
    dest: str
    kind: str                 # "daemon", "ssh" or "local"
    ok: bool = True
    pending: bool = True      # needs a push
    failures: int = 0
    next_try: float = 0.0
    last_ok: float = 0.0
    last_error: str = ""


def _peer(spec: str) -> _Peer:
    spec = spec.strip()
    if spec.startswith("rsync://"):
        return _Peer(dest=spec.rstrip("/") + "/", kind="daemon")
    if spec.startswith("/"):
        return _Peer(dest=spec.rstrip("/") + "/", kind="local")
    if ":" in spec:
        return _Peer(dest=spec.rstrip("/") + "/", kind="ssh")
    raise ValueError(f"ha_rsync_peers entry {spec!r}: expected rsync://host:port/module, "
                     "[user@]host:/path or an absolute path")


class RsyncStore(FsStore):
    """A local :class:`FsStore` tree replicated to peers with rsync (see module docstring)."""

    NAME = "rsync"
    OPTIONS = FsStore.OPTIONS + (
        Option("ha_rsync_peers", [], STR_LIST, "The other masters' trees: `rsync://host:port/"
               "module`, `[user@]host:/path` (ssh) or a local path.", HOST),
        Option("ha_rsync_password_file", None, STR_OR_NONE,
               "rsync daemon password file (`--password-file`).", HOST),
        Option("ha_rsync_interval", 30.0, FLOAT, "Seconds between full pushes.", HOST),
        Option("ha_rsync_debounce", 0.2, FLOAT, "Seconds a write waits to be pushed with "
               "the next ones.", HOST),
        Option("ha_rsync_max_backoff", 30.0, FLOAT, "Longest wait before retrying a peer.",
               HOST),
        Option("ha_rsync_tombstone_ttl", 604800.0, FLOAT,
               "Seconds a deletion's tombstone is kept.", HOST),
        Option("ha_rsync_ssh", DEFAULT_SSH, STR, "Remote shell of `[user@]host:/path` peers.",
               HOST),
        Option("ha_create_master_key", False, BOOL, "Create the cluster's master keypair now "
               "instead of agreeing with the peers (first start, one master).", HOST),
    )
    LEASES = False
    AGREES_MASTER_KEY = True
    SHARED_DIR = False

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> RsyncStore:
        """This master's tree on ``ha_dir``, replicated to ``ha_rsync_peers``."""
        poll = float(opt(opts, "ha_poll_interval"))
        opts = with_defaults(opts, cls.OPTIONS)
        if not opts.get("ha_dir"):
            raise StoreError("ha_backend rsync needs ha_dir (this master's local tree)")
        peers = opts.get("ha_rsync_peers") or []
        if isinstance(peers, str):
            peers = peers.split()
        try:
            return cls(opts["ha_dir"], peers, password_file=opts["ha_rsync_password_file"],
                       poll_interval=poll, interval=float(opts["ha_rsync_interval"]),
                       debounce=float(opts["ha_rsync_debounce"]),
                       max_backoff=float(opts["ha_rsync_max_backoff"]),
                       tombstone_ttl=float(opts["ha_rsync_tombstone_ttl"]),
                       ssh=opts["ha_rsync_ssh"] or DEFAULT_SSH,
                       member_id=opts.get("master_id") or "")
        except ValueError as exc:
            raise StoreError(str(exc)) from exc

    def __init__(self, root: str | Path, peers: builtins.list[str],
                 password_file: str | None = None, poll_interval: float = 0.5,
                 interval: float = 30.0, debounce: float = 0.2, max_backoff: float = 30.0,
                 tombstone_ttl: float = 7 * 86400.0, ssh: str = DEFAULT_SSH,
                 io_timeout: int = 30, rsync: str = "rsync", member_id: str = ""):
        """Open the local tree at ``root`` and configure the peers (nothing runs until start)."""
        super().__init__(root, poll_interval=poll_interval)
        self.peers = [_peer(p) for p in peers]
        self.password_file = password_file
        self.interval = float(interval)
        self.debounce = float(debounce)
        self.max_backoff = float(max_backoff)
        self.tombstone_ttl = float(tombstone_ttl)
        self.ssh = ssh or DEFAULT_SSH
        self.io_timeout = int(io_timeout)
        self.rsync = rsync
        self.member_id = member_id or os.uname().nodename
        self.tomb_root = self.root / TOMB_DIR
        self.tomb_root.mkdir(mode=0o700, exist_ok=True)
        # Internal watchers: one over the tombstones, one over every live key (reconcile only).
        self._tombs = FsStore(self.tomb_root, poll_interval=poll_interval)
        self._live = FsStore(self.root, poll_interval=poll_interval)
        self._tombs_seen: builtins.list[Change] = []
        self._live_seen: builtins.list[Change] = []
        self._tombs.watch("", self._tombs_seen.extend)
        self._live.watch("", self._live_seen.extend)
        self._reconcile_lock = threading.Lock()
        self._dirty = threading.Event()
        self._push_lock = threading.Lock()
        self._pstop = threading.Event()
        self._pusher: threading.Thread | None = None
        self._last_sweep = 0.0
        self._unpushed = False          # local writes not yet delivered to every peer
        self._reconcile_all()

    # ------------------------------------------------------------------ tombstones

    def _tomb(self, key: str) -> Path:
        return self.tomb_root / key

    def _write_tomb(self, key: str) -> None:
        path = self._tomb(key)
        now = time.time_ns()
        try:
            self._tomb_parent(path)
            tmp = self._write_tmp(path.parent, f"{self.member_id} {now}\n".encode(), 0o600)
            os.utime(tmp, ns=(now, now))
            os.rename(tmp, path)
        except IsADirectoryError:
            log.warning("rsync store: tombstone path for %s is a directory; skipped", key)
        except OSError as exc:
            raise self._unavailable(f"writing tombstone for {key!r}", exc) from exc

    def _tomb_parent(self, path: Path) -> None:
        """Make ``path``'s directory; an older tombstone file in the way is dropped."""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return
        except (NotADirectoryError, FileExistsError):
            pass
        p = path.parent
        while p != self.tomb_root:   # a key 'a' was deleted before keys 'a/...' existed
            if p.is_file():
                _unlink_quiet(p)
            p = p.parent
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _clear_tomb(self, key: str) -> None:
        try:
            os.unlink(self._tomb(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as exc:
            log.warning("rsync store: cannot remove tombstone for %s: %s", key, exc)

    def _reconcile_key(self, key: str) -> None:
        """Apply the newer-wins rule between ``key`` and ``.tomb/key``."""
        try:
            tst = os.stat(self._tomb(key))
        except OSError:
            return
        live = self.root / key
        try:
            lst = os.stat(live)
        except OSError:
            return
        if not os.path.isfile(live):
            return
        if lst.st_mtime_ns > tst.st_mtime_ns:
            self._clear_tomb(key)       # re-created after the delete: the put wins
        else:
            _unlink_quiet(live)         # an older value came back from a peer: stays deleted
            self._forget_live(key)
            log.debug("rsync store: %s deleted again by its tombstone", key)

    def _forget_live(self, key: str) -> None:
        """Drop ``key`` from the internal live watcher's snapshot after removing it here.

        The same old value can come back from another peer before the next pass, as a new file
        with the old mtime and size and, often, the freed inode number: with ``key`` still in
        the snapshot that return would look unchanged, and the stale file would stay.
        """
        with self._live._poll_lock:
            for w in self._live._watches.values():
                w.files.pop(key, None)

    def _superseded(self, key: str) -> bool:
        """True if ``key``'s live file is no newer than its tombstone.

        That is an old value a peer pushed back after the delete; it is removed here, as the
        next reconcile pass would, so neither a read nor a watch ever reports it (a push landing
        between the reconcile pass and the watch pass used to show a deleted key for a moment).
        """
        try:
            tst = os.stat(self._tomb(key))
        except OSError:
            return False
        try:
            lst = os.stat(self.root / key)
        except OSError:
            return True
        if lst.st_mtime_ns > tst.st_mtime_ns:
            return False
        self._reconcile_key(key)
        return True

    def _reconcile_all(self) -> None:
        for dirpath, _dirs, files in os.walk(self.tomb_root):
            for name in files:
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                self._reconcile_key(full.relative_to(self.tomb_root).as_posix())

    def _restore_backups(self) -> int:
        """Files rsync replaced on us: put back any that were newer than their replacement.

        Returns how many were put back. Each one means a peer holds the older value (it just
        sent it to us), so the caller must push: the restored file has the same name, size and
        mtime as before rsync replaced it, so the change watch alone would not notice.
        """
        bak_root = self.root / BACKUP_DIR
        restored = 0
        if not bak_root.is_dir():
            return restored
        for dirpath, _dirs, files in os.walk(bak_root):
            for name in files:
                if name.startswith("."):
                    continue
                bak = Path(dirpath) / name
                live = self.root / bak.relative_to(bak_root)
                try:
                    bst = os.stat(bak)
                    lst = os.stat(live)
                except FileNotFoundError:
                    _unlink_quiet(bak)      # removed since (a tombstone): nothing to restore
                    continue
                except OSError:
                    continue
                if bst.st_mtime_ns > lst.st_mtime_ns and os.path.isfile(live):
                    try:
                        os.rename(bak, live)    # the newer value wins back
                        restored += 1
                        log.debug("rsync store: kept newer local %s over an older push", live)
                    except OSError as exc:
                        log.warning("rsync store: cannot restore %s: %s", live, exc)
                else:
                    _unlink_quiet(bak)
        return restored

    def restore_newer(self) -> int:
        """Put back the local values a peer's push replaced with older ones, as every watch
        pass does first; for a reader with no watch running (``hamaster-key`` beside a stopped
        master, whose own newer records a running peer's push may just have replaced).
        Returns how many were put back (they are pushed with the next push)."""
        with self._reconcile_lock:
            restored = self._restore_backups()
            if restored:
                self._changed()
            return restored

    def _reconcile(self) -> None:
        """Reconcile what changed since the last pass (tombstones and live keys)."""
        with self._reconcile_lock:
            if self._restore_backups():
                self._changed()         # the peer that sent the older value needs ours
            self._tombs_seen.clear()
            self._live_seen.clear()
            self._tombs.poll_now()
            self._live.poll_now()
            keys = {c.key for c in self._tombs_seen if c.value is not None}
            keys |= {c.key for c in self._live_seen if c.value is not None}
            for key in sorted(keys):
                self._reconcile_key(key)
            if any(c.value is not None for c in self._live_seen):
                self._dirty.set()       # changes from other local writers go out too

    def sweep_tombstones(self, now: float | None = None) -> int:
        """Remove tombstones older than ``tombstone_ttl``; returns how many."""
        cutoff = ((now if now is not None else time.time()) - self.tombstone_ttl) * 1e9
        removed = 0
        for dirpath, _dirs, files in os.walk(self.tomb_root):
            for name in files:
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                try:
                    if full.stat().st_mtime_ns < cutoff:
                        full.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed

    # ------------------------------------------------------------------ writes

    def list(self, prefix: str) -> builtins.list[str]:
        """As :meth:`FsStore.list`, without keys that a newer tombstone has deleted."""
        return [k for k in super().list(prefix) if not self._superseded(k)]

    def get(self, key: str) -> bytes | None:
        """The local value of ``key``, None if absent or superseded by its tombstone."""
        value = super().get(key)
        if value is not None and self._superseded(key):
            return None
        return value

    def watch(self, prefix: str, callback: WatchCallback) -> None:
        """As :meth:`FsStore.watch`, without values that a newer tombstone has deleted."""
        def live_only(changes: builtins.list[Change]) -> None:
            kept = [c for c in changes if c.value is None or not self._superseded(c.key)]
            if kept:
                callback(kept)

        super().watch(prefix, live_only)

    def put(self, key: str, value: bytes, mode: int = 0o600) -> None:
        """Write locally (atomic), clear any tombstone, schedule a push."""
        super().put(key, value, mode)
        self._clear_tomb(key)
        self._changed()

    def delete(self, key: str) -> bool:
        """Delete locally and leave a tombstone so peers delete it too."""
        existed = super().delete(key)
        self._write_tomb(key)
        self._changed()
        return existed

    def delete_tree(self, prefix: str) -> int:
        """Delete every key under ``prefix``, one tombstone per key."""
        keys = self.list(prefix)
        for key in keys:
            self._write_tomb(key)     # the watcher may already delete files as tombs appear
        super().delete_tree(prefix)
        self._changed()
        return len(keys)

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes | None) -> bool:
        """Atomic in this master's tree; across masters the newer change wins."""
        ok = super().compare_and_put(key, expected, value)
        if ok and (expected is not None or value is not None):
            if value is None:
                self._write_tomb(key)
            else:
                self._clear_tomb(key)
            self._changed()
        return ok

    # ------------------------------------------------------------------ pushing

    def _changed(self) -> None:
        """A local change: every peer needs a push (the pusher batches them)."""
        self._unpushed = True
        for peer in self.peers:
            peer.pending = True
        self._dirty.set()

    def _argv(self, peer: _Peer) -> builtins.list[str]:
        argv = [
            # --omit-dir-times: let the receiver's directory mtimes move when files land, so its
            # poller (which re-lists a directory only when its mtime changes) sees them at once.
            self.rsync, "-rt", "--omit-dir-times", "--update", "--modify-window=-1", "-p",
            "--chmod=D0700,F0600",
            "--backup", f"--backup-dir={BACKUP_DIR}", f"--timeout={self.io_timeout}",
            f"--exclude=/{MARKER_NAME}", f"--include=/{TOMB_DIR}/", "--exclude=.*",
        ]
        if peer.kind == "daemon":
            argv.append("--contimeout=5")
            if self.password_file:
                argv.append(f"--password-file={self.password_file}")
        elif peer.kind == "ssh":
            argv += ["-e", self.ssh]
        return argv + [f"{self.root}/", peer.dest]

    def _push_one(self, peer: _Peer) -> bool:
        argv = self._argv(peer)
        env = dict(os.environ)
        env.pop("RSYNC_PASSWORD", None)
        try:
            r = subprocess.run(argv, capture_output=True, timeout=self.io_timeout + 30,
                               stdin=subprocess.DEVNULL, env=env)
            rc, err = r.returncode, r.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, err = -1, str(exc)
        now = time.monotonic()
        if rc == 0 or rc in PARTIAL_OK:
            if not peer.ok:
                log.warning("rsync peer %s reachable again; caught up", peer.dest)
            peer.ok, peer.failures, peer.last_ok, peer.last_error = True, 0, now, ""
            peer.pending = rc in PARTIAL_OK    # something vanished mid-transfer: go again
            peer.next_try = now
            return True
        peer.failures += 1
        delay = min(self.max_backoff, 0.5 * 2 ** (peer.failures - 1))
        peer.next_try = now + delay
        peer.pending = True
        peer.last_error = f"rsync exit {rc}: {err.splitlines()[-1] if err else ''}"
        if peer.ok:
            log.error("rsync push to %s failed (%s); retrying with backoff (max %gs), local "
                      "writes are kept and sent when it returns", peer.dest, peer.last_error,
                      self.max_backoff)
        peer.ok = False
        return False

    def push_now(self, force: bool = False) -> bool:
        """Push to every peer that needs it (all when ``force``); True if all succeeded."""
        with self._push_lock:
            self._dirty.clear()
            unpushed, self._unpushed = self._unpushed, False
            ok = True
            now = time.monotonic()
            for peer in self.peers:
                if not (force or peer.pending) or (not force and now < peer.next_try):
                    ok = ok and peer.ok
                    continue
                ok = self._push_one(peer) and ok
            if not ok:
                self._unpushed = self._unpushed or unpushed
            return ok

    def peer_status(self) -> dict[str, dict]:
        """Per peer: ok, consecutive failures, seconds since the last good push, last error."""
        now = time.monotonic()
        return {p.dest: {"ok": p.ok, "failures": p.failures, "last_error": p.last_error,
                         "since_ok_s": round(now - p.last_ok, 2) if p.last_ok else None}
                for p in self.peers}

    def _push_loop(self) -> None:
        last_full = time.monotonic()
        while not self._pstop.is_set():
            woke = self._dirty.wait(timeout=min(self.poll_interval, 0.5))
            if self._pstop.is_set():
                break
            now = time.monotonic()
            if woke:
                self._pstop.wait(self.debounce)     # batch a burst into one rsync
                for peer in self.peers:
                    peer.pending = True
            full = now - last_full >= self.interval
            if full:
                last_full = now
                for peer in self.peers:
                    peer.pending = True
            if any(p.pending and now >= p.next_try for p in self.peers):
                try:
                    self.push_now()
                except Exception:
                    log.exception("rsync store: push failed")
            if now - self._last_sweep > max(60.0, self.tombstone_ttl / 10):
                self._last_sweep = now
                try:
                    self.sweep_tombstones()
                except Exception:
                    log.exception("rsync store: tombstone sweep failed")

    # ------------------------------------------------------------------ lifecycle

    def poll_now(self) -> builtins.list[Change]:
        """Reconcile tombstones, then one watch pass (changes from peers show up here)."""
        try:
            self._check_root()
            self._reconcile()
        except StoreUnavailable as exc:
            self._down(exc)
        except OSError as exc:
            self._down(exc)
        return super().poll_now()

    def healthy(self) -> bool:
        """False if the local tree is unreachable or any peer's last push failed."""
        return super().healthy() and all(p.ok for p in self.peers)

    def start(self) -> None:
        """Start the watcher (polling) and the pusher threads."""
        super().start()
        if self._pusher is not None and self._pusher.is_alive():
            return
        self._pstop.clear()
        self._dirty.set()               # catch peers up with whatever we have
        self._pusher = threading.Thread(target=self._push_loop,
                                        name=f"rsyncstore-push:{self.root}", daemon=True)
        self._pusher.start()

    def close(self) -> None:
        """Stop both threads; local writes not yet pushed are pushed once more (best effort)."""
        self._pstop.set()
        self._dirty.set()
        if self._pusher is not None:
            self._pusher.join(timeout=self.io_timeout + 35)
            self._pusher = None
        super().close()
        if self._unpushed and self.peers:
            try:
                self.push_now(force=True)
            except Exception as exc:
                log.warning("rsync store: final push failed: %s", exc)

    def lease_unsupported(self) -> str | None:
        """rsync has no lease: during a partition each side writes its own tree, so two masters
        would both hold it (the exactly-once features refuse to start; see the operator guide)."""
        return ("ha_backend rsync offers no leader lease (no mutual exclusion exists while "
                "masters are partitioned: each writes its own tree); the reactor and the master "
                "schedule run exactly once per cluster only on ha_backend etcd or fs")

    def describe(self) -> str:
        return f"{self.root} -> " + ", ".join(shlex.quote(p.dest) for p in self.peers)
