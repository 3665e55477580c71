"""Where pillar sls files come from: ``pillar_roots`` in the shared store, local as a fallback.

Each saltenv's roots are, in order: the shared store's ``pillar_roots/<saltenv>/`` (with the fs
backend the directory ``ha_dir/pillar_roots/<saltenv>/``, edited in place or by
``hamaster-run pillar.push``; on etcd the keys ``pillar_roots/<saltenv>/<path>`` written by
``pillar.push``), then the master's local ``pillar_roots`` directories. A file is served from the
first root that has it. Reads go through :class:`~hamaster.fileroots.server.FileServer`, so
directory roots are opened beneath the root (``openat`` + ``O_NOFOLLOW``) and a symlink cannot
lead outside the tree.

A compile works on a :class:`TreeSnapshot`: the listing of every saltenv, taken at most once per
``ttl`` seconds (the poll interval), and file contents read on first use and memoised for the
snapshot's life. A compile therefore sees one consistent tree, and a change is served within
``ttl``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from hamaster.fileroots.server import FileServer, FileTooLarge, local_roots
from hamaster.options import opt
from hamaster.store.base import Store, StoreError, validate_key

log = logging.getLogger(__name__)

#: Shared-store prefix of the pillar tree: ``pillar_roots/<saltenv>/<path>``.
PILLAR_PREFIX = "pillar_roots/"
DEFAULT_PILLAR_ROOTS = {"base": ["/srv/pillar"]}
#: The largest single sls file read (a larger one is a render error).
MAX_FILE_SIZE = 16 * 1024 * 1024
#: ``pillar.push`` refuses files over this size (etcd values are at most 1 MiB).
PUSH_MAX_FILE = 1024 * 1024


class TreeSnapshot:
    """One consistent view of the tree: listings now, contents memoised on first read."""

    def __init__(self, server: FileServer, envs: list[str], taken: float) -> None:
        self._server = server
        self.envs = envs
        self.taken = taken
        self._files: dict[str, list[str]] = {}
        self._fileset: dict[str, frozenset[str]] = {}
        self._data: dict[tuple[str, str], bytes | None] = {}
        self._avail: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        for env in envs:
            files = server.env_files(env)
            self._files[env] = files
            self._fileset[env] = frozenset(files)
            self._avail[env] = sorted({sls_name(f) for f in files if f.endswith(".sls")})

    def files(self, env: str) -> list[str]:
        """Relative paths of every file of ``env``, sorted."""
        return self._files.get(env, [])

    def avail(self, env: str) -> list[str]:
        """The sls names available in ``env`` (``a/b.sls`` → ``a.b``, ``a/init.sls`` → ``a``)."""
        return self._avail.get(env, [])

    def has(self, env: str, rel: str) -> bool:
        """True when ``rel`` exists in ``env``."""
        return rel in self._fileset.get(env, frozenset())

    def read(self, env: str, rel: str) -> bytes | None:
        """Content of ``rel`` in ``env`` (None if absent); raises :class:`FileTooLarge`."""
        key = (env, rel)
        with self._lock:
            if key in self._data:
                return self._data[key]
        if not self.has(env, rel):
            return None
        data = self._server.read(env, rel, MAX_FILE_SIZE)
        with self._lock:
            self._data[key] = data
        return data

    def fingerprint(self) -> str:
        """sha256 over sorted ``(saltenv, path, sha256(content))`` of the whole snapshot
        (computed once; reads every file)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for env in self.envs:
                for rel in self.files(env):
                    try:
                        data = self.read(env, rel)
                    except FileTooLarge:
                        data = b"\0too-large"
                    digest = hashlib.sha256(data).hexdigest() if data is not None else ""
                    h.update(f"{env}\0{rel}\0{digest}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def sls_path(self, env: str, sls: str) -> str | None:
        """The file of sls ``sls`` in ``env``: ``a/b.sls`` or ``a/b/init.sls``; None if absent."""
        base = sls.replace(".", "/")
        for rel in (f"{base}.sls", f"{base}/init.sls"):
            if self.has(env, rel):
                return rel
        return None


def sls_name(rel: str) -> str:
    """``a/b.sls`` → ``a.b``; ``a/init.sls`` → ``a``."""
    base = rel[:-4]
    if base.endswith("/init"):
        base = base[:-5]
    return base.replace("/", ".")


class PillarTree:
    """The pillar tree of one master: saltenvs in Salt's order, snapshots, a content hash."""

    def __init__(self, server: FileServer, env_order: list[str], ttl: float = 0.5) -> None:
        self.server = server
        self.env_order = env_order
        self.ttl = ttl
        self._snap: TreeSnapshot | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_opts(cls, opts: dict, shared_store: Store | None = None) -> PillarTree:
        """The tree for a master's options: ``pillar_roots`` locally, the store first."""
        raw = opts.get("pillar_roots", DEFAULT_PILLAR_ROOTS)
        local = local_roots(raw, opts, "pillar_roots")
        order = ["base"] + [e for e in (raw if isinstance(raw, dict) else {}) if e != "base"]
        ttl = opts.get("pillar_tree_ttl")
        ttl = float((opt(opts, "ha_poll_interval") if ttl is None else ttl) or 0)
        if shared_store is None:
            return cls(FileServer(local), order, ttl)
        sources = {env: [(shared_store, f"{PILLAR_PREFIX}{env}/")] + local.get(env, [])
                   for env in local}
        server = FileServer(sources, discover=shared_store, discover_prefix=PILLAR_PREFIX)
        return cls(server, order, ttl)

    def envs(self) -> list[str]:
        """``base`` first, then the configured order, then the store's others sorted."""
        found = set(self.server.envs())
        ordered = [e for e in self.env_order if e in found or e == "base"]
        return ordered + sorted(found - set(ordered))

    def snapshot(self) -> TreeSnapshot:
        """The current snapshot, retaken when older than ``ttl``."""
        now = time.monotonic()
        with self._lock:
            snap = self._snap
            if snap is not None and now - snap.taken < self.ttl:
                return snap
        snap = TreeSnapshot(self.server, self.envs(), now)
        with self._lock:
            if self._snap is None or self._snap.taken <= snap.taken:
                self._snap = snap
        return snap

    def tree_hash(self) -> str:
        """sha256 over sorted ``(saltenv, path, sha256(content))`` of the whole tree."""
        return TreeSnapshot(self.server, self.envs(), time.monotonic()).fingerprint()


def push(store: Store, src_dir: str, saltenv: str = "base") -> dict[str, Any]:
    """Publish directory ``src_dir`` as ``pillar_roots/<saltenv>/`` in ``store``.

    Every regular file (dotfiles and symlinks leaving ``src_dir`` skipped) is written; keys under
    the prefix that no longer exist in ``src_dir`` are deleted. Returns counts.
    """
    if not saltenv or "/" in saltenv or saltenv.startswith(".") or saltenv in ("..",):
        raise ValueError(f"invalid saltenv {saltenv!r}")
    root = Path(src_dir)
    if not root.is_dir():
        raise ValueError(f"{src_dir} is not a directory")
    prefix = f"{PILLAR_PREFIX}{saltenv}/"
    real_root = os.path.realpath(root)
    items: list[tuple[str, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if not real.startswith(real_root + os.sep) or not os.path.isfile(real):
                log.warning("pillar.push: skipping %s (not a regular file inside %s)",
                            path, src_dir)
                continue
            if os.path.getsize(real) > PUSH_MAX_FILE:
                raise ValueError(f"{path} is over {PUSH_MAX_FILE} bytes; pillar files must be "
                                 "small")
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            key = prefix + rel
            validate_key(key)
            with open(real, "rb") as fh:
                items.append((key, fh.read()))
    try:
        existing = set(store.list(prefix.rstrip("/")))
        store.put_many(items)
        wanted = {k for k, _ in items}
        removed = 0
        for key in sorted(existing - wanted):
            if store.delete(key):
                removed += 1
    except StoreError as exc:
        raise ValueError(f"the shared store failed: {exc}") from None
    return {"saltenv": saltenv, "files": len(items), "removed": removed,
            "bytes": sum(len(v) for _, v in items)}
