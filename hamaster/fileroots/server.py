"""The master's file server: Salt's minion file-server commands over file_roots kept on stores.

Each salt environment (``saltenv``) maps to an ordered list of roots ``(store, prefix)``; a path
is served from the first root that has it, as Salt walks ``file_roots``. Listings are the union
of all roots of the environment.

Two kinds of roots:

* **Directory roots** — a :class:`~hamaster.store.fs.FsStore` or a
  :class:`~hamaster.store.readonly.ReadOnlyDirStore` (what :meth:`FileServer.from_opts` opens
  for an operator's ``file_roots`` directory). They are read straight from disk: chunks are
  read at their offset, hashes are cached keyed on the file's
  ``(dev, inode, size, mtime_ns, ctime_ns)`` once it has not changed for a few seconds. Every
  path is opened component by component beneath the root (:mod:`hamaster.beneath`: ``openat``
  + ``O_NOFOLLOW``; in-root symlinks are resolved by the server and followed only while they
  stay beneath the root), and the file is
  read through the descriptor that was checked, so a concurrent rename or symlink swap cannot
  make a request read outside the root. Under a store, the ``file_roots/<env>`` components
  must be real directories. A local directory that contains ``pki_dir`` or ``ha_dir`` is not
  served at all. In an ``FsStore`` names starting with ``.`` are never served (they are its temp
  files and marker, never keys); a ``ReadOnlyDirStore`` serves dotfiles as Salt does (except a store
  marker or ``.tmp-`` temp file).
* **Any other store** (etcd, …) — read through ``store.list``/``store.get``. A value is read whole
  on every request (one ``get`` per chunk and per hash), so such roots suit files up to a few
  MiB; large files belong in a directory root or in the manifest.
* **The manifest** (:mod:`hamaster.fileroots.manifest`) — with a shared store, each environment's
  first root is ``file_manifest/<env>/<path>`` (sha256, size, mode, inline). A file is served
  from the inline blob ``file_blobs/<sha256>`` in the store or from the master's local cache
  ``<cachedir>/file_blobs/<sha256>``. A large blob not in the cache yet makes the file "missing"
  (no fall-through to later roots) and calls the callback given to
  :meth:`FileServer.set_blob_missing` with the sha so the master fetches it
  from a peer in the background (:mod:`hamaster.fileroots.blobs`); requests never wait on a peer.
  Without manifest entries this root is empty and the direct ``file_roots/<env>/`` layout serves.

Every path from a minion is sanitised first: ``salt://`` and a ``?saltenv=`` query are stripped;
an absolute path, a ``..`` segment, a NUL byte, a backslash or a non-string path or saltenv makes
the request "missing" (``""``, ``{}`` or an empty chunk — never an exception), logged once at
warning. Store errors (an unreachable shared store) skip that root, so local directories listed
after it keep serving.
"""

from __future__ import annotations

import builtins
import gzip as gzip_mod
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hamaster import beneath
from hamaster.fileroots.manifest import (
    BLOBS_PREFIX,
    CACHE_DIRNAME,
    MANIFEST_PREFIX,
    BlobCache,
    Entry,
    blob_key,
    read_inline,
)
from hamaster.fileroots.paths import (
    clean_segment,
    holds_keys,
    skip_name,
    valid_env,
    walk_dir,
)
from hamaster.store.base import Store, StoreError, validate_key, validate_prefix
from hamaster.store.fs import FsStore
from hamaster.store.readonly import ReadOnlyDirStore

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1048576
HASH_TYPE = "sha256"
#: Shared-store prefix under which each environment's files live (``file_roots/<env>/<path>``).
SHARED_PREFIX = "file_roots/"
_MAX_WARNED = 1000
_HASH_CACHE_MAX = 50000
#: A file's hash is cached only once its mtime/ctime are this old (coarse/skewed clocks).
_SETTLE_NS = 5_000_000_000

_Sig = tuple[int, int, int, int, int]


# --------------------------------------------------------------------------- disk helpers


class FileTooLarge(Exception):
    """A file read whole (:meth:`FileServer.read`) is over the caller's size limit."""


# --------------------------------------------------------------------------- roots


