"""Checks that a daemon's local directories (``sock_dir``, ``pki_dir``, ``cachedir``) are private.

Whoever can write one of these directories, or a directory above it, can swap the CLI socket
(and receive root's commands), plant keys or poison caches. So at start the master and the
minion look at each with ``lstat``: a missing directory is created 0700; an existing one must
be owned by the running user (or root), not writable by group or others, and reached through
directories that no one else can rename (owned by the user or root, not group/other-writable
unless sticky, as ``/tmp`` is). A symlink is followed only if the link itself is owned by the
user or root, and its target is checked the same way. Anything else refuses the start with one
message naming the path and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeDirectory(Exception):
    """A local directory another user could write; the message names the path and the fix."""


def _owner_ok(st: os.stat_result, uid: int) -> bool:
    return st.st_uid in (uid, 0)


def _who(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _check_ancestors(path: Path, option: str, uid: int) -> None:
    """Every directory above ``path`` (resolved) must be safe from renames by other users."""
    real = Path(os.path.realpath(path.parent))
    for anc in (real, *real.parents):
        try:
            st = os.lstat(anc)
        except OSError as exc:
            raise UnsafeDirectory(f"{option} {path}: cannot check {anc}: {exc.strerror}") from None
        writable = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if not _owner_ok(st, uid) or writable:
            why = (f"is owned by {_who(st.st_uid)}" if not _owner_ok(st, uid)
                   else "is writable by group or others and not sticky")
            raise UnsafeDirectory(
                f"{option} {path} is unsafe: the directory {anc} above it {why}, so another "
                f"user could replace {path}. Fix: put {option} under a directory owned by "
                f"{_who(uid)} or root (or `chmod go-w {anc}`)")


def _make_parents(path: Path) -> None:
    """Create the missing directories of ``path`` 0755 whatever the umask (as ``mkdir -p``)."""
    missing: list[Path] = []
    for anc in (path, *path.parents):
        if os.path.lexists(anc):
            break
        missing.append(anc)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        os.chmod(d, 0o755)


def ensure_private_dir(path: str | os.PathLike[str], option: str, *, create: bool = True,
                       only_me: bool = False) -> Path:
    """Create ``path`` 0700 if missing (with ``create``), else check it is private.

    See the module doc for the checks. With ``only_me`` the directory must belong to the running
    user (root's does not do) and is made 0700 if it is looser (a ``hamaster-cluster``
    directory: nothing in it is for anyone else). ``option`` names the directory in the message.
    Raises :class:`UnsafeDirectory`.
    """
    p = Path(path)
    uid = os.geteuid()
    me = _who(uid)
    if not os.path.lexists(p):
        if not create:
            raise UnsafeDirectory(f"{option} {p} does not exist")
        _make_parents(p.parent)
    _check_ancestors(p, option, uid)
    try:
        lst = os.lstat(p)
    except FileNotFoundError:
        try:
            os.mkdir(p, 0o700)
            os.chmod(p, 0o700)
        except FileExistsError:
            pass
        lst = os.lstat(p)
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        if not _owner_ok(lst, uid):
            raise UnsafeDirectory(
                f"{option} {p} is a symlink owned by {_who(lst.st_uid)}, not by {me} or root. "
                f"Fix: remove it (`rm {p}`) and let hamaster create the directory, or point "
                f"{option} at a directory of {me}")
        try:
            st = os.stat(p)
        except OSError as exc:
            raise UnsafeDirectory(f"{option} {p} is a dangling symlink ({exc.strerror}). Fix: "
                                  f"remove it (`rm {p}`) or create its target") from None
        _check_ancestors(Path(os.path.realpath(p)), option, uid)  # where it leads, too
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{option} {p} is not a directory. Fix: remove it or set {option} "
                              "to a directory")
    if only_me and st.st_uid != uid:
        raise UnsafeDirectory(
            f"{option} {p} is owned by {_who(st.st_uid)}, not by {me} (who runs this): another "
            f"user could have planted files in it. Fix: choose a directory of your own "
            f"(--dir ~/hamaster-demo) or remove {p}")
    if only_me and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
        st = os.stat(p)
    if not _owner_ok(st, uid):
        raise UnsafeDirectory(
            f"{option} {p} is owned by {_who(st.st_uid)}, not by {me} (who runs this) or root, "
            f"so that user controls what is in it. Fix: `chown {me} {p}` if it is yours, or "
            f"remove it and let hamaster create it")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{option} {p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}). "
            f"Fix: `chmod go-w {p}` (hamaster creates it 0700)")
    return p


def check_daemon_dirs(opts: dict, options: tuple[str, ...]) -> None:
    """:func:`ensure_private_dir` for each option of ``options`` set in ``opts``."""
    for option in options:
        value = opts.get(option)
        if isinstance(value, str) and value:
            ensure_private_dir(value, option)
