"""The ``cp`` execution module: copy files from the master's file server (Salt's ``cp.*``).

Files are fetched through ``ctx.fetch_file(path, saltenv)``, supplied by the minion daemon.
``salt://path?saltenv=dev`` selects an environment the way Salt does.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any
from urllib.parse import parse_qs

from hamaster import crypto
from hamaster.minion.modules.context import CommandExecutionError, ExecContext

log = logging.getLogger(__name__)


def _split_saltenv(path: str, saltenv: str) -> tuple[str, str]:
    """Strip a ``?saltenv=ENV`` query from ``path``; the query wins over the argument."""
    base, sep, query = str(path).partition("?")
    if sep:
        envs = parse_qs(query).get("saltenv")
        if envs:
            saltenv = envs[0]
    return base, saltenv


def _fetch(ctx: ExecContext, path: str, saltenv: str) -> bytes | None:
    if ctx.fetch_file is None:
        raise CommandExecutionError("no file client (master) available")
    source, env = _split_saltenv(path, saltenv)
    return ctx.fetch_file(source, env)


def _write_atomic(dest: str, data: bytes) -> None:
    directory = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(prefix=".hamaster-cp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def get_file(ctx: ExecContext, path: str, dest: str, saltenv: str = "base",
             makedirs: bool = False, template: str | None = None, gzip: Any = None,
             **kwargs: Any) -> str:
    """Copy ``path`` (``salt://...``) from the master to ``dest`` on the minion.

    If ``dest`` is an existing directory (or ends with ``/``) the file keeps its name inside it.
    Returns the destination path, or an empty string when the master has no such file or the
    destination directory is missing and ``makedirs`` is false.

    CLI Example: ``hamaster '*' cp.get_file salt://path/to/file /minion/dest``
    """
    if template:
        raise CommandExecutionError("cp.get_file: templates are not supported yet")
    source, _env = _split_saltenv(path, saltenv)
    dest = os.path.expanduser(str(dest))
    if dest.endswith(os.sep) or os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(source.rstrip("/")))
    parent = os.path.dirname(dest) or "."
    if not os.path.isdir(parent):
        if not makedirs:
            log.warning("cp.get_file: directory %s does not exist (use makedirs=True)", parent)
            return ""
        os.makedirs(parent, exist_ok=True)
    data = _fetch(ctx, path, saltenv)
    if data is None:
        log.info("cp.get_file: %s not found on the master", path)
        return ""
    _write_atomic(dest, data)
    return dest


def get_file_str(ctx: ExecContext, path: str, saltenv: str = "base") -> str | bool:
    """Return the content of ``path`` (``salt://...``) as text, or False if it does not exist.

    CLI Example: ``hamaster '*' cp.get_file_str salt://my/file``
    """
    data = _fetch(ctx, path, saltenv)
    if data is None:
        return False
    return data.decode("utf-8", errors="replace")


def hash_file(ctx: ExecContext, path: str, saltenv: str = "base") -> dict[str, str]:
    """Return ``{"hsum": <sha256>, "hash_type": "sha256"}`` of a master file, or {} if missing.

    CLI Example: ``hamaster '*' cp.hash_file salt://path/to/file``
    """
    data = _fetch(ctx, path, saltenv)
    if data is None:
        return {}
    return {"hsum": crypto.hexdigest("sha256", data), "hash_type": "sha256"}
