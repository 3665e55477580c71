"""The ``hamaster`` CLI waits for long jobs as salt does (issue 17), with real processes.

One master (``timeout: 5``, ``gather_job_timeout: 3``) and hamaster minions: a job longer than
the timeout is waited for (``saltutil.find_job`` probes), a killed minion is reported after the
probe, ``-v`` / ``--summary`` / ``-p`` (on a pseudo-terminal) / ``-b`` / Ctrl-C / ``jobs.active``;
and a 2-master cluster where the publishing master dies mid-job.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import BIN, Cluster
from tests.kit import wait_until

GATHER = 3


def _accept(c: Cluster, ids: list[str], master: int = 0) -> None:
    wait_until(lambda: set(c.keys(master).get("minions_pre", [])) >= set(ids), 30,
               what=f"{ids} pending")
    c.run("hamaster-key", "-A", "-y", master=master, check=True)


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C as at a terminal. A test run started in the background
    by a non-interactive shell inherits SIGINT ignored, and so would the CLI."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(c: Cluster, *args: str, master: int = 0, **kw: object) -> subprocess.Popen:
    argv = [str(BIN / "hamaster"), "-c", str(c.masters[master]["confdir"]), *args]
    kw.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)  # type: ignore[call-overload]


def _run_json(c: Cluster, *args: str, master: int = 0) -> object:
    res = c.run("hamaster-run", "--out", "json", *args, master=master)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return None


@pytest.fixture(scope="module")
def fleet() -> Iterator[Cluster]:
    """A master with `timeout: 5` (salt's default) and a short gather_job_timeout; m1, m2, victim
    and a swarm of six (b-00000 … b-00005)."""
    c = Cluster.create()
    try:
        c.add_master({"timeout": 5, "gather_job_timeout": GATHER})
        for mid in ("m1", "m2", "victim"):
            c.add_minion(mid)
        c.add_minion("swarm", args=["--swarm", "6", "--swarm-prefix", "b-"])
        ids = ["m1", "m2", "victim"] + [f"b-{i:05d}" for i in range(6)]
        _accept(c, ids)
        c.wait_all_answer(ids)
        yield c
    finally:
        c.close()


def test_long_job_waited_for_default_and_short_timeout(fleet: Cluster) -> None:
    """test.sleep 8 with the default timeout (5) and with -t 2: True, exit 0, after ~8 s;
    -v prints the jid as salt does, --summary counts, jobs.active sees the job while it runs."""
    t0 = time.monotonic()
    plain = _cli(fleet, "m1", "test.sleep", "8")
    short = _cli(fleet, "-t", "2", "-v", "--summary", "m2", "test.sleep", "8")
    assert short.stdout is not None
    first = short.stdout.readline()
    m = re.match(r"Executing job with jid (\d{20})$", first.strip())
    assert m, first
    jid = m.group(1)
    assert short.stdout.readline().strip() == "-" * len(first.strip())

    def active() -> object:
        got = _run_json(fleet, "jobs.active")
        return got if isinstance(got, dict) and jid in got else None

    act = wait_until(active, 6, 0.2, "jobs.active lists the job")[jid]
    assert act["Function"] == "test.sleep" and act["Arguments"] == [8], act
    assert [list(r) for r in act["Running"]] == [["m2"]] and act["Returned"] == [], act

    out_plain, err_plain = plain.communicate(timeout=30)
    took_plain = time.monotonic() - t0
    out_short, err_short = short.communicate(timeout=30)
    took_short = time.monotonic() - t0
    assert plain.returncode == 0, (out_plain, err_plain)
    assert out_plain.split() == ["m1:", "True"], out_plain
    assert 7.5 <= took_plain < 12, took_plain
    assert short.returncode == 0, (out_short, err_short)
    assert "m2:\n    True" in out_short, out_short
    assert 7.5 <= took_short < 12, took_short
    summary = out_short[out_short.index("Summary"):]
    assert "# of minions targeted: 1\n# of minions returned: 1\n" in summary, summary
    assert "# of minions that did not return: 0\n# of minions with errors: 0" in summary, summary
    done = _run_json(fleet, "jobs.active")
    assert isinstance(done, dict) and jid not in done, done


def test_killed_minion_reported_after_probe(fleet: Cluster) -> None:
    """A minion killed mid-job: 'did not return' once the probe goes unanswered
    (timeout + gather_job_timeout), exit 1 with salt's error line."""
    cli = _cli(fleet, "-t", "2", "-v", "--summary", "victim", "test.sleep", "60")
    assert cli.stdout is not None
    jid = cli.stdout.readline().split()[-1]
    t0 = time.monotonic()
    victim = next(p for p in fleet.procs if p.name == "minion-victim")
    victim.kill()
    out, err = cli.communicate(timeout=30)
    took = time.monotonic() - t0
    assert cli.returncode == 1, (out, err)
    assert "victim:\n    Minion did not return. [No response]" in out, out
    assert f"hamaster-run jobs.lookup_jid {jid}" in out, out
    assert "ERROR: Minions returned with non-zero exit code" in err, err
    assert "# of minions that did not return: 1" in out, out
    assert "Minions not responding: victim" in out, out
    # probe at 2 s, given up at 2 + 3 s (measured from the jid line, so a little less)
    assert 2 + GATHER - 1.5 <= took <= 2 + GATHER + 2.5, took


def test_ctrl_c_leaves_the_job_running(fleet: Cluster) -> None:
    cli = _cli(fleet, "-v", "m1", "test.sleep", "3")
    assert cli.stdout is not None
    jid = cli.stdout.readline().split()[-1]
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=10)
    assert cli.returncode == 0, (out, err)
    assert f"This job's jid is: {jid}" in err and f"hamaster-run jobs.lookup_jid {jid}" in err, err
    wait_until(lambda: _run_json(fleet, "jobs.lookup_jid", jid) == {"m1": True}, 15, 0.3,
               "the job finishes")


