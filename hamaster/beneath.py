"""Opening files beneath a root directory, component by component, so nothing can lead outside it.

Checking a path with ``realpath`` and then opening it is a race: between the two, whoever can
write one directory under the root can rename it away and put a symlink to ``/`` (or to the
master's ``pki`` directory) in its place. Here no path string is ever handed to the kernel
whole. The root is opened once per request (``O_DIRECTORY``; the configured root path itself is
trusted and may be a symlink, e.g. a deploy's ``current -> releases/42``), then every component
is opened relative to its parent's descriptor with ``O_NOFOLLOW`` (``openat``), so a component
that is, or becomes, a symlink is never followed by the kernel.

Symlinks *inside* a root are still followed, as Salt does (``fileserver_followsymlinks``), but
resolved here: the link is read with ``readlinkat`` and its target walked the same way from the
directory that holds it (relative target) or from the root (an absolute target that names the
root's path). ``..`` pops back to the parent descriptor already held — never a fresh lookup —
and popping past the root means the path leaves it: refused. At most :data:`MAX_HOPS` links are
followed per path. The final component must be a regular file (checked with ``fstat`` on the
descriptor that is read). A swap in the middle of a walk can only make the request fail or
serve a file that was inside the root at some moment — never anything outside it.

The functions never raise on missing or hostile paths: they return None (:func:`open_file`
raises :class:`EscapesRoot` so that the caller can log the attempt).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: At most this many symlinks are followed while resolving one path (Linux's own limit is 40).
MAX_HOPS = 40
#: At most this many components are walked while resolving one path (links expand paths).
MAX_STEPS = 4096
#: Directory walks stop this deep (symlinked directories can nest deeply).
MAX_DEPTH = 64
#: A directory walk visits at most this many entries (symlinked directories can fan out).
MAX_ENTRIES = 200_000

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
#: errnos of an ``openat(O_NOFOLLOW)`` that met a symlink (ELOOP; ENOTDIR with O_DIRECTORY on
#: some systems; EMLINK on FreeBSD).
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


class EscapesRoot(Exception):
    """The path leads outside its root (``..`` above it, a link elsewhere, a link loop)."""


@dataclass
class Root:
    """An open root directory: its descriptor and the absolute spellings of its path.

    ``names`` are the root's path as configured and as resolved when it was opened; an absolute
    symlink target is accepted only if it starts with one of them (the rest is then walked from
    the root descriptor, so the spelling is only a hint, never followed by the kernel).
    """

    fd: int
    names: tuple[str, ...]

    def close(self) -> None:
        """Release the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_root(base: str | Path, prefix: Sequence[str] = ()) -> Root | None:
    """Open directory ``base`` (following symlinks: it is the operator's) then ``prefix``.

    The ``prefix`` components (e.g. ``file_roots``, ``base`` under a store's root) are opened
    strictly: each must be a real directory, a symlink there is refused (None). None also when
    anything is missing or not a directory.
    """
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except (OSError, ValueError):
        return None
    for name in prefix:
        if not name or name in (".", ".."):
            continue
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except (OSError, ValueError):
            os.close(fd)
            return None
        os.close(fd)
        fd = sub
    names = {os.path.abspath(os.path.join(base, *prefix))}
    try:
        names.add(os.path.join(os.path.realpath(base), *prefix))
    except (OSError, ValueError):
        pass
    return Root(fd, tuple(sorted(n.rstrip("/") or "/" for n in names)))


@dataclass
class _Stack:
    """Directories from the root down (physical path): descriptors, and which ones we opened."""

    fds: list[int]
    owned: set[int] = field(default_factory=set)

    def push(self, fd: int) -> None:
        self.fds.append(fd)
        self.owned.add(fd)

    def pop(self) -> bool:
        """Go to the parent; False if that would leave the root."""
        if len(self.fds) <= 1:
            return False
        fd = self.fds.pop()
        if fd in self.owned:
            self.owned.discard(fd)
            os.close(fd)
        return True

    def to_root(self) -> None:
        while len(self.fds) > 1:
            self.pop()

    def close(self) -> None:
        """Close every descriptor this stack opened (the borrowed prefix stays open)."""
        for fd in self.owned:
            os.close(fd)
        self.owned.clear()
        del self.fds[:]


def _absolute_rest(target: str, names: tuple[str, ...]) -> list[str] | None:
    """Components of absolute ``target`` below the root (``[]`` for the root), None if outside."""
    norm = "/" + target.lstrip("/")
    for name in names:
        if name == "/":
            return norm.split("/")
        if norm == name:
            return []
        if norm.startswith(name + "/"):
            return norm[len(name) + 1:].split("/")
    return None


def _open_component(dir_fd: int, name: str, want_dir: bool) -> tuple[int | None, str | None]:
    """``(fd, None)`` for an opened entry, ``(None, target)`` for a symlink, ``(None, None)``."""
    try:
        return os.open(name, _DIR_FLAGS if want_dir else _FILE_FLAGS, dir_fd=dir_fd), None
    except OSError as exc:
        if exc.errno not in _LINK_ERRNOS:
            return None, None
    except ValueError:  # embedded NUL
        return None, None
    try:
        return None, os.readlink(name, dir_fd=dir_fd)
    except (OSError, ValueError):  # not a symlink (ENOTDIR for a file), or swapped meanwhile
        return None, None