class _Root:
    """One ``(store, prefix)`` root of an environment."""

    def __init__(self, store: Store, prefix: str):
        self.store = store
        self.prefix = validate_prefix(prefix) if prefix else ""
        self.key_prefix = f"{self.prefix}/" if self.prefix else ""
        self.dir: Path | None = None
        self.skip_hidden = True
        #: Directory roots: the store's root directory and the components below it, opened
        #: strictly (no symlinks) on every request; files beneath are opened with ``openat``.
        self.base: Path | None = None
        self.prefix_segments: tuple[str, ...] = ()
        if isinstance(store, (FsStore, ReadOnlyDirStore)):
            self.dir = Path(store.root) / self.prefix if self.prefix else Path(store.root)
            self.skip_hidden = isinstance(store, FsStore)
            self.base = Path(store.root)
            self.prefix_segments = tuple(s for s in self.prefix.split("/") if s)

    def __repr__(self) -> str:
        return f"<root {self.store.__class__.__name__}:{self.dir or ''} {self.prefix!r}>"

    def files(self) -> builtins.list[str]:
        if self.base is not None:
            return builtins.list(walk_dir(self.base, self.skip_hidden, self.prefix_segments))
        n = len(self.key_prefix)
        return [k[n:] for k in self.store.list(self.prefix) if k.startswith(self.key_prefix)]

    def open(self, segments: builtins.list[str]) -> tuple[int, os.stat_result] | None:
        """A directory root's regular file at ``segments``: ``(fd, fstat)`` (caller closes it).

        Opened component by component beneath the root (:mod:`hamaster.beneath`), so a
        concurrent rename or symlink swap cannot make it a file outside the root.
        """
        assert self.base is not None
        if any(skip_name(s, self.skip_hidden) for s in segments):
            return None
        root = beneath.open_root(self.base, self.prefix_segments)
        if root is None:
            return None
        with root:
            try:
                return beneath.open_file(root, segments)
            except beneath.EscapesRoot as exc:
                _warn_once("escapes-root", f"{self.dir}/{'/'.join(segments)}",
                           f"refusing %s: it resolves outside its file root ({exc})")
                return None

    def locate(self, segments: builtins.list[str]) -> str | None:
        """The store key of ``segments`` in this (non-directory) root, None if absent."""
        key = self.key_prefix + "/".join(segments)
        try:
            validate_key(key)
            data = self.store.get(key)
        except ValueError:
            return None
        return key if data is not None else None


@dataclass
class _Found:
    """A located file: its root, where it is (store key, manifest location or relative path),
    its relative path and, for directory roots, the open descriptor it is read through."""

    root: _Root
    loc: str
    rel: str
    fd: int = -1
    st: os.stat_result | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Found:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: ``locate`` result of a manifest file whose large blob is not in the local cache yet.
_PENDING = "\0pending"


class _ManifestRoot(_Root):
    """``file_manifest/<env>/``: locations are ``file_blobs/<sha>`` (inline) or ``<sha>``
    (cache)."""

    def __init__(self, store: Store, env: str, server: FileServer):
        super().__init__(store, f"{MANIFEST_PREFIX}{env}/")
        self.dir = None  # read through the store API even on an FsStore
        self.base = None
        self.server = server

    def __repr__(self) -> str:
        return f"<manifest root {self.store.__class__.__name__} {self.prefix!r}>"

    def locate(self, segments: builtins.list[str]) -> str | None:
        key = self.key_prefix + "/".join(segments)
        try:
            validate_key(key)
        except ValueError:
            return None
        entry = Entry.from_json(self.store.get(key))
        if entry is None:
            return None
        if entry.inline:
            return blob_key(entry.sha256)
        cache = self.server.blob_cache
        if cache is not None and cache.has(entry.sha256):
            return entry.sha256
        notify = self.server._on_blob_missing
        if notify is not None:
            try:
                notify(entry.sha256)
            except Exception:  # a callback never breaks serving
                log.debug("on_blob_missing failed", exc_info=True)
        return _PENDING

    def hash_of(self, loc: str) -> str:
        return loc[len(BLOBS_PREFIX):] if loc.startswith(BLOBS_PREFIX) else loc

    def read(self, loc: str, offset: int, size: int) -> bytes | None:
        if loc.startswith(BLOBS_PREFIX):
            data = read_inline(self.store, loc[len(BLOBS_PREFIX):])
            return None if data is None else data[offset:offset + size]
        cache = self.server.blob_cache
        return None if cache is None else cache.read(loc, offset, size)


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(reason: str, what: str, msg: str) -> None:
    with _warned_lock:
        first = (reason, what) not in _warned and len(_warned) < _MAX_WARNED
        if first:
            _warned.add((reason, what))
    if first:
        log.warning(msg, what)
    else:
        log.debug(msg, what)


