"""Where sls files and ``salt://`` sources come from during one state run.

:class:`RemoteSource` asks the masters' file server (the minion's file client,
``ExecContext.fetch_file``); :class:`LocalSource` reads the minion's own ``file_roots``
(masterless, ``hamaster-call --local``) beneath each root, never following a symlink out of it.
Both cache what they read for the length of one run, so a ``map.jinja`` imported by 30 sls files
is fetched once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)


def clean_rel(path: str) -> str | None:
    """``salt://a/./b`` → ``a/b``; None for a path that leaves the root (``..``) or is absolute
    once the scheme is stripped with a leading ``/`` kept out."""
    if not isinstance(path, str) or "\0" in path:
        return None
    rel = path[len("salt://"):] if path.startswith("salt://") else path
    rel = rel.split("?", 1)[0]
    parts: list[str] = []
    for seg in rel.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            return None
        parts.append(seg)
    return "/".join(parts) or None


class Source:
    """Reads files of a saltenv; subclasses implement :meth:`_read`."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], bytes | None] = {}
        self._lock = threading.Lock()

    def read(self, path: str, saltenv: str = "base") -> bytes | None:
        """Content of ``path`` (``salt://x`` or ``x``) in ``saltenv``, or None if missing."""
        rel = clean_rel(path)
        if rel is None:
            return None
        key = (saltenv, rel)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        data = self._read(rel, saltenv)
        with self._lock:
            self._cache[key] = data
        return data

    def _read(self, rel: str, saltenv: str) -> bytes | None:
        raise NotImplementedError

    def envs(self) -> list[str]:
        """The saltenvs this source knows (for a highstate's top files)."""
        return ["base"]

    def list_files(self, prefix: str, saltenv: str = "base") -> list[str]:
        """Relative paths of the files under directory ``prefix`` (``salt://dir``), sorted."""
        return []


class RemoteSource(Source):
    """Files from the masters' file server (``fetch(url, saltenv)``, the minion's file client;
    ``request(load)`` for ``_file_list``)."""

    def __init__(self, fetch: Callable[[str, str], bytes | None],
                 request: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__()
        self._fetch = fetch
        self._request = request

    def _read(self, rel: str, saltenv: str) -> bytes | None:
        return self._fetch(f"salt://{rel}", saltenv)

    def list_files(self, prefix: str, saltenv: str = "base") -> list[str]:
        rel = clean_rel(prefix)
        if rel is None or self._request is None:
            return []
        found = self._request({"cmd": "_file_list", "saltenv": saltenv, "prefix": rel})
        if not isinstance(found, list):
            return []
        return sorted(str(f) for f in found if str(f).startswith(rel + "/"))


class LocalSource(Source):
    """Files from local ``file_roots`` (``{saltenv: [dir, ...]}``), first root that has it."""

    def __init__(self, file_roots: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self._roots = {str(k): [str(d) for d in (v or [])] for k, v in dict(file_roots).items()}

    def _read(self, rel: str, saltenv: str) -> bytes | None:
        from hamaster.beneath import read_file

        segments = rel.split("/")
        for base in self._roots.get(saltenv, []):
            try:
                data = read_file(base, segments)
            except OSError as exc:
                log.debug("reading %s under %s: %s", rel, base, exc)
                data = None
            if data is not None:
                return data
        return None

    def envs(self) -> list[str]:
        return list(self._roots) or ["base"]

    def list_files(self, prefix: str, saltenv: str = "base") -> list[str]:
        from hamaster.beneath import walk_files

        rel = clean_rel(prefix)
        if rel is None:
            return []
        out: set[str] = set()
        for base in self._roots.get(saltenv, []):
            for path, _fd, _st in walk_files(base, prefix=rel.split("/")):
                out.add(f"{rel}/{path}")
        return sorted(out)


def source_for(opts: Mapping[str, Any], fetch: Callable[[str, str], bytes | None] | None,
               local: bool, request: Callable[[dict[str, Any]], Any] | None = None) -> Source:
    """The source a run uses: local ``file_roots`` when ``local`` (or no file client)."""
    if local or fetch is None:
        return LocalSource(opts.get("file_roots") or {"base": ["/srv/salt"]})
    return RemoteSource(fetch, request)