def test_batch_two_at_a_time(fleet: Cluster) -> None:
    """-b 2 over six minions: never more than two running at once (start/end stamped by the
    minions themselves), each new one starting as one returns; all six return."""
    script = "import time; a = time.time(); time.sleep(1.0); print(a, time.time())"
    res = fleet.run("hamaster", "-b", "2", "--out", "json", "b-*", "cmd.run",
                    f"python3 -c '{script}'", timeout=60)
    assert res.returncode == 0, (res.stdout, res.stderr)
    starts = re.findall(r"Executing run on \[([^\]]*)\]", res.stdout)
    assert starts and all(len(s.split(",")) <= 2 for s in starts), res.stdout
    spans: dict[str, tuple[float, float]] = {}
    for doc in re.findall(r"^\{\n.*?^\}$", res.stdout, re.S | re.M):
        for mid, text in json.loads(doc).items():
            a, b = (float(x) for x in text.split())
            spans[mid] = (a, b)
    assert sorted(spans) == [f"b-{i:05d}" for i in range(6)], res.stdout
    edges = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2, spans


def test_progress_bar_on_a_tty_and_summary(fleet: Cluster) -> None:
    master_fd, slave_fd = pty.openpty()
    argv = [str(BIN / "hamaster"), "-c", str(fleet.masters[0]["confdir"]),
            "-p", "b-*", "test.sleep", "1"]
    proc = subprocess.Popen(argv, stdout=slave_fd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master_fd], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master_fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master_fd)
    proc.wait(timeout=10)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert re.search(r"100% \|#+\| Elapsed Time: 0:00:0\d Returns: \[6/6\]", text), text
    assert "  0% |" in text, text  # drawn before the first return
    assert "# of minions targeted: 6\r\n# of minions returned: 6" in text, text
    # not a terminal: no bar, the summary still
    res = fleet.run("hamaster", "-p", "b-*", "test.ping")
    assert "Elapsed Time" not in res.stdout and "# of minions returned: 6" in res.stdout, res.stdout


def test_cluster_publisher_dies_job_seen_and_finished_on_b(cluster: Cluster) -> None:
    shared = cluster.base / "shared"
    shared.mkdir()
    for _ in range(2):
        cluster.add_master({"ha_dir": str(shared), "auto_accept": True, "timeout": 5})
    cluster.add_minion("h1")
    cluster.wait_all_answer(["h1"], master=0)
    cluster.wait_all_answer(["h1"], master=1)
    res = cluster.run("hamaster", "--async", "h1", "test.sleep", "6", master=0, check=True)
    jid = res.stdout.split()[-1]
    cluster.masters[0]["proc"].kill()

    def active_on_b() -> object:
        got = _run_json(cluster, "jobs.active", master=1)
        running = got.get(jid, {}).get("Running", []) if isinstance(got, dict) else []
        return [list(r) for r in running] == [["h1"]]

    wait_until(active_on_b, 8, 0.2, "jobs.active on B lists the job")
    wait_until(lambda: _run_json(cluster, "jobs.lookup_jid", jid, master=1) == {"h1": True},
               20, 0.3, "the job's return on B")
    assert jid not in (_run_json(cluster, "jobs.active", master=1) or {})


def test_minion_without_a_session_is_not_probed(fleet: Cluster) -> None:
    """An accepted minion that never authenticated with this master cannot decrypt its jobs: it
    is reported [Not connected] at the timeout, without waiting for a probe."""
    from tests.integration.spy import SpyMinion

    spy = SpyMinion("127.0.0.1", fleet.masters[0]["conf"]["ret_port"], "ghost")
    try:
        assert spy.auth().status == "pending"
    finally:
        spy.close()
    fleet.run("hamaster-key", "-a", "ghost", "-y", check=True)
    wait_until(lambda: fleet.run("hamaster", "--async", "ghost", "test.ping").returncode == 0, 10,
               0.2, "the master targets ghost")
    t0 = time.monotonic()
    res = fleet.run("hamaster", "-t", "1", "--summary", "-v", "-L", "ghost,m1", "test.ping")
    took = time.monotonic() - t0
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "ghost:\n    Minion did not return. [Not connected]" in res.stdout, res.stdout
    assert "Minions not connected: ghost" in res.stdout, res.stdout
    assert took < 1 + GATHER - 0.5, took


def test_ctrl_c_in_a_batch_starts_no_further_minion(fleet: Cluster) -> None:
    cli = _cli(fleet, "-b", "1", "--show-jid", "b-*", "test.sleep", "2")
    assert cli.stdout is not None
    jid = cli.stdout.readline().split()[-1]
    wait_until(lambda: "Executing run on" in cli.stdout.readline(), 10, 0, "the first batch")
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=10)
    assert cli.returncode == 0 and f"This job's jid is: {jid}" in err, (out, err)
    # the running minion finishes; none is started after it (it would run 2 s: jobs.active sees it)
    wait_until(lambda: _run_json(fleet, "jobs.lookup_jid", jid) == {"b-00000": True}, 10, 0.1,
               "the first minion's return")
    assert jid not in (_run_json(fleet, "jobs.active") or {})
    assert _run_json(fleet, "jobs.lookup_jid", jid) == {"b-00000": True}
