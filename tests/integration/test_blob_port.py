"""The file blob port of a real master under idle and unsigned connections.

Idle connections used to take one of the 32 transfer slots each while the server waited 30 s for
their request line, so 32 of them made every peer's fetch fail for 30 s. Now a connection holds
no transfer slot until it has sent a well-signed request, one address may hold only a few
connections, an idle one is closed after a few seconds, and refusals are logged once per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamaster import crypto
from hamaster.fileroots import blobs
from hamaster.fileroots.manifest import BlobCache
from tests.integration.harness import Cluster
from tests.kit import free_port, wait_until

IDLE = 40
BLOB_HOST = "127.0.0.3"  # file_blob_interface; the master's interface stays 127.0.0.1


@contextlib.contextmanager
def idle_connections(port: int, n: int, source: str) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to the blob port from ``source`` that never send anything."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(5)
            s.connect((BLOB_HOST, port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def blob_master(cluster: Cluster):
    """A clustered master serving blobs on BLOB_HOST, its private key and one cached blob."""
    shared = cluster.base / "shared"
    shared.mkdir()
    port = free_port(BLOB_HOST)
    info = cluster.add_master({"ha_dir": str(shared), "file_blob_port": port,
                               "file_blob_interface": BLOB_HOST, "cachedir": "cache",
                               "file_roots": {"base": []}})
    cache_dir = Path(info["conf"]["root_dir"]) / "cache"  # relative paths live under root_dir
    pem = shared / "pki" / "master" / "master.pem"
    wait_until(pem.is_file, 20, what="master key")
    wait_until(lambda: "file blob server on" in info["proc"].log_text(), 20, what="blob server")
    data = os.urandom(2 * 1024 * 1024)
    sha = BlobCache(cache_dir / "file_blobs").put_bytes(data)
    return info, port, crypto.load_private_key(pem.read_bytes()), sha, data


def _fetch(port: int, sha: str, priv, dest: Path) -> int:
    return asyncio.run(blobs.fetch(f"{BLOB_HOST}:{port}", sha, priv, BlobCache(dest), timeout=10))


def test_blob_port_binds_file_blob_interface(blob_master) -> None:
    info, port, _priv, _sha, _data = blob_master
    with socket.create_connection((BLOB_HOST, port), timeout=5):
        pass
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert f"file blob server on {BLOB_HOST}:{port}" in info["proc"].log_text()


def test_idle_connections_from_another_host_do_not_block_a_fetch(blob_master, tmp_path) -> None:
    _info, port, priv, sha, data = blob_master
    with idle_connections(port, IDLE, "127.0.0.2"):
        t0 = time.monotonic()
        assert _fetch(port, sha, priv, tmp_path / "got") == len(data)
        took = time.monotonic() - t0
    print(f"fetch of 2 MiB with {IDLE} idle connections open: {took * 1000:.0f} ms")
    assert hashlib.sha256((tmp_path / "got" / sha).read_bytes()).hexdigest() == sha
    assert took < 2.0, took


def test_idle_connections_from_the_same_address_expire(blob_master, tmp_path) -> None:
    """Even from the fetching master's own address, idle connections cost a few seconds at most
    (REQUEST_TIMEOUT), not IO_TIMEOUT (30 s)."""
    _info, port, priv, sha, data = blob_master
    with idle_connections(port, IDLE, "127.0.0.1"):
        t0 = time.monotonic()

        def fetched() -> bool:
            try:
                return _fetch(port, sha, priv, tmp_path / "got") == len(data)
            except blobs.BlobFetchError:
                return False

        wait_until(fetched, 20, interval=0.5, what="fetch while idle connections are open")
        took = time.monotonic() - t0
    print(f"fetch with {IDLE} idle connections from the same address: {took:.1f} s")
    assert took < blobs.REQUEST_TIMEOUT + 3, took


def test_refusals_are_logged_once_per_window(blob_master, tmp_path) -> None:
    info, port, _priv, sha, _data = blob_master
    forger = crypto.load_private_key(crypto.generate_keypair(1024)[0])
    for _ in range(20):
        with pytest.raises(blobs.BlobFetchError, match="signature"):
            _fetch(port, sha, forger, tmp_path / "forged")
    lines = [ln for ln in info["proc"].log_text().splitlines()
             if "[WARNING]" in ln and "refused a file blob request" in ln]
    assert len(lines) == 1, lines
