"""The file server against a concurrent symlink swap: the master's private key never leaves.

Whoever can write one directory under a file root (a deploy pipeline, a developer group) swaps
``base/dev/d`` between a real directory (holding a decoy ``master.pem``) and a symlink to the
master's ``pki/master`` directory while an accepted minion asks for ``dev/d/master.pem`` over
and over. A check-then-open file server (``realpath``, check, ``open(O_NOFOLLOW)``) hands out
the real key within a few hundred requests; the component-by-component open never does.
"""

from __future__ import annotations

import hashlib
import os
import time

from tests.flipper import flipping
from tests.integration.harness import Cluster
from tests.integration.spy import SpyMinion
from tests.kit import wait_until

DECOY = b"decoy: not a key\n"
#: Requests are sent until this many, or until the deadline (bounded test time).
MAX_REQUESTS = 1500
DEADLINE = 25.0


def test_symlink_swap_never_serves_the_master_key(cluster: Cluster) -> None:
    shared = cluster.base / "shared"
    shared.mkdir()
    info = cluster.add_master({"ha_dir": str(shared), "auto_accept": True,
                               "file_roots": {"base": []}})
    pki = shared / "pki" / "master"
    key = wait_until(lambda: (pki / "master.pem").is_file() and (pki / "master.pem").read_bytes(),
                     20, what="master.pem in ha_dir")
    assert b"PRIVATE KEY" in key
    dev = shared / "file_roots" / "base" / "dev"
    (dev / "d.real").mkdir(parents=True)
    (dev / "d.real" / "master.pem").write_bytes(DECOY)

    spy = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "racer")
    try:
        wait_until(lambda: spy.auth().status == "accepted", 20, interval=0.2, what="spy accepted")
        load = {"cmd": "_serve_file", "path": "dev/d/master.pem", "loc": 0, "saltenv": "base"}
        # Sanity: with d a real directory the decoy is served (the request path works).
        os.rename(dev / "d.real", dev / "d")
        assert _data(spy.request(load)) == DECOY
        os.rename(dev / "d", dev / "d.real")

        with flipping(dev, pki):
            outcomes, sent = _hammer(spy, load, key)
    finally:
        spy.close()
    print(f"race: {sent} requests, outcomes {outcomes}")
    assert outcomes["key"] == 0, f"the master's private key was served after {sent} requests"
    assert outcomes["key hash"] == 0, f"the key's hash was served after {sent} requests"
    # The swap was really racing the server: both the decoy and misses were seen.
    assert outcomes["decoy"] > 0 and outcomes["missing"] > 0, outcomes
    assert (pki / "master.pem").read_bytes() == key


def _hammer(spy: SpyMinion, load: dict, key: bytes) -> tuple[dict[str, int], int]:
    """Request ``load`` (and every 4th time its hash) until a leak, MAX_REQUESTS or DEADLINE."""
    outcomes = {"key": 0, "decoy": 0, "missing": 0, "key hash": 0}
    key_hash = hashlib.sha256(key).hexdigest()
    hash_load = {"cmd": "_file_hash", "path": "dev/d/master.pem", "saltenv": "base"}
    deadline = time.monotonic() + DEADLINE
    sent = 0
    while sent < MAX_REQUESTS and time.monotonic() < deadline:
        data = _data(spy.request(load))
        sent += 1
        if b"PRIVATE KEY" in data:
            outcomes["key"] += 1
            break  # one leak is enough to fail
        outcomes["decoy" if data == DECOY else "missing"] += 1
        if sent % 4 == 0:  # _file_hash walks the same way (a hash is an oracle)
            hashed = spy.request(hash_load)
            if isinstance(hashed, dict) and hashed.get("hsum") == key_hash:
                outcomes["key hash"] += 1
                break
    return outcomes, sent


def _data(reply: object) -> bytes:
    """The chunk of a ``_serve_file`` reply (msgpack may hand it back as str)."""
    data = reply.get("data", b"") if isinstance(reply, dict) else b""
    return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
