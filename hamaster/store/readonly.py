"""An operator's local directory (``file_roots``, ``pillar_roots``) seen as a read-only store.

Every path is opened component by component beneath the directory (:mod:`hamaster.beneath`),
so a concurrent rename or symlink swap cannot make a read leave it.
"""

from __future__ import annotations

import builtins
from pathlib import Path

from hamaster import beneath
from hamaster.store.base import (
    Change,
    Store,
    StoreError,
    WatchCallback,
    validate_key,
    validate_prefix,
)
from hamaster.store.fs import internal_name


def _skip(name: str) -> bool:
    """Entries a listing leaves out: an fs store's marker and temp files, unclean names."""
    return internal_name(name) or not beneath.clean_segment(name)


class ReadOnlyDirStore(Store):
    """An operator's ``file_roots`` directory seen as a read-only :class:`Store`.

    Unlike :class:`FsStore` it never creates, chmods or writes anything (no marker file) and a
    missing directory is simply empty. Keys are relative paths of regular files (symlinks whose
    target stays inside the directory included; dotfiles included). Writes raise
    :class:`StoreError`; watches are accepted but never fire.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, key: str) -> bytes | None:
        """Content of the file at ``key`` (None if absent or outside the directory)."""
        validate_key(key)
        return beneath.read_file(self.root, key.split("/"))

    def put(self, key: str, value: bytes) -> None:
        raise StoreError(f"{self.root} is a read-only file_roots directory")

    def delete(self, key: str) -> bool:
        raise StoreError(f"{self.root} is a read-only file_roots directory")

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes | None) -> bool:
        raise StoreError(f"{self.root} is a read-only file_roots directory")

    def list(self, prefix: str) -> builtins.list[str]:
        """Relative paths of the files under ``prefix``, sorted."""
        prefix = validate_prefix(prefix)
        keys = [rel for rel, _fd, _st in beneath.walk_files(self.root, _skip)]
        if prefix:
            keys = [k for k in keys if k == prefix or k.startswith(prefix + "/")]
        return sorted(keys)

    def watch(self, prefix: str, callback: WatchCallback) -> None:
        """Accepted and ignored: operator directories are re-read on every request."""

    def start(self) -> None:
        """Nothing to start."""

    def poll_now(self) -> builtins.list[Change]:
        return []

    def heartbeat(self, member_id: str, info: bytes, ttl: float) -> None:
        raise StoreError(f"{self.root} is a read-only file_roots directory")

    def members(self) -> dict[str, bytes]:
        return {}

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""
