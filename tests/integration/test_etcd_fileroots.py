"""file_roots on etcd: a manifest in etcd, large contents fetched by hash from a peer master."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamaster.fileroots.manifest import BLOBS_PREFIX, INLINE_MAX, MANIFEST_PREFIX
from tests.integration.harness import Cluster
from tests.integration.services import EtcdCluster, etcd_server
from tests.kit import free_port, wait_until


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One etcd node for the module (stopped after the cluster fixture stops the masters)."""
    with etcd_server() as srv:
        yield srv


def _run_json(cluster: Cluster, *args: str, master: int) -> object:
    res = cluster.run("hamaster-run", "--out", "json", *args, master=master, check=True)
    return json.loads(res.stdout)


def test_large_file_moves_between_masters_by_hash(cluster: Cluster, etcd: EtcdCluster) -> None:
    def conf() -> dict:
        return {"ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                "ha_etcd_prefix": "/hm-fileroots", "file_blob_port": free_port(),
                "auto_accept": True}

    cluster.add_master(conf())
    cluster.add_master(conf())
    cluster.add_minion("e1", masters=[cluster.masters[1]])  # file requests can only reach B
    cluster.wait_all_answer(["e1"], master=1)

    src = cluster.base / "src"
    (src / "files").mkdir(parents=True)
    small = b"hello from the manifest\n"
    big = os.urandom(3 * 1024 * 1024)
    (src / "files/small.txt").write_bytes(small)
    (src / "big.bin").write_bytes(big)
    big_sha = hashlib.sha256(big).hexdigest()

    summary = _run_json(cluster, "fileroots.push", str(src), "saltenv=base", master=0)
    assert isinstance(summary, dict)
    assert summary["added"] == ["big.bin", "files/small.txt"] and summary["inline"] == 1

    # B learns the manifest from etcd and fetches the large blob from A by its hash
    def present_on_b() -> bool:
        listing = _run_json(cluster, "fileroots.list", master=1)
        assert isinstance(listing, dict)
        entry = listing.get("base", {}).get("big.bin")
        return bool(entry and entry["present"] and entry["sha256"] == big_sha)

    wait_until(present_on_b, 30, 0.25, "big.bin fetched by master1")
    b_cache = Path(cluster.masters[1]["conf"]["root_dir"]) / "var/cache/hamaster/master/file_blobs"
    assert (b_cache / big_sha).read_bytes() == big
    assert "fetched file blob " + big_sha in cluster.masters[1]["proc"].log_text()

    for url, want in (("salt://big.bin", big), ("salt://files/small.txt", small)):
        dest = cluster.base / ("dest-" + url.rsplit("/", 1)[-1])
        res = cluster.run("hamaster", "--out", "json", "--static", "e1", "cp.get_file", url,
                          str(dest), master=1, check=True)
        assert json.loads(res.stdout) == {"e1": str(dest)}
        assert dest.read_bytes() == want

    # path traversal is still refused
    res = cluster.run("hamaster", "--out", "json", "--static", "e1", "cp.get_file",
                      "salt://../x", str(cluster.base / "x"), master=1)
    assert json.loads(res.stdout)["e1"] in ("", False)
    assert not (cluster.base / "x").exists()

    # etcd holds the manifest and the small inline blob, never a value over INLINE_MAX
    from hamaster.store.etcd import EtcdStore

    store = EtcdStore(etcd.endpoints, prefix="/hm-fileroots")
    try:
        manifest = store.get_many(MANIFEST_PREFIX.rstrip("/"))
        blobs = store.get_many(BLOBS_PREFIX.rstrip("/"))
        everything = store.get_many("")
    finally:
        store.close()
    assert set(manifest) == {"file_manifest/base/big.bin", "file_manifest/base/files/small.txt"}
    assert json.loads(manifest["file_manifest/base/big.bin"])["inline"] is False
    assert set(blobs) == {BLOBS_PREFIX + hashlib.sha256(small).hexdigest()}
    assert max(len(v) for v in everything.values()) <= INLINE_MAX
    # both masters report the same file_roots hash (no drift) once B has the blob
    wait_until(lambda: _run_json(cluster, "cluster.status",  # type: ignore[index]
                                 master=1)["drift"]["fileroots"] is False,
               30, 0.5, "no file_roots drift")
