"""An NFS stand-in for tests: one exported directory mounted several times through sshfs.

This kernel has no NFS client, so (as ``shared/docs/TEST-INFRA.md`` measured) sshfs over a local
sshd gives the same semantics that matter to the ``fs`` backend: inotify does not see changes
made through another mount, directory listings can be stale, rename is atomic, and locks do not
exclude across mounts. sshd listens on 127.0.0.1 only and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.kit import free_port, stop_group, wait_until

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """None if sshfs mounts can be made here, else the reason they cannot."""
    for tool in ("sshfs", "fusermount3", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-server openssh-client sshfs)"
    if not os.path.exists(SSHD):
        return "sshd is not installed (apt-get install openssh-server)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@contextlib.contextmanager
def sshfs_mounts(export: Path, count: int, dir_cache: bool = False) -> Iterator[list[Path]]:
    """Mount ``export`` ``count`` times; yields the mount points; unmounts and stops sshd."""
    work = Path(tempfile.mkdtemp(prefix="hm-sshfs-", dir="/tmp"))
    sshd_proc = None
    mounts: list[Path] = []
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)], check=True)
        (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
        port = free_port()
        (work / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host_key'}\nPidFile "
            f"{work / 'sshd.pid'}\nAuthorizedKeysFile "
            f"{work / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nPermitRootLogin yes\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd_proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(work / "sshd_config")],
            stdout=open(work / "sshd.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        for i in range(count):
            mp = work / f"mnt{i}"
            mp.mkdir()
            opts = (f"IdentityFile={work / 'client_key'},StrictHostKeyChecking=no,"
                    "UserKnownHostsFile=/dev/null,BatchMode=yes")
            if not dir_cache:
                opts += ",dir_cache=no"
            def mount(mp: Path = mp, opts: str = opts) -> bool:
                res = subprocess.run(
                    ["sshfs", "-p", str(port), "-o", opts, f"root@127.0.0.1:{export}", str(mp)],
                    capture_output=True)
                return res.returncode == 0
            wait_until(mount, 15, interval=0.2, what=f"sshfs mount {i}")
            mounts.append(mp)
        yield mounts
    finally:
        for mp in mounts:
            for _ in range(20):
                if subprocess.run(["fusermount3", "-u", str(mp)],
                                  capture_output=True).returncode == 0:
                    break
                subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
                time.sleep(0.1)
        stop_group(sshd_proc, 10)
        shutil.rmtree(work, ignore_errors=True)
