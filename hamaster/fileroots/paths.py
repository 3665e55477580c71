"""The file server's path rules, shared by the server (:mod:`.server`) and the manifest
publisher (:mod:`.manifest`): which saltenv names are valid, which directory entries are
served, where the master's keys are."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from hamaster import beneath
from hamaster.beneath import clean_segment
from hamaster.store.fs import internal_name

__all__ = ["clean_segment", "holds_keys", "skip_entry", "skip_name", "valid_env", "walk_dir"]


def skip_name(name: str, skip_hidden: bool) -> bool:
    """True for a name never served: any dotfile with ``skip_hidden`` (an fs store's root),
    else only an fs store's marker or temp file (an operator's directory)."""
    if skip_hidden:
        return name.startswith(".")
    return internal_name(name)


def skip_entry(name: str, skip_hidden: bool) -> bool:
    """True for a directory entry a listing leaves out (:func:`skip_name`, or not a clean
    path component)."""
    return skip_name(name, skip_hidden) or not clean_segment(name)


def walk_dir(base: Path, skip_hidden: bool, prefix: Sequence[str] = ()) -> Iterator[str]:
    """Relative paths of regular files under ``base``/``prefix`` (in-root symlinks followed,
    opened component by component: :mod:`hamaster.beneath`)."""
    for rel, _fd, _st in beneath.walk_files(base, lambda n: skip_entry(n, skip_hidden), prefix):
        yield rel


def valid_env(env: str) -> bool:
    """True for a saltenv name that can be a path component (and is not hidden)."""
    return clean_segment(env) and "/" not in env and not env.startswith(".")


def holds_keys(directory: str, opts: dict) -> str | None:
    """``pki_dir`` or ``ha_dir`` if ``directory`` is it or one of its parents, else None."""
    real = os.path.realpath(directory)
    for name in ("pki_dir", "ha_dir"):
        value = opts.get(name)
        if isinstance(value, str) and value:
            key_dir = os.path.realpath(os.path.expanduser(value))
            if key_dir == real or key_dir.startswith(real.rstrip("/") + "/"):
                return f"{name} {value}"
    return None