def _sanitize(path: Any, saltenv: str) -> tuple[builtins.list[str], str] | None:
    """``(segments, saltenv)`` of a minion-supplied path, or None if it must be refused."""
    if not isinstance(path, str):
        _warn_once("bad-path", repr(type(path).__name__), "refusing a non-string path (%s)")
        return None
    raw = path
    if path.startswith("salt://"):
        path = path[len("salt://"):]
    if "?" in path:
        path, _, query = path.partition("?")
        for comp in query.split("&"):
            name, eq, value = comp.partition("=")
            if eq and name == "saltenv":
                saltenv = value
    if "\0" in path or "\\" in path or "\0" in saltenv:
        _warn_once("bad-path", repr(raw), "refusing path %s: NUL byte or backslash")
        return None
    if path.startswith("/"):
        _warn_once("bad-path", repr(raw), "refusing absolute path %s")
        return None
    segments = [s for s in path.split("/") if s not in ("", ".")]
    if ".." in segments:
        _warn_once("bad-path", repr(raw), "refusing path %s: '..' segment")
        return None
    if not segments:
        return None
    return segments, saltenv


def _env_of(load: Any) -> str | None:
    if not isinstance(load, dict):
        return None
    env = load.get("saltenv")
    if env is None:
        env = load.get("env")
    if env is None:
        return "base"
    if not isinstance(env, str):
        _warn_once("bad-env", repr(type(env).__name__), "refusing a non-string saltenv (%s)")
        return None
    return env


def local_roots(raw: Any, opts: dict, option: str = "file_roots"
                ) -> dict[str, builtins.list[tuple[Store, str]]]:
    """``{saltenv: [(ReadOnlyDirStore(dir), ""), …]}`` for an operator's ``file_roots``-shaped
    option (``pillar_roots`` too): invalid entries and directories holding keys are skipped,
    with a log line naming ``option``."""
    if not isinstance(raw, dict):
        log.warning("%s must map saltenv -> list of directories, got %r; ignoring it",
                    option, type(raw).__name__)
        raw = {}
    local: dict[str, builtins.list[tuple[Store, str]]] = {}
    for env, dirs in raw.items():
        if not isinstance(env, str) or not valid_env(env):
            log.warning("%s: ignoring invalid saltenv %r", option, env)
            continue
        if isinstance(dirs, str):
            dirs = [dirs]
        if not isinstance(dirs, (builtins.list, tuple)):
            log.warning("%s: %s must be a list of directories; ignoring it", option, env)
            continue
        roots = local.setdefault(env, [])
        for d in dirs:
            if not isinstance(d, str) or not d:
                log.warning("%s: ignoring invalid directory %r in %s", option, d, env)
                continue
            d = os.path.expanduser(d)
            secret = holds_keys(d, opts)
            if secret:
                log.error("%s: ignoring %s in %s: it contains %s (the master's keys "
                          "must never be under a file root)", option, d, env, secret)
                continue
            roots.append((ReadOnlyDirStore(d), ""))
    return local


# --------------------------------------------------------------------------- the server


