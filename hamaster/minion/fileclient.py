"""Fetch ``salt://`` files from a master with Salt's file-server commands.

``_file_hash`` first (empty when the master has no such file), then ``_serve_file`` chunk by
chunk, then the content is checked against the hash. Masters are tried in order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hamaster import crypto
from hamaster.bus import codec

if TYPE_CHECKING:
    from hamaster.minion.connection import MasterConnection

log = logging.getLogger(__name__)


def split_salt_url(url: str) -> str:
    """``salt://a/b`` → ``a/b`` (``?saltenv=`` suffixes are dropped)."""
    rel = url[len("salt://") :] if url.startswith("salt://") else url
    return rel.split("?", 1)[0].lstrip("/")


async def fetch_file(conns: list[MasterConnection],
                     url: str, saltenv: str = "base") -> bytes | None:
    """Content of ``url`` from the first master that has it, or None."""
    from hamaster.minion.connection import RequestFailed

    rel = split_salt_url(url)
    for conn in conns:
        try:
            info = await conn.request({"cmd": "_file_hash", "path": rel, "saltenv": saltenv})
            if not isinstance(info, dict) or not info.get("hsum"):
                continue
            chunks: list[bytes] = []
            loc = 0
            while True:
                rep = await conn.request({"cmd": "_serve_file", "path": rel,
                                          "loc": loc, "saltenv": saltenv})
                data = rep.get("data") if isinstance(rep, dict) else None
                if not data:
                    break
                chunk = codec.to_bytes(data)
                chunks.append(chunk)
                loc += len(chunk)
            content = b"".join(chunks)
            algo = str(info.get("hash_type", "sha256"))
            if crypto.hexdigest(algo, content) != info["hsum"]:
                log.warning(
                    "hash mismatch fetching %s from %s; trying another master", url, conn.name)
                continue
            return content
        except (RequestFailed, ValueError) as exc:
            log.warning("fetching %s from %s failed: %s", url, conn.name, exc)
    return None
