"""``hamaster-cluster``: a local demo cluster (N masters sharing one store, M minions).

``up`` starts it, accepts the minion keys once and waits until every minion answers through
every master; ``status`` shows it; ``down`` stops it (by PID); ``demo`` runs the whole story:
ping through each master, kill master 1, ping through the others, restart it, ping through it
again, with timings.

Backends (``--backend``):

- ``fs`` (default): every master shares ``<dir>/shared`` as its ``ha_dir``.
- ``etcd``: ``--etcd-endpoints host:port,...`` uses an existing etcd (under a prefix of its own,
  ``/hamaster-cluster/<token>``, kept in ``cluster.json``); without it ``up`` starts a local etcd
  cluster of ``--etcd-members`` 1 or 3 members (Debian's ``etcd`` binary, data in
  ``<dir>/etcd/<name>``, loopback ports kept across ``down``/``up`` so the data stays valid).
- ``rsync``: each master keeps its own ``<dir>/masterN/ha`` and runs an authenticated rsync daemon
  serving it (``<dir>/rsyncd/masterN``: rsyncd.conf, secrets and password files, mode 0600);
  ``ha_rsync_peers`` point each master at the others' daemons.

Backend processes (etcd members, rsync daemons) are ``services`` in ``cluster.json``, each with
its PID, command line and log, so ``status`` shows them, ``down`` stops them by PID and
``hamaster-drill`` can stop and restart them (``backend: {etcd_members: [...]}`` /
``{rsync_daemon: masterN}``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
from pathlib import Path

from hamaster import cluster_services as cs
from hamaster.cli.common import die
from hamaster.localcluster import BACKENDS, DEFAULT_DIR, LocalCluster, program


def cmd_up(c: LocalCluster, n_masters: int, n_minions: int, backend: str = "fs",
           etcd_endpoints: list[str] | None = None, etcd_members: int = 3,
           leader_drills: bool = False, lease_ttl: float | None = None) -> int:
    t0 = time.monotonic()
    if leader_drills and backend == "rsync":
        return die("--leader-drills needs the leader lease (etcd or fs): "
                   "the rsync backend has none")
    if leader_drills and n_minions < 1:
        return die("--leader-drills needs a minion (the drill schedule's target)")
    if c.state and any(c.alive(e) for e in c.state.get("masters", []) + c.state.get("minions", [])
                       + c.state.get("services", [])):
        return die(f"a cluster is already running in {c.base}; run `hamaster-cluster down "
                   f"--dir {c.base}` first")
    if c.state.get("masters") and c.backend != backend:
        return die(f"{c.base} holds a cluster on the {c.backend} backend (its minions "
                   f"trust that cluster's master key); use another --dir for --backend "
                   f"{backend}, or remove {c.base}")
    old_etcd = c.state.get("etcd") if c.state.get("masters") else None
    if old_etcd is not None:
        old = (f"etcd at {', '.join(old_etcd['endpoints'])}" if not old_etcd.get("local")
               else f"a local {len(c.services('etcd'))}-member etcd")
        same = (not etcd_endpoints and old_etcd.get("local")
                and len(c.services("etcd")) == etcd_members) or \
            (etcd_endpoints and not old_etcd.get("local")
             and old_etcd["endpoints"] == etcd_endpoints)
        if not same:
            return die(f"{c.base} holds a cluster on {old} (its minions trust that store's master "
                       f"key); give the same etcd options, use another --dir, or remove {c.base}")
    c.configure(n_masters, n_minions, backend, etcd_endpoints, etcd_members)
    # hamaster-drill leader-* scenarios: reactor + schedule (hamaster/drill/setup.py)
    from hamaster.drill.setup import remove_leader_drill_config, write_leader_drill_config

    confdirs = [m["confdir"] for m in c.state["masters"]]
    if leader_drills:
        sls = write_leader_drill_config(c.base, confdirs, c.state["minions"][0]["name"], lease_ttl)
        print(f"leader drills: reactor {sls} and schedule hamaster-drill in every "
              f"master's master.d/")
    else:
        remove_leader_drill_config(confdirs)
    etcd = c.state.get("etcd") or {}
    if c.services("etcd"):
        took = c.start_services(c.services("etcd"))
        print(f"etcd: {len(c.services('etcd'))} local member(s) healthy in {took:.2f} s: "
              + ", ".join(f"{e['name']} {e['endpoint']}" for e in c.services("etcd")))
    elif etcd:
        print(f"etcd: using {', '.join(etcd['endpoints'])} under prefix {etcd['prefix']}")
    if c.services("rsyncd"):
        took = c.start_services(c.services("rsyncd"))
        print(f"rsync: {len(c.services('rsyncd'))} authenticated daemons listening "
              f"in {took:.2f} s: "
              + ", ".join(f"{e['master']} 127.0.0.1:{e['port']}" for e in c.services("rsyncd")))
    c.seed_store()
    if backend == "rsync":
        # rsync masters agree on the cluster's one master keypair before serving: each waits
        # for the candidates of all its peers (docs/architecture.md), so they start together.
        for m in c.state["masters"]:
            c._start(m, "master")
        for m in c.state["masters"]:
            c.wait_master(m, timeout=60)
    else:
        for m in c.state["masters"]:
            c.start_master(m)
    for n in c.state["minions"]:
        c._start(n, "minion")
    ids = [n["name"] for n in c.state["minions"]]
    c.accept_keys(ids)
    print(f"keys accepted once for {len(ids)} minions (shared by all {n_masters} masters)")
    for m in c.state["masters"]:
        c.wait_all(m, ids)
        print(f"  every minion answers through {m['name']} "
              f"({m['conf']['interface']}:{m['conf']['ret_port']})")
    where = "" if backend == "fs" else f", backend {backend}"
    print(f"cluster up in {time.monotonic() - t0:.2f} s: {n_masters} masters, {n_minions} minions, "
          f"dir {c.base}{where}")
    return 0


def cmd_status(c: LocalCluster) -> int:
    if not c.state:
        return die(f"no cluster in {c.base}")
    for kind in ("masters", "minions"):
        for e in c.state[kind]:
            print(f"{e['name']:<10} {'running' if c.alive(e) else 'stopped':<8} pid {e.get('pid')}")
    etcd = c.state.get("etcd")
    if etcd and not etcd.get("local"):
        print(f"etcd (not started here): {', '.join(etcd['endpoints'])}, prefix {etcd['prefix']}")
    for e in c.services():
        running = c.alive(e)
        if e["kind"] == "etcd":
            detail = f"{e['endpoint']}" + ((", healthy" if cs.etcd_healthy(e["endpoint"])
                                             else ", NOT healthy")
                                           if running else "")
        else:
            detail = f"127.0.0.1:{e['port']} serving {e['path']}"
        print(f"{e['name']:<14} {'running' if running else 'stopped':<8} pid "
              f"{e.get('pid')}  {detail}")
    live = [m for m in c.state["masters"] if c.alive(m)]
    if live:
        res = subprocess.run([program("hamaster-run"), "-c", live[0]["confdir"], "cluster.status"],
                             capture_output=True, text=True)
        print(res.stdout.rstrip())
    return 0


def cmd_down(c: LocalCluster) -> int:
    if not c.state:
        print(f"no cluster in {c.base}")
        return 0
    for e in c.state.get("minions", []) + c.state.get("masters", []) + c.state.get("services", []):
        c.stop(e)
    print(f"cluster in {c.base} stopped")
    return 0


def cmd_demo(c: LocalCluster, n_masters: int, n_minions: int, keep: bool, backend: str = "fs",
             etcd_endpoints: list[str] | None = None, etcd_members: int = 3) -> int:
    if n_masters < 2:
        return die("the demo needs at least 2 masters")
    rc = cmd_up(c, n_masters, n_minions, backend, etcd_endpoints, etcd_members)
    if rc:
        return rc
    ids = [n["name"] for n in c.state["minions"]]
    try:
        masters = c.state["masters"]
        for m in masters:
            t0 = time.monotonic()
            got = c.ping(m)
            print(f"ping through {m['name']}: {sum(v is True for v in got.values())}/{len(ids)} in "
                  f"{time.monotonic() - t0:.3f} s")
        victim, others = masters[0], masters[1:]
        t_kill = time.monotonic()
        c.stop(victim, signal.SIGKILL)
        print(f"killed {victim['name']} (SIGKILL)")
        for m in others:
            t0 = time.monotonic()
            got = c.ping(m)
            print(f"ping through {m['name']} with {victim['name']} dead: "
                  f"{sum(v is True for v in got.values())}/{len(ids)} in "
                  f"{time.monotonic() - t0:.3f} s")
        t0 = time.monotonic()
        c.start_master(victim)
        took = c.wait_all(victim, ids)
        print(f"restarted {victim['name']}: every minion answers through it "
              f"{time.monotonic() - t0:.2f} s after restart (ping loop {took:.2f} s); "
              f"{victim['name']} was down {t0 - t_kill:.2f} s")
        got = c.ping(victim)
        print(f"ping through {victim['name']} again: "
              f"{sum(v is True for v in got.values())}/{len(ids)}")
        ok = all(got.get(i) is True for i in ids)
    finally:
        if not keep:
            cmd_down(c)
    print("demo passed" if ok else "demo FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="hamaster-cluster",
        description="Start, inspect and stop a local hamaster cluster (fs, etcd or rsync backend).",
        epilog="Examples:\n  hamaster-cluster demo\n  hamaster-cluster up --masters 2 --minions "
        "3\n  hamaster-cluster up --dir /tmp/hm-etcd --backend etcd --etcd-members 3\n  "
        "hamaster-cluster up --dir /tmp/hm-etcd2 --backend etcd --etcd-endpoints "
        "10.0.0.11:2379,10.0.0.12:2379\n  hamaster-cluster up --dir /tmp/hm-rsync --backend "
        "rsync\n  hamaster-cluster status\n  hamaster-cluster down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "demo", "status", "down"):
        sp = sub.add_parser(name)
        sp.add_argument("--dir", default=DEFAULT_DIR,
                        help=f"cluster directory (default {DEFAULT_DIR})")
        if name in ("up", "demo"):
            sp.add_argument("--masters", type=int, default=2)
            sp.add_argument("--minions", type=int, default=3)
            sp.add_argument("--backend", choices=BACKENDS, default="fs",
                            help="fs: one shared dir; etcd: an etcd cluster; rsync: a tree per "
                            "master pushed to the others' rsync daemons (default fs)")
            sp.add_argument("--etcd-endpoints", metavar="HOST:PORT,...",
                            help="etcd: use this existing etcd (default: start a local one)")
            sp.add_argument("--etcd-members", type=int, choices=(1, 3), default=3,
                            help="etcd without --etcd-endpoints: members of the "
                                 "local etcd (default 3)")
        if name == "up":
            sp.add_argument("--leader-drills", action="store_true",
                            help="configure the reactor and 2 s schedule the hamaster-drill "
                            "leader-* scenarios need (docs/drills.md)")
            sp.add_argument("--lease-ttl", type=float, metavar="SECONDS",
                            help="with --leader-drills: ha_lease_ttl of the masters (default 5)")
        if name == "demo":
            sp.add_argument("--keep", action="store_true",
                            help="leave the cluster running afterwards")
    args = p.parse_args(argv)
    from hamaster.localdirs import UnsafeDirectory

    base = Path(args.dir).resolve()
    try:
        c = LocalCluster(base, create=True)
    except (UnsafeDirectory, OSError) as exc:
        return die(str(exc))
    backend: dict = {}
    if args.cmd in ("up", "demo"):
        endpoints = [e.strip() for e in (args.etcd_endpoints or "").split(",") if e.strip()]
        if endpoints and args.backend != "etcd":
            return die("--etcd-endpoints goes with --backend etcd")
        backend = {"backend": args.backend, "etcd_endpoints": endpoints or None,
                   "etcd_members": args.etcd_members}
    try:
        if args.cmd == "up":
            if args.lease_ttl is not None and not args.leader_drills:
                return die("--lease-ttl goes with --leader-drills")
            return cmd_up(c, args.masters, args.minions, **backend,
                          leader_drills=args.leader_drills, lease_ttl=args.lease_ttl)
        if args.cmd == "demo":
            return cmd_demo(c, args.masters, args.minions, args.keep, **backend)
        if args.cmd == "status":
            return cmd_status(c)
        return cmd_down(c)
    except RuntimeError as exc:
        return die(str(exc), 1)


if __name__ == "__main__":
    raise SystemExit(main())