class FileServer:
    """Salt's ``_file_*``/``_serve_file`` master commands over ordered file roots.

    ``sources`` maps saltenv → ordered ``[(store, prefix), …]``. With ``discover`` (a shared
    store), environments that appear later under ``discover_prefix`` (``file_roots/<env>/``)
    are served too, from that store only.
    """

    def __init__(self, sources: dict[str, builtins.list[tuple[Store, str]]],
                 chunk_size: int = DEFAULT_CHUNK_SIZE, *, discover: Store | None = None,
                 discover_prefix: str = SHARED_PREFIX, manifest: Store | None = None,
                 blob_cache: BlobCache | None = None):
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        #: With ``manifest`` (a store holding ``file_manifest/``), every environment's first root.
        self._manifest = manifest
        self.blob_cache = blob_cache
        self._on_blob_missing: Callable[[str], None] | None = None
        self._sources = {env: self._manifest_roots(env)
                         + [_Root(store, prefix) for store, prefix in roots]
                         for env, roots in sources.items()}
        self._discover = discover
        self._discover_prefix = (discover_prefix if discover_prefix.endswith("/")
                                 else discover_prefix + "/")
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[_Sig, str]] = {}
        self._store_down: set[int] = set()

    @property
    def reads_shared_store(self) -> bool:
        """True when requests read the cluster's shared store (etcd, an NFS-backed directory):
        such reads can stall for a store timeout, so callers serve them off the event loop."""
        return self._discover is not None or self._manifest is not None

    def set_blob_missing(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback(sha256)`` when a manifest file's large blob is not in ``blob_cache``
        (the master fetches it in the background); None stops the calls. It must not block;
        an exception from it is logged at debug and never breaks serving."""
        self._on_blob_missing = callback

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_opts(cls, opts: dict, shared_store: Store | None = None) -> FileServer:
        """Roots from ``opts["file_roots"]``; with ``shared_store``, ``file_roots/<env>/`` first.

        Local directories are opened read-only
        (:class:`~hamaster.store.readonly.ReadOnlyDirStore`): nothing is created
        or chmod'ed in them, and a missing directory is just empty.
        """
        local = local_roots(opts.get("file_roots", {"base": ["/srv/salt"]}), opts)
        chunk = opts.get("file_buffer_size", DEFAULT_CHUNK_SIZE)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
            chunk = DEFAULT_CHUNK_SIZE
        if shared_store is None:
            return cls(local, chunk)
        envs = set(local)
        try:
            envs.update(cls._store_envs(shared_store, SHARED_PREFIX))
            envs.update(cls._store_envs(shared_store, MANIFEST_PREFIX))
        except StoreError as exc:
            log.warning("cannot list file_roots environments in the shared store: %s", exc)
        sources = {env: [(shared_store, f"{SHARED_PREFIX}{env}/")] + local.get(env, [])
                   for env in sorted(envs)}
        cache = BlobCache(os.path.join(opts.get("cachedir") or ".", CACHE_DIRNAME))
        return cls(sources, chunk, discover=shared_store, discover_prefix=SHARED_PREFIX,
                   manifest=shared_store, blob_cache=cache)

    @staticmethod
    def _store_envs(store: Store, prefix: str) -> set[str]:
        envs = set()
        for key in store.list(prefix):
            rest = key[len(prefix):] if key.startswith(prefix) else ""
            env, sep, _ = rest.partition("/")
            if sep and valid_env(env):
                envs.add(env)
        return envs

    # ------------------------------------------------------------------ lookup

    def _manifest_roots(self, env: str) -> builtins.list[_Root]:
        if self._manifest is None or not valid_env(env):
            return []
        return [_ManifestRoot(self._manifest, env, self)]

    def _roots(self, env: str) -> builtins.list[_Root]:
        roots = self._sources.get(env)
        if roots is not None:
            return roots
        if not valid_env(env):
            return []
        roots = self._manifest_roots(env)
        if self._discover is not None:
            roots.append(_Root(self._discover, f"{self._discover_prefix}{env}/"))
        return roots

    def _store_failed(self, root: _Root, exc: Exception) -> None:
        with self._lock:
            first = id(root.store) not in self._store_down
            self._store_down.add(id(root.store))
        if first:
            log.warning("file server: %r unavailable (%s); trying the next root", root, exc)

    def _store_ok(self, root: _Root) -> None:
        if self._store_down:
            with self._lock:
                if id(root.store) in self._store_down:
                    self._store_down.discard(id(root.store))
                    log.warning("file server: %r reachable again", root)

    def _find(self, load: Any) -> _Found | None:
        """The requested file (close it after use), or None."""
        env = _env_of(load)
        if env is None:
            return None
        clean = _sanitize(load.get("path"), env)
        if clean is None:
            return None
        segments, env = clean
        return self._lookup(env, segments)

    def _lookup(self, env: str, segments: builtins.list[str]) -> _Found | None:
        rel = "/".join(segments)
        for root in self._roots(env):
            if root.base is not None:
                opened = root.open(segments)
                if opened is not None:
                    return _Found(root, rel, rel, opened[0], opened[1])
                continue
            try:
                loc = root.locate(segments)
            except StoreError as exc:
                self._store_failed(root, exc)
                continue
            self._store_ok(root)
            if loc == _PENDING:
                return None
            if loc is not None:
                return _Found(root, loc, rel)
        return None

    def _env_files(self, env: str) -> builtins.list[str]:
        seen: set[str] = set()
        for root in self._roots(env):
            try:
                files = root.files()
            except StoreError as exc:
                self._store_failed(root, exc)
                continue
            self._store_ok(root)
            for rel in files:
                if rel not in seen and self._listable(root, rel):
                    seen.add(rel)
        return sorted(seen)

    @staticmethod
    def _listable(root: _Root, rel: str) -> bool:
        segs = rel.split("/")
        if not all(clean_segment(s) for s in segs):
            return False
        return root.dir is None or not any(skip_name(s, root.skip_hidden) for s in segs)

    def _hash(self, found: _Found) -> str | None:
        root, loc = found.root, found.loc
        if isinstance(root, _ManifestRoot):
            return root.hash_of(loc)
        if found.fd < 0 or found.st is None:
            data = root.store.get(loc)
            return None if data is None else hashlib.sha256(data).hexdigest()
        fd, st = found.fd, found.st
        try:
            sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            key = f"{root.dir}\0{loc}"
            with self._lock:
                cached = self._hashes.get(key)
            if cached is not None and cached[0] == sig:
                return cached[1]
            h = hashlib.sha256()
            offset = 0
            while True:
                block = os.pread(fd, 1 << 20, offset)
                if not block:
                    break
                h.update(block)
                offset += len(block)
            after = os.fstat(fd)
            hsum = h.hexdigest()
            # Cache only files that have been still for a while: timestamps are coarse (a
            # jiffy), so a rewrite within the same tick (even reusing the inode) could otherwise
            # keep the same signature ("racy git").
            settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_NS
            if (settled and offset == st.st_size
                    and (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == sig[2:]):
                with self._lock:
                    if len(self._hashes) >= _HASH_CACHE_MAX:
                        self._hashes.clear()
                    self._hashes[key] = (sig, hsum)
            return hsum
        except OSError:
            return None

    # ------------------------------------------------------------------ Salt commands

    def file_list(self, load: dict) -> builtins.list[str]:
        """``_file_list``: relative paths of the files of ``saltenv`` starting with ``prefix``."""
        env = _env_of(load)
        if env is None:
            return []
        prefix = load.get("prefix", "") or ""
        if not isinstance(prefix, str):
            return []
        prefix = prefix.strip("/")
        files = self._env_files(env)
        return [f for f in files if f.startswith(prefix)] if prefix else files

    def file_list_emptydirs(self, load: dict) -> builtins.list[str]:
        """``_file_list_emptydirs``: always empty (stores hold files, not directories)."""
        return []

    def dir_list(self, load: dict) -> builtins.list[str]:
        """``_dir_list``: every directory holding a served file (derived from file paths)."""
        env = _env_of(load)
        if env is None:
            return []
        prefix = load.get("prefix", "") or ""
        if not isinstance(prefix, str):
            return []
        prefix = prefix.strip("/")
        dirs: set[str] = set()
        for rel in self._env_files(env):
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return sorted(d for d in dirs if d.startswith(prefix))

    def symlink_list(self, load: dict) -> dict:
        """``_symlink_list``: {} (in-root symlinks are served as the files they point to)."""
        return {}

    def file_hash(self, load: dict) -> dict | str:
        """``_file_hash``: ``{"hsum", "hash_type"}`` of the file, or ``""`` if missing."""
        found = self._find(load)
        if found is None:
            return ""
        try:
            with found:
                hsum = self._hash(found)
        except StoreError as exc:
            self._store_failed(found.root, exc)
            return ""
        if hsum is None:
            return ""
        return {"hsum": hsum, "hash_type": HASH_TYPE}

    def file_hash_and_stat(self, load: dict) -> tuple[dict | str, None]:
        """``_file_hash_and_stat``: ``(file_hash(load), None)`` — no stat is offered."""
        return self.file_hash(load), None

    def file_find(self, load: dict) -> dict:
        """``_file_find``: ``{"path": rel, "rel": rel}`` (no master paths leak) or {}."""
        found = self._find(load)
        if found is None:
            return {}
        found.close()
        return {"path": found.rel, "rel": found.rel}

    def serve_file(self, load: dict) -> dict:
        """``_serve_file``: ``{"data": chunk at offset loc, "dest": rel}``; data empty at the end.

        ``gzip`` (a level 1-9) compresses the chunk on its own and echoes ``"gzip"`` as Salt
        does; ``loc`` always counts uncompressed bytes.
        """
        ret: dict[str, Any] = {"data": b"", "dest": ""}
        offset = load.get("loc", 0) if isinstance(load, dict) else None
        if offset is None:
            offset = 0
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            return ret
        found = self._find(load)
        if found is None:
            return ret
        root, loc, rel = found.root, found.loc, found.rel
        try:
            with found:
                if isinstance(root, _ManifestRoot):
                    data = root.read(loc, offset, self.chunk_size)
                elif found.fd >= 0:
                    data = beneath.read_at(found.fd, offset, self.chunk_size)
                else:
                    whole = root.store.get(loc)
                    data = None if whole is None else whole[offset:offset + self.chunk_size]
        except StoreError as exc:
            self._store_failed(root, exc)
            return ret
        if data is None:
            return ret
        ret["dest"] = rel
        level = load.get("gzip")
        if data and isinstance(level, int) and not isinstance(level, bool) and 1 <= level <= 9:
            data = gzip_mod.compress(data, compresslevel=level)
            ret["gzip"] = level
        ret["data"] = data
        return ret

    def envs(self) -> builtins.list[str]:
        """``_file_envs``: configured environments plus those found in the shared store."""
        envs = set(self._sources)
        try:
            if self._discover is not None:
                envs.update(self._store_envs(self._discover, self._discover_prefix))
            if self._manifest is not None:
                envs.update(self._store_envs(self._manifest, MANIFEST_PREFIX))
        except StoreError as exc:
            log.debug("cannot list environments in the shared store: %s", exc)
        return sorted(envs)

    def env_files(self, env: str) -> builtins.list[str]:
        """Relative paths of the files of ``env``, sorted (the union of its roots)."""
        return self._env_files(env) if valid_env(env) else []

    def read(self, env: str, rel: str, max_size: int | None = None) -> bytes | None:
        """The whole content of ``rel`` in ``env`` from the first root that has it; None when it
        is missing or its path is refused. Raises :class:`FileTooLarge` past ``max_size``."""
        clean = _sanitize(rel, env)
        if clean is None or not valid_env(clean[1]):
            return None
        found = self._lookup(clean[1], clean[0])
        if found is None:
            return None
        root, loc = found.root, found.loc
        try:
            with found:
                if found.st is not None and max_size is not None and found.st.st_size > max_size:
                    raise FileTooLarge(f"{rel} is {found.st.st_size} bytes (limit {max_size})")
                if isinstance(root, _ManifestRoot):
                    data = root.read(loc, 0, (max_size if max_size is not None else 1 << 26) + 1)
                elif found.fd >= 0:
                    data = beneath.read_at(found.fd, 0, -1)
                else:
                    data = root.store.get(loc)
        except StoreError as exc:
            self._store_failed(root, exc)
            return None
        if data is not None and max_size is not None and len(data) > max_size:
            raise FileTooLarge(f"{rel} is over {max_size} bytes")
        return data

    def manifest_hash(self) -> str:
        """sha256 over sorted ``(env, path, sha256)`` of everything served (file_roots drift)."""
        h = hashlib.sha256()
        for env in self.envs():
            for rel in self._env_files(env):
                hsum = None
                found = self._lookup(env, rel.split("/"))
                if found is not None:
                    try:
                        with found:
                            hsum = self._hash(found)
                    except StoreError as exc:
                        self._store_failed(found.root, exc)
                h.update(f"{env}\0{rel}\0{hsum or ''}\n".encode())
        return h.hexdigest()


def open_file_server(opts: dict, shared_store: Store | None = None) -> FileServer:
    """:meth:`FileServer.from_opts` — the file server for a master's options."""
    return FileServer.from_opts(opts, shared_store)
