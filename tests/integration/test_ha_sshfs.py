"""HA on the fs backend with each master on its own network mount of one export (NFS stand-in).

Through sshfs, inotify sees nothing of the other mount's changes and listings may be stale, as on
NFS: everything here must work by polling alone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration import nfs_standin
from tests.integration.harness import Cluster
from tests.kit import wait_until

pytestmark = pytest.mark.skipif(nfs_standin.available() is not None,
                                reason=str(nfs_standin.available()))


def test_two_masters_on_two_mounts(cluster: Cluster) -> None:
    export = Path(tempfile.mkdtemp(prefix="hm-export-", dir="/tmp"))
    try:
        with nfs_standin.sshfs_mounts(export, 2) as (mount_a, mount_b):
            cluster.add_master({"ha_dir": str(mount_a)})
            cluster.add_master({"ha_dir": str(mount_b)})
            cluster.add_minion("n1")
            cluster.add_minion("n2")
            wait_until(lambda: set(cluster.keys(1)["minions_pre"]) >= {"n1", "n2"}, 30,
                       what="pending seen through B")
            # accepted on A → answers through B
            cluster.run("hamaster-key", "-a", "n1", "-y", master=0, check=True)
            cluster.run("hamaster-key", "-a", "n2", "-y", master=0, check=True)
            cluster.wait_all_answer(["n1", "n2"], master=1, timeout=30)
            cluster.wait_all_answer(["n1", "n2"], master=0, timeout=30)
            # a file written through A's mount is served by B
            d = mount_a / "file_roots" / "base"
            d.mkdir(parents=True, exist_ok=True)
            (d / "nfs.txt").write_text("over the wire\n")
            dest = cluster.base / "nfs-dest.txt"
            def served() -> bool:
                res = cluster.run("hamaster", "--out", "json", "--static", "n1", "cp.get_file",
                                  "salt://nfs.txt", str(dest), master=1)
                return res.returncode == 0 and dest.exists()
            wait_until(served, 30, interval=0.5, what="file served by B")
            assert dest.read_text() == "over the wire\n"
            # a job through A is looked up on B
            jid = cluster.run("hamaster", "--async", "n2", "test.echo", "nfs-job", master=0,
                              check=True).stdout.split()[-1]
            wait_until(
                lambda: json.loads(cluster.run("hamaster-run", "--out", "json", "jobs.lookup_jid",
                                               jid, master=1).stdout or "{}") == {"n2": "nfs-job"},
                30, interval=0.5, what="lookup on B",
            )
            # rejected on B → refused by A
            cluster.run("hamaster-key", "-r", "n2", "-y",
                        "--include-accepted", master=1, check=True)
            wait_until(
                lambda: cluster.run("hamaster", "-t", "2", "n2", "test.ping",
                                    master=0).returncode == 2, 30, what="n2 refused by A")
            assert cluster.ping("n1", master=0) == {"n1": True}
            cluster.close()  # stop processes before unmounting
    finally:
        shutil.rmtree(export, ignore_errors=True)