def _resolve(stack: _Stack, names: tuple[str, ...], segments: Sequence[str]) -> int | None:
    """Walk ``segments`` from ``stack``'s top; a new fd of the final entry (any type), or None.

    The directories walked through are left on ``stack`` (the final entry's parent on top).
    The caller closes the returned descriptor and the stack.
    """
    todo = list(reversed(segments))
    hops = steps = 0
    while todo:
        name = todo.pop()
        steps += 1
        if steps > MAX_STEPS:
            raise EscapesRoot(f"more than {MAX_STEPS} path components")
        if name in ("", ".") or name == "..":
            if name == ".." and not stack.pop():
                raise EscapesRoot("'..' above the root")
            if not todo:  # the path ends at a directory already held ("x/..", a link to ".")
                return os.dup(stack.fds[-1])
            continue
        last = not todo
        fd, target = _open_component(stack.fds[-1], name, want_dir=not last)
        if fd is not None:
            if last:
                return fd
            stack.push(fd)
            continue
        if not target:
            return None
        hops += 1
        if hops > MAX_HOPS:
            raise EscapesRoot(f"more than {MAX_HOPS} symlinks")
        if target.startswith("/"):
            rest = _absolute_rest(target, names)
            if rest is None:
                raise EscapesRoot(f"a symlink to {target!r}")
            stack.to_root()
            parts = rest or ["."]
        else:
            parts = target.split("/")
        todo.extend(reversed(parts))
    return None


def open_file(root: Root, segments: Sequence[str]) -> tuple[int, os.stat_result] | None:
    """``(fd, fstat)`` of the regular file at ``segments`` beneath ``root``, or None.

    The caller closes the descriptor. Symlinks are followed only while they stay beneath the root
    (see the module docstring); anything but a regular file is None; a path that leads outside
    the root raises :class:`EscapesRoot`.
    """
    stack = _Stack([root.fd])
    try:
        fd = _resolve(stack, root.names, segments)
    except OSError:
        return None
    finally:
        stack.close()
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def clean_segment(name: str) -> bool:
    """True for a path component that names an entry: neither empty nor ``.`` nor ``..``, and
    free of NUL bytes and backslashes."""
    return bool(name) and name not in (".", "..") and "\0" not in name and "\\" not in name


def read_at(fd: int, offset: int = 0, size: int = -1) -> bytes | None:
    """``size`` bytes (all with -1) at ``offset`` of the open file ``fd``; None on error."""
    try:
        if size < 0:
            size = max(0, os.fstat(fd).st_size - offset)
        return os.pread(fd, size, offset) if size else b""
    except OSError:
        return None


def read_file(base: str | Path, segments: Sequence[str], prefix: Sequence[str] = (),
              offset: int = 0, size: int = -1) -> bytes | None:
    """Read a regular file beneath ``base``/``prefix`` (see :func:`open_file`), None if refused."""
    root = open_root(base, prefix)
    if root is None:
        return None
    with root:
        try:
            opened = open_file(root, segments)
        except EscapesRoot:
            return None
    if opened is None:
        return None
    fd, _st = opened
    try:
        return read_at(fd, offset, size)
    finally:
        os.close(fd)


def walk_files(base: str | Path, skip: Callable[[str], bool] | None = None,
               prefix: Sequence[str] = ()) -> Iterator[tuple[str, int, os.stat_result]]:
    """``(relative path, fd, fstat)`` of every regular file beneath ``base``/``prefix``.

    Sorted by name per directory; in-root symlinks are followed (loops and escapes skipped).

    ``skip(name)`` → True leaves an entry out. Each ``fd`` is open only until the iterator
    resumes (the caller must not keep it); callers that want just the names close nothing.
    """
    root = open_root(base, prefix)
    if root is None:
        return
    with root:
        try:
            st = os.fstat(root.fd)
        except OSError:
            return
        budget = [MAX_ENTRIES]
        yield from _walk(_Stack([root.fd]), root.names, "", {(st.st_dev, st.st_ino)}, 0, skip,
                         budget)
        if budget[0] < 0:
            log.warning("listing %s stopped after %d entries (symlinked directories fanning "
                        "out?)", base, MAX_ENTRIES)


def _walk(stack: _Stack, names: tuple[str, ...], rel: str, ancestors: set[tuple[int, int]],
          depth: int, skip: Callable[[str], bool] | None,
          budget: list[int]) -> Iterator[tuple[str, int, os.stat_result]]:
    if depth > MAX_DEPTH:
        return
    try:
        listing = sorted(os.listdir(stack.fds[-1]))
    except OSError:
        return
    for name in listing:
        if skip is not None and skip(name):
            continue
        budget[0] -= 1
        if budget[0] < 0:
            return
        key = f"{rel}/{name}" if rel else name
        sub = _Stack(list(stack.fds))
        try:
            try:
                fd = _resolve(sub, names, [name])
            except EscapesRoot:
                continue
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                continue
            if stat_mod.S_ISREG(st.st_mode):
                try:
                    yield key, fd, st
                finally:
                    os.close(fd)
                continue
            ident = (st.st_dev, st.st_ino)
            if not stat_mod.S_ISDIR(st.st_mode) or ident in ancestors:
                os.close(fd)
                continue
            sub.push(fd)
            yield from _walk(sub, names, key, ancestors | {ident}, depth + 1, skip, budget)
        finally:
            sub.close()
