"""The rsync daemon module as hamaster-cluster (and ops/rsync) configure it: push only.

The rsync password lets a peer push into a master's ha_dir; it must never let anyone download
from it, since the tree holds the cluster's ``master.pem``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from hamaster.store.rsync import RsyncStore
from tests.integration.services import need_binary, rsync_daemon
from tests.kit import wait_until

OPS_CONF = Path(__file__).resolve().parents[2] / "ops" / "rsync" / "rsyncd.conf"


def test_password_pushes_but_never_pulls_the_master_key(tmp_path: Path) -> None:
    rsync = need_binary("rsync")
    with rsync_daemon(tmp_path / "b") as daemon:
        store = RsyncStore(tmp_path / "a", [daemon.url], password_file=str(daemon.password_file),
                           debounce=0.05, interval=60)
        store.start()
        try:
            store.put("pki/master/master.pem", b"-----BEGIN RSA PRIVATE KEY-----\nx\n")
            store.put("minions/web1", b"pub")
            # pushes still work with "write only = yes"
            wait_until(lambda: (tmp_path / "b/pki/master/master.pem").is_file(), 20,
                       what="key pushed to the peer's tree")
        finally:
            store.close()
        auth = ["--password-file", str(daemon.password_file)]
        for src in (f"{daemon.url}/pki/master/master.pem", f"{daemon.url}/", f"{daemon.url}/pki/"):
            dest = tmp_path / "stolen"
            res = subprocess.run([rsync, "-r", *auth, src, str(dest)], capture_output=True,
                                 text=True, timeout=30)
            assert res.returncode != 0, (src, res.stdout)
            assert not dest.exists() or not any(dest.rglob("*")), src
        listing = subprocess.run([rsync, "--list-only", *auth, f"{daemon.url}/pki/master/"],
                                 capture_output=True, text=True, timeout=30)
        assert "master.pem" not in listing.stdout


def test_ops_example_module_is_write_only() -> None:
    text = OPS_CONF.read_text()
    module = text.split("[hamaster]", 1)[1]
    settings = {k.strip(): v.strip() for k, _, v in
                (ln.partition("=") for ln in module.splitlines())
                if not k.strip().startswith("#") and _}
    assert settings.get("write only") == "yes"
    assert settings.get("read only") == "false"
    assert settings.get("list") == "false"
