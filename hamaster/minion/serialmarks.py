"""The highest publication serial a minion has acted on, per publish key, kept in ``cachedir``.

Used for masters that do not put their publish key's serial in the auth reply (a stock
salt-master): after a restart the minion starts from the saved mark instead of from zero, so a
publication captured before the restart is refused. The file holds sha256 digests of publish
keys (never the keys) and serials; written atomically (temp file, rename), mode 0600.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

FILE_NAME = "publication_serials.json"
KEEP_KEYS = 32
_OPEN: dict[str, SerialMarks] = {}


def _digest(key_string: str) -> str:
    return hashlib.sha256(key_string.encode()).hexdigest()[:32]


class SerialMarks:
    """Saved marks of one ``cachedir`` (one instance per directory and process)."""

    def __init__(self, cachedir: str) -> None:
        self.path = os.path.join(cachedir, FILE_NAME)
        self._marks: dict[str, int] = {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            if isinstance(data, dict):
                self._marks = {k: v for k, v in data.items()
                               if isinstance(k, str) and isinstance(v, int)
                               and not isinstance(v, bool)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)

    @classmethod
    def for_dir(cls, cachedir: str) -> SerialMarks:
        """The process-wide instance for ``cachedir`` (the identities of a swarm share it)."""
        inst = _OPEN.get(cachedir)
        if inst is None:
            inst = _OPEN[cachedir] = cls(cachedir)
        return inst

    def get(self, key_string: str) -> int | None:
        """The saved mark for this publish key, if any."""
        return self._marks.get(_digest(key_string))

    def record(self, key_string: str, serial: int) -> None:
        """Save ``serial`` for this key if it is above the mark (before the job runs)."""
        digest = _digest(key_string)
        if serial <= self._marks.get(digest, 0):
            return
        self._marks.pop(digest, None)
        self._marks[digest] = serial
        while len(self._marks) > KEEP_KEYS:
            self._marks.pop(next(iter(self._marks)))
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".serials-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(self._marks, fh)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot save the publication serial mark in %s: %s", self.path, exc)
