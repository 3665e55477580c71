"""publisher_acl: a non-root Unix user uses the real ``hamaster`` CLI code as far as its ACL
allows, identified by the kernel (SO_PEERCRED), never by what it sends.

The interpreter of these machines lives under /root (0700), which a non-root user cannot
execute; so the CLI runs in a forked child of the test (its modules imported before the fork)
that drops to ``nobody`` and calls ``hamaster.cli.salt.main`` / ``hamaster.cli.run.main``.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import sys
from pathlib import Path

import pytest

import hamaster.cli.run
import hamaster.cli.salt
import hamaster.cliargs
import hamaster.config
import hamaster.localapi
import hamaster.output  # noqa: F401  (imported before the fork: /root is not readable then)
from hamaster.localapi import LocalClient
from tests.integration.harness import Cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")


def as_user(user: str, fn, argv: list[str]) -> tuple[int, str]:
    """Run ``fn(argv)`` in a child process as ``user``; returns (exit code, stdout+stderr)."""
    pw = pwd.getpwnam(user)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.close(rfd)
            os.dup2(wfd, 1)
            os.dup2(wfd, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (pytest replaced them)
            sys.stderr = sys.stdout
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            code = fn(argv)
        except BaseException as exc:  # report, never return into pytest
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            sys.stdout.flush()
            os._exit(code if isinstance(code, int) else 1)
    os.close(wfd)
    chunks = []
    while True:
        data = os.read(rfd, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _open_path(base: Path, target: Path) -> None:
    """Let others traverse every directory from ``base`` down to ``target``."""
    for d in [base, *[p for p in target.parents if base in p.parents]]:
        if d.is_dir():
            d.chmod(d.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)


def test_non_root_user_runs_what_publisher_acl_allows(cluster: Cluster) -> None:
    m = cluster.add_master({
        "auto_accept": True,
        "publisher_acl": {"nobody": [{"web*": ["test.ping"]}, "@jobs"],
                          "someone_else": [".*"]},
        "publisher_acl_blacklist": {"modules": ["cmd\\..*"]},
    })
    cluster.add_minion("web1")
    cluster.add_minion("db1")
    cluster.wait_all_answer(["web1", "db1"])
    confdir = str(m["confdir"])
    sock = Path(m["conf"]["root_dir"]) / "var/run/hamaster/master/master.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o666
    _open_path(cluster.base, sock)

    code, out = as_user("nobody", hamaster.cli.salt.main,
                        ["-c", confdir, "--out", "json", "--static", "web1", "test.ping"])
    assert code == 0, out
    assert json.loads(out[out.index("{"):]) == {"web1": True}

    for argv in (["db1", "test.ping"], ["*", "test.ping"], ["web1", "test.echo", "hi"],
                 ["web1", "cmd.run", "id"]):
        code, out = as_user("nobody", hamaster.cli.salt.main, ["-c", confdir, *argv])
        assert code == 2, (argv, out)
        assert "may not run" in out and "publisher_acl" in out, out

    code, out = as_user("nobody", hamaster.cli.run.main, ["-c", confdir, "jobs.list_jobs"])
    assert code == 0, out
    code, out = as_user("nobody", hamaster.cli.run.main, ["-c", confdir, "manage.status"])
    assert code == 1 and "may not run runner manage.status" in out, out
    assert "CLI: Authorization error occurred: nobody may not run" in m["proc"].log_text()

    # the job of the allowed call is recorded as nobody's, whatever the request said
    with LocalClient(str(sock.parent)) as client:
        jobs = client.call({"cmd": "runner", "fun": "jobs.list_jobs"})["return"]
    assert "nobody" in {j.get("User") for j in jobs.values()}
    # root is unchanged: anything, anywhere
    res = cluster.run("hamaster", "--out", "json", "--static", "*", "cmd.run", "echo ok")
    assert json.loads(res.stdout) == {"web1": "ok", "db1": "ok"}


def test_without_publisher_acl_the_socket_stays_private(cluster: Cluster) -> None:
    m = cluster.add_master({})
    sock = Path(m["conf"]["root_dir"]) / "var/run/hamaster/master/master.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    _open_path(cluster.base, sock.parent)
    sock.parent.chmod(0o755)  # even if an operator opens the directory, the socket refuses
    code, out = as_user("nobody", hamaster.cli.salt.main,
                        ["-c", str(m["confdir"]), "*", "test.ping"])
    assert code == 2 and "permission denied" in out, out
