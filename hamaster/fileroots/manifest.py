"""file_roots by manifest: paths and hashes in the shared store, contents addressed by sha256.

Layout on the shared store (any backend; the reason for it is etcd, whose values are small):

* ``file_manifest/<env>/<path>`` → JSON ``{"sha256", "size", "mode", "inline"}``;
* ``file_blobs/<sha256>`` → the content of a file of at most :data:`INLINE_MAX` bytes
  (``"inline": true``).

A larger file is never put in the store: it lives in each master's local content-addressed
cache ``<cachedir>/file_blobs/<sha256>`` and moves between masters by hash
(:mod:`hamaster.fileroots.blobs`). The master that publishes (:func:`publish`, the
``fileroots.push`` runner) has every blob in its cache; the others fetch the missing ones in the
background when the manifest changes and serve a file only once its content is present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as stat_mod
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hamaster import beneath
from hamaster.fileroots.paths import skip_entry, valid_env
from hamaster.store.base import Store, StoreError

log = logging.getLogger(__name__)

MANIFEST_PREFIX = "file_manifest/"
BLOBS_PREFIX = "file_blobs/"
#: Files up to this size are stored inline in the shared store (``file_blobs/<sha256>``).
INLINE_MAX = 64 * 1024
#: Name of the content-addressed cache directory under the master's ``cachedir``.
CACHE_DIRNAME = "file_blobs"
_COPY_BLOCK = 1 << 20


def is_sha256(value: Any) -> bool:
    """True for 64 lowercase hex digits."""
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


@dataclass(frozen=True)
class Entry:
    """One manifest entry: the file's content hash, size, permission bits and where it lives."""

    sha256: str
    size: int
    mode: int
    inline: bool

    def to_json(self) -> bytes:
        return json.dumps({"sha256": self.sha256, "size": self.size, "mode": self.mode,
                           "inline": self.inline}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Entry | None:
        """The entry in ``raw``, or None if it is absent or malformed (never raises)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        sha, size, mode, inline = (data.get("sha256"), data.get("size"), data.get("mode", 0o644),
                                   data.get("inline", False))
        if (not is_sha256(sha) or not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(mode, int) or isinstance(mode, bool)
                or not isinstance(inline, bool) or (inline and size > INLINE_MAX)):
            return None
        return cls(sha, size, mode & 0o7777, inline)


def manifest_key(env: str, path: str) -> str:
    return f"{MANIFEST_PREFIX}{env}/{path}"


def blob_key(sha: str) -> str:
    return f"{BLOBS_PREFIX}{sha}"


def read_inline(store: Store, sha: str) -> bytes | None:
    """Content of inline blob ``sha`` from the store, None if absent or not matching its hash."""
    data = store.get(blob_key(sha))
    if data is None or hashlib.sha256(data).hexdigest() != sha:
        return None
    return data


def load_manifest(store: Store, env: str | None = None) -> dict[tuple[str, str], Entry]:
    """Every valid entry (of ``env``, or of all environments): ``{(env, path): Entry}``."""
    prefix = MANIFEST_PREFIX + (f"{env}/" if env else "")
    out: dict[tuple[str, str], Entry] = {}
    for key, raw in store.get_many(prefix.rstrip("/")).items():
        rest = key[len(MANIFEST_PREFIX):]
        e, sep, path = rest.partition("/")
        entry = Entry.from_json(raw)
        if sep and path and entry is not None:
            out[(e, path)] = entry
        else:
            log.debug("ignoring malformed manifest entry %s", key)
    return out


# --------------------------------------------------------------------------- local cache


class BlobCache:
    """A master's local content-addressed cache: ``<root>/<sha256>``, files written whole."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        if not is_sha256(sha):
            raise ValueError(f"not a sha256: {sha!r}")
        return self.root / sha

    def has(self, sha: str) -> bool:
        try:
            return stat_mod.S_ISREG(os.stat(self.path(sha)).st_mode)
        except (OSError, ValueError):
            return False

    def size(self, sha: str) -> int | None:
        try:
            return os.stat(self.path(sha)).st_size
        except (OSError, ValueError):
            return None

    def read(self, sha: str, offset: int = 0, size: int = -1) -> bytes | None:
        """``size`` bytes (all with -1) at ``offset`` of blob ``sha``, None if it is absent."""
        try:
            fd = os.open(self.path(sha), os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError):
            return None
        try:
            if size < 0:
                size = max(0, os.fstat(fd).st_size - offset)
            return os.pread(fd, size, offset) if size else b""
        except OSError:
            return None
        finally:
            os.close(fd)

    def prune(self, keep: set[str], older_than: float, now: float | None = None) -> list[str]:
        """Delete blobs not in ``keep`` and temp files, when last changed over ``older_than`` s ago.

        The grace period covers a blob pushed here moments before its manifest entry lands, and
        a minion still reading the previous version of a replaced file. Returns the names removed.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return removed
        for name in names:
            if not (name.startswith(".tmp-") or (is_sha256(name) and name not in keep)):
                continue
            path = self.root / name
            try:
                st = os.lstat(path)
                if not stat_mod.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                    continue
                os.unlink(path)
            except OSError:
                continue
            removed.append(name)
        return removed

    def writer(self) -> BlobWriter:
        """A temp file in the cache; :meth:`BlobWriter.commit` checks the hash and renames it."""
        self.root.mkdir(parents=True, exist_ok=True)
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def put_file(self, src: str | Path) -> tuple[str, int, int]:
        """Copy the regular file ``src`` into the cache: ``(sha256, size, mode)``."""
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            return self.put_fd(fd)
        finally:
            os.close(fd)

    def put_fd(self, fd: int) -> tuple[str, int, int]:
        """Copy the open regular file ``fd`` (read with ``pread``; not closed) into the cache."""
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        with self.writer() as w:
            offset = 0
            while block := os.pread(fd, _COPY_BLOCK, offset):
                w.write(block)
                offset += len(block)
            return w.commit(), w.size, st.st_mode & 0o7777


class BlobWriter:
    """Streams content into a cache temp file; ``commit(expected)`` verifies and publishes it."""

    def __init__(self, cache: BlobCache):
        self.cache = cache
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", dir=cache.root)
        self.fh = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.hash.update(data)
        self.size += len(data)

    def commit(self, expected: str | None = None) -> str:
        """Publish the blob under its sha256; raise :class:`ValueError` if not ``expected``."""
        sha = self.hash.hexdigest()
        if expected is not None and sha != expected:
            raise ValueError(f"content hash mismatch: expected {expected}, got {sha}")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, 0o600)
        os.replace(self.tmp, self.cache.path(sha))
        self.done = True
        return sha

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.fh.close()
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------- publishing


def publish(store: Store, cache: BlobCache, src_dir: str | Path, saltenv: str = "base") -> dict:
    """Make ``saltenv``'s manifest mirror the directory ``src_dir`` on this master.

    Every file goes into the local cache; files of at most :data:`INLINE_MAX` bytes also go to
    ``file_blobs/<sha256>`` in the store. Blobs are written before the manifest entries that
    name them; entries of files no longer in ``src_dir`` are deleted, then inline blobs no entry
    names any more. Returns a summary (counts and changed paths).
    """
    if not isinstance(saltenv, str) or not valid_env(saltenv):
        raise ValueError(f"invalid saltenv {saltenv!r}")
    src = Path(src_dir).expanduser()
    if not src.is_dir():
        raise ValueError(f"{src} is not a directory on this master")
    old = {path: e for (_env, path), e in load_manifest(store, saltenv).items()}
    new: dict[str, Entry] = {}
    # Every file is opened component by component beneath src_dir and copied from that
    # descriptor: a symlink swapped in meanwhile can never make the push read outside it.
    for rel, fd, _st in beneath.walk_files(src, lambda name: skip_entry(name, False)):
        try:
            sha, size, mode = cache.put_fd(fd)
        except OSError as exc:
            log.warning("fileroots push: skipping %s/%s: %s", src, rel, exc)
            continue
        new[rel] = Entry(sha, size, mode, size <= INLINE_MAX)
    have_inline = {k[len(BLOBS_PREFIX):] for k in store.list(BLOBS_PREFIX.rstrip("/"))}
    blobs = []
    for e in {e.sha256: e for e in new.values() if e.inline}.values():
        if e.sha256 not in have_inline:
            data = cache.read(e.sha256)
            if data is None or hashlib.sha256(data).hexdigest() != e.sha256:
                raise StoreError(f"blob {e.sha256} vanished from the local cache")
            blobs.append((blob_key(e.sha256), data))
    store.put_many(blobs)
    changed = sorted(p for p, e in new.items() if old.get(p) != e)
    store.put_many([(manifest_key(saltenv, p), new[p].to_json()) for p in changed])
    removed = sorted(set(old) - set(new))
    for p in removed:
        store.delete(manifest_key(saltenv, p))
    # inline blobs this push stopped naming, unless another entry (any env) still names them
    dropped = {old[p].sha256 for p in old if old[p].inline and (p not in new or new[p] != old[p])}
    if dropped:
        dropped -= {e.sha256 for e in load_manifest(store).values() if e.inline}
        for sha in sorted(dropped):
            store.delete(blob_key(sha))
    return {
        "saltenv": saltenv,
        "files": len(new),
        "inline": sum(1 for e in new.values() if e.inline),
        "bytes": sum(e.size for e in new.values()),
        "added": sorted(p for p in changed if p not in old),
        "updated": sorted(p for p in changed if p in old),
        "removed": removed,
    }
