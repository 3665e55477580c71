"""A running minion keeps one OpenSSL: the system libssl/libcrypto are never mapped.

``hamaster.cli.lean`` hides ``ssl`` and ``_hashlib`` while the minion's entry point imports
asyncio, hashlib and hmac (~5 MiB of RSS per minion, see ``bench/README.md``). The saving holds
only while nothing the minion does later loads them: checked here on a real minion, connected,
after it fetched and hashed a file (the hashing goes through cryptography's own OpenSSL).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.integration.harness import Cluster


def system_openssl_mappings(pid: int) -> list[str]:
    """The system libssl/libcrypto files mapped into ``pid`` (cryptography's copy is inside its
    own extension module and does not count)."""
    with open(f"/proc/{pid}/maps") as fh:
        paths = {line.split()[-1] for line in fh if len(line.split()) >= 6}
    return sorted(p for p in paths if os.path.basename(p).startswith(("libssl.so", "libcrypto.so")))


def test_minion_never_maps_the_system_openssl(cluster: Cluster) -> None:
    roots = cluster.base / "srv"
    roots.mkdir()
    content = os.urandom(3 * 1024 * 1024 + 17)  # several chunks of the file server
    (roots / "blob.bin").write_bytes(content)
    cluster.add_master({"auto_accept": True, "file_roots": {"base": [str(roots)]}})
    minion = cluster.add_minion("lean1")
    cluster.wait_all_answer(["lean1"])
    assert system_openssl_mappings(minion.pid) == []

    dest = cluster.base / "got.bin"
    res = cluster.run("hamaster", "-t", "60", "--out", "json", "--static", "lean1",
                      "cp.get_file", "salt://blob.bin", str(dest), check=True)
    assert json.loads(res.stdout) == {"lean1": str(dest)}
    assert Path(dest).read_bytes() == content
    res = cluster.run("hamaster", "-t", "60", "--out", "json", "--static", "lean1",
                      "cp.hash_file", "salt://blob.bin", check=True)
    assert json.loads(res.stdout)["lean1"]["hsum"] == hashlib.sha256(content).hexdigest()
    assert system_openssl_mappings(minion.pid) == []
    # the check itself sees a process that has them: this test process imported ssl
    import ssl  # noqa: F401

    assert system_openssl_mappings(os.getpid())
