"""What a drill does to the cluster, and how each thing is undone.

Every breaking action pushes its undo onto :class:`Actions`' stack *before* it acts (so an action
interrupted half-way is still undone), and every undo is idempotent (starting a running master,
thawing a running one or deleting a rule that is gone does nothing). :meth:`Actions.restore_all`
unwinds the stack last-in first-out and is called from a ``finally``; the drill's signal handlers
turn SIGINT/SIGTERM/SIGHUP into an exception so Ctrl-C goes through that ``finally`` too.

Defaults, per node, when the drill file gives no command: signals to the node's PID (its process
group when it leads one), ``hamaster-master -c CONFDIR`` / ``hamaster-minion -c CONFDIR`` to
start (``cluster_dir`` mode), iptables rules on the loopback interface to isolate, ``rename(2)``
of an fs ``ha_dir`` to lose the backend, and on an etcd or rsync ``hamaster-cluster`` the
recorded etcd members / rsync daemons stopped by PID (SIGKILL by default) and restarted with
their recorded command line (the undo waits until each serves again). With a command (``systemctl
…``, ``ssh host …``) the command is run through ``sh -c`` with ``{name} {host} {pid} {confdir}
{ret_port} {publish_port}`` filled in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hamaster.drill import DrillError
from hamaster.drill.spec import ETCD_ROLES, Drill, Node

COMMAND_TIMEOUT = 120.0
RULE_COMMENT = "hamaster-drill"


@dataclass
class Undo:
    """One registered undo."""

    what: str
    fn: Callable[[], None]
    done: bool = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Actions:
    """Breaks and restores nodes; keeps the undo stack."""

    def __init__(self, drill: Drill, say: Callable[[str], None]) -> None:
        self.drill = drill
        self.say = say
        self.stack: list[Undo] = []
        self._lock = threading.Lock()
        self.cluster = None
        if drill.cluster_dir:
            from hamaster.localcluster import LocalCluster
            from hamaster.localdirs import UnsafeDirectory

            try:
                self.cluster = LocalCluster(Path(drill.cluster_dir))
            except UnsafeDirectory as exc:
                raise DrillError(f"cluster_dir: {exc}") from None
            # thread-safe, atomic
            self.cluster.save = self._save_cluster  # type: ignore[method-assign]
            entries = {e["name"]: e for e in (self.cluster.state.get("masters", [])
                                              + self.cluster.state.get("minions", []))}
            for n in drill.masters + drill.minions:
                if n.name in entries:
                    n.local_entry = entries[n.name]
        self.service_entries = ({e["name"]: e for e in self.cluster.state.get("services", [])}
                                if self.cluster else {})
        self._lost: list[dict] | None = None

    def _save_cluster(self) -> None:
        """Write cluster.json atomically; minions are started and stopped from several threads."""
        assert self.cluster is not None
        with self._lock:
            tmp = self.cluster.state_file.with_name(f".cluster.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.cluster.state, indent=2))
            os.replace(tmp, self.cluster.state_file)

    # -- the undo stack ---------------------------------------------------------------------------

    def push(self, what: str, fn: Callable[[], None]) -> Undo:
        u = Undo(what, fn)
        with self._lock:
            self.stack.append(u)
        return u

    def restore(self, u: Undo) -> None:
        """Run one undo now (normal end of a failure) and drop it from the stack."""
        if u.done:
            return
        u.fn()
        u.done = True
        with self._lock:
            if u in self.stack:
                self.stack.remove(u)

    def restore_all(self) -> list[str]:
        """Unwind everything still registered, newest first; returns the problems met."""
        problems = []
        while True:
            with self._lock:
                if not self.stack:
                    break
                u = self.stack.pop()
            if u.done:
                continue
            self.say(f"restoring: {u.what}")
            try:
                u.fn()
                u.done = True
            except Exception as exc:  # keep unwinding the rest
                problems.append(f"{u.what}: {exc}")
                self.say(f"RESTORE FAILED: {u.what}: {exc}")
        return problems

    # -- primitives -------------------------------------------------------------------------------

    def _fmt(self, node: Node, cmd: str) -> str:
        values = {
            "name": node.name, "host": node.host, "pid": node.current_pid() or "",
            "confdir": node.confdir or "", "ret_port": node.ret_port or "",
            "publish_port": node.publish_port or "",
        }
        try:
            return cmd.format_map(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise DrillError(f"command for {node.name} has a bad placeholder ({exc}): "
                             f"{cmd}") from None

    def run_command(self, node: Node, which: str) -> None:
        cmd = self._fmt(node, node.commands[which])
        self.say(f"{which} {node.name}: $ {cmd}")
        try:
            res = subprocess.run(["sh", "-c", cmd], capture_output=True,
                                 text=True, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DrillError(f"`{cmd}` ({which} {node.name}) did not finish in "
                             f"{COMMAND_TIMEOUT:.0f} s") from None
        if res.returncode != 0:
            raise DrillError(f"`{cmd}` ({which} {node.name}) exited {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[-500:]}")

    def _signal(self, node: Node, sig: int) -> int | None:
        pid = node.current_pid()
        if not pid or not _pid_alive(pid):
            return None
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return pid

    def _signal_and_wait(self, node: Node, sig: int, wait: float = 15.0) -> None:
        if self.cluster is not None and node.local_entry is not None:
            self.cluster.stop(node.local_entry, sig, wait=wait)
            return
        pid = self._signal(node, sig)
        if pid is None:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _pid_alive(pid):
            _reap(pid)
            time.sleep(0.05)
        if _pid_alive(pid):
            raise DrillError(f"{node.name} (pid {pid}) still running {wait:.0f} s "
                             f"after signal {sig}")

    def is_up(self, node: Node) -> bool:
        pid = node.current_pid()
        return bool(pid) and _pid_alive(pid)

    # -- masters and minions ----------------------------------------------------------------------

    def start(self, node: Node) -> None:
        """Start ``node`` (idempotent); for a local master, return once its CLI socket answers."""
        if "start" in node.commands:
            self.run_command(node, "start")
        elif self.cluster is not None and node.local_entry is not None:
            if self.is_up(node):
                return
            self.say(f"start {node.name}")
            self.cluster._start(node.local_entry, node.kind)
        else:
            raise DrillError(f"no way to start {node.name}: give commands.start")
        if node.kind == "master" and node.exec is None and node.confdir:
            wait_master_socket(node, 30.0, lambda: node.local_entry is None or self.is_up(node))

    def kill(self, node: Node) -> Undo:
        u = self.push(f"start {node.name} (after kill)", lambda: self.start(node))
        if "kill" in node.commands:
            self.run_command(node, "kill")
        else:
            self.say(f"kill -9 {node.name} (pid {node.current_pid()})")
            self._signal_and_wait(node, signal.SIGKILL)
        return u

    def stop(self, node: Node) -> Undo:
        u = self.push(f"start {node.name} (after stop)", lambda: self.start(node))
        self.stop_only(node)
        return u

    def stop_only(self, node: Node) -> None:
        if "stop" in node.commands:
            self.run_command(node, "stop")
        else:
            self.say(f"stop {node.name} (SIGTERM to pid {node.current_pid()})")
            self._signal_and_wait(node, signal.SIGTERM)

    def freeze(self, node: Node) -> Undo:
        u = self.push(f"thaw {node.name}", lambda: self.thaw(node))
        if "freeze" in node.commands:
            self.run_command(node, "freeze")
        else:
            self.say(f"freeze {node.name} (SIGSTOP to pid {node.current_pid()})")
            if self._signal(node, signal.SIGSTOP) is None:
                raise DrillError(f"{node.name} is not running; nothing to freeze")
        return u

    def thaw(self, node: Node) -> None:
        if "thaw" in node.commands:
            self.run_command(node, "thaw")
        else:
            self._signal(node, signal.SIGCONT)

    # -- partition --------------------------------------------------------------------------------

    def _rules(self, node: Node) -> list[list[str]]:
        rules = []
        for port in (node.ret_port, node.publish_port):
            if not port:
                continue
            for direction in ("--dport", "--sport"):
                rules.append(["INPUT", "-i", "lo", "-p", "tcp", direction, str(port),
                              "-m", "comment", "--comment", f"{RULE_COMMENT}:{node.name}", "-j",
                              "DROP"])
        return rules

    def isolate(self, node: Node) -> Undo:
        u = self.push(f"heal {node.name} (remove its iptables rules)", lambda: self.heal(node))
        if "isolate" in node.commands:
            self.run_command(node, "isolate")
            return u
        ipt = shutil.which("iptables")
        if ipt is None:
            raise DrillError("partition needs iptables here (`apt-get install -y iptables`) or "
                             "isolate/heal commands")
        self.say(f"isolate {node.name}: drop loopback tcp to/from ports {node.ret_port}, "
                 f"{node.publish_port}")
        for rule in self._rules(node):
            res = subprocess.run([ipt, "-I", *rule], capture_output=True, text=True)
            if res.returncode != 0:
                raise DrillError(f"iptables -I {' '.join(rule)} failed: {res.stderr.strip()}")
        return u

    def heal(self, node: Node) -> None:
        if "heal" in node.commands:
            self.run_command(node, "heal")
            return
        ipt = shutil.which("iptables")
        if ipt is None:
            return
        for rule in self._rules(node):
            for _ in range(10):  # delete every copy
                if subprocess.run([ipt, "-D", *rule], capture_output=True).returncode != 0:
                    break

    # -- leader-partition: the victim's process cut off minions *and* the store --------------------

    def isolate_process(self, node: Node) -> Undo:
        """Cut ``node`` off everything (``leader-partition``); with ``commands.isolate`` that
        command.

        Locally: the minion-facing port rules of :meth:`isolate`, plus a DROP of every packet the
        victim's processes send on ``lo`` (``iptables -m cgroup --path``: its process group is moved
        into a cgroup v2 made for the drill), so it cannot renew its lease with etcd or reach a
        peer either. The undo moves the processes back, deletes the rules and the cgroup.
        """
        if "isolate" in node.commands:
            return self.isolate(node)
        ipt = shutil.which("iptables")
        if ipt is None:
            raise DrillError("leader-partition needs iptables here (`apt-get install -y iptables`) "
                             "or isolate/heal commands")
        root = _cgroup2_root()
        pid = node.current_pid()
        if not pid or not _pid_alive(pid):
            raise DrillError(f"{node.name} is not running; nothing to isolate")
        rel = f"hamaster-drill-{node.name}-{os.getpid()}"
        moved: dict[int, str] = {}
        tag = ["-m", "comment", "--comment", f"{RULE_COMMENT}:{node.name}", "-j", "DROP"]
        rules = [["OUTPUT", "-o", "lo", "-m", "cgroup", "--path", rel, *tag]]

        def undo() -> None:
            self.heal(node)
            for rule in rules:
                for _ in range(10):
                    if subprocess.run([ipt, "-D", *rule], capture_output=True).returncode != 0:
                        break
            for p, orig in moved.items():
                try:
                    Path(root, orig.lstrip("/"), "cgroup.procs").write_text(str(p))
                except OSError:  # gone (killed meanwhile): nothing to move back
                    pass
            try:
                os.rmdir(os.path.join(root, rel))
            except FileNotFoundError:
                pass

        u = self.push(f"heal {node.name} (iptables rules, cgroup {rel})", undo)
        os.makedirs(os.path.join(root, rel), exist_ok=True)
        group = _process_group(pid)
        for p in group:
            orig = _cgroup2_of(p)
            if orig is None:
                continue
            moved[p] = orig
            try:
                Path(root, rel, "cgroup.procs").write_text(str(p))
            except OSError as exc:
                raise DrillError(f"cannot move pid {p} into cgroup {rel}: {exc}") from None
        # A socket keeps the cgroup it was created in: the connections the victim already has
        # (its etcd client's, above all) are cut by their local port, both ways.
        own = {node.ret_port, node.publish_port}
        ports = sorted(_tcp_ports_of(group) - own)
        for port in ports:
            rules.append(["OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(port), *tag])
            rules.append(["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), *tag])
        rules.extend(self._rules(node))   # undo() deletes these through heal() too: harmless
        # All at once (one iptables-restore commit): a leader cut off minions a moment before the
        # store would still claim reactions whose publishes reach no one.
        script = "*filter\n" + "".join(f"-I {' '.join(r)}\n" for r in rules) + "COMMIT\n"
        restore = shutil.which("iptables-restore")
        if restore is None:
            raise DrillError("leader-partition needs iptables-restore (package iptables)")
        self.say(f"isolate {node.name}: drop loopback tcp to/from ports {node.ret_port}, "
                 f"{node.publish_port}, its {len(ports)} open connection(s) by local port and "
                 f"every packet pid {pid}'s process group sends (cgroup {rel}), in one "
                 f"iptables-restore")
        res = subprocess.run([restore, "--noflush"], input=script, capture_output=True, text=True)
        if res.returncode != 0:
            raise DrillError(f"iptables-restore --noflush failed: {res.stderr.strip()}\n{script}")
        return u

    # -- backend ----------------------------------------------------------------------------------

    def ha_dir(self) -> str:
        if self.drill.backend.get("dir"):
            return self.drill.backend["dir"]
        from hamaster.config import load_master_config
        from hamaster.store.base import StoreError
        from hamaster.store.registry import backend_of

        dirs = set()
        for m in self.drill.masters:
            if not m.confdir:
                continue
            opts = load_master_config(m.confdir)
            try:
                shared = backend_of(opts).SHARED_DIR
            except StoreError:
                shared = False
            if not shared or not opts.get("ha_dir"):
                raise DrillError(f"{m.name} is not on an fs ha_dir; give backend "
                                 f"stop/start commands")
            dirs.add(os.path.realpath(opts["ha_dir"]))
        if len(dirs) != 1:
            raise DrillError(f"masters do not share one ha_dir ({sorted(dirs)}); give backend.dir")
        return dirs.pop()

    def lost_services(self) -> list[dict]:
        """The cluster.json entries of what backend-loss stops (etcd members or one rsync daemon).

        ``leader`` / ``follower`` among the etcd members are resolved the first time (just before
        the loss) and kept.
        """
        if self._lost is not None:
            return self._lost
        d = self.drill
        if d.backend_mode == "etcd":
            names = self._resolve_etcd_roles(d.etcd_members)
        elif d.backend_mode == "rsync":
            names = [e["name"] for e in self.service_entries.values()
                     if e.get("kind") == "rsyncd" and e.get("master") == d.rsync_daemon]
        else:
            return []
        missing = [n for n in names if n not in self.service_entries]
        if missing or not names:
            raise DrillError(f"{', '.join(missing) or d.rsync_daemon}: not in "
                             f"{d.cluster_dir}/cluster.json services")
        self._lost = [self.service_entries[n] for n in names]
        return self._lost

    def _resolve_etcd_roles(self, names: list[str]) -> list[str]:
        if not any(n in ETCD_ROLES for n in names):
            return list(names)
        from hamaster.cluster_services import etcd_leader

        members = [e for e in self.service_entries.values() if e.get("kind") == "etcd"]
        leader_ep = etcd_leader([e["endpoint"] for e in members])
        leader = next((e["name"] for e in members if e["endpoint"] == leader_ep), None)
        if leader is None:
            raise DrillError("no etcd leader right now: is the cluster's etcd healthy?")
        taken = {n for n in names if n not in ETCD_ROLES}
        out = []
        for n in names:
            if n == "leader":
                n = leader
            elif n == "follower":
                n = next(
                    (e["name"] for e in members if e["name"] != leader and e["name"] not in taken),
                    "")
                if not n:
                    raise DrillError("no follower left to stop")
            if n in out:
                raise DrillError(f"backend.etcd_members names {n} twice (the leader is {leader})")
            taken.add(n)
            out.append(n)
        self.say(f"etcd leader is {leader}: stopping {', '.join(out)}")
        return out

    def _services_down(self, entries: list[dict]) -> Undo:
        assert self.cluster is not None
        names = ", ".join(e["name"] for e in entries)
        stopped = [e["name"] for e in self.service_entries.values()
                   if e.get("kind") == entries[0].get("kind") and not self.cluster.alive(e)]
        if stopped:
            raise DrillError(f"{', '.join(stopped)} already stopped: start the cluster's backend "
                             f"before drilling it")
        u = self.push(f"start {names} (after backend loss)", lambda: self._services_up(entries))
        sig = signal.SIGKILL if self.drill.backend_signal == "KILL" else signal.SIGTERM
        for e in entries:
            self.say(f"backend loss: {'kill -9' if sig == signal.SIGKILL else 'stop (SIGTERM)'} "
                     f"{e['name']} (pid {e.get('pid')})")
            self.cluster.stop(e, sig)
        return u

    def _services_up(self, entries: list[dict]) -> None:
        """Start what backend-loss stopped; return once each serves again (etcd: a quorum read)."""
        assert self.cluster is not None
        names = ", ".join(e["name"] for e in entries)
        self.say(f"start {names}")
        try:
            took = self.cluster.start_services(entries, timeout=COMMAND_TIMEOUT / 2)
        except RuntimeError as exc:
            raise DrillError(str(exc)) from None
        self.say(f"{names} serving again {took:.2f} s after the start")

    def backend_down(self) -> Undo:
        be = self.drill.backend
        if self.drill.backend_mode in ("etcd", "rsync"):
            return self._services_down(self.lost_services())
        if "stop" in be:
            u = self.push("start the backend", self.backend_up)
            self.say(f"backend stop: $ {be['stop']}")
            res = subprocess.run(["sh", "-c", be["stop"]], capture_output=True,
                                 text=True, timeout=COMMAND_TIMEOUT)
            if res.returncode != 0:
                raise DrillError(f"backend stop exited {res.returncode}: "
                                 f"{res.stderr.strip()[-500:]}")
            return u
        path = self.ha_dir()
        away = f"{path}.drill-away"
        if os.path.exists(away):
            raise DrillError(f"{away} exists (a previous drill did not finish?): move it "
                             f"back to {path} first")
        u = self.push(f"move {away} back to {path}", lambda: self._move_back(path, away))
        self.say(f"backend loss: rename {path} -> {away}")
        os.rename(path, away)
        return u

    def _move_back(self, path: str, away: str) -> None:
        if os.path.exists(away) and not os.path.exists(path):
            os.rename(away, path)
        elif os.path.exists(away):
            raise DrillError(f"both {path} and {away} exist: merge by hand")

    def backend_up(self) -> None:
        be = self.drill.backend
        res = subprocess.run(["sh", "-c", be["start"]], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT)
        if res.returncode != 0:
            raise DrillError(f"backend start exited {res.returncode}: {res.stderr.strip()[-500:]}")

    # -- minions ----------------------------------------------------------------------------------

    def stop_minions(self, nodes: list[Node]) -> Undo:
        """Stop every minion at once (in parallel); the undo starts every one at once."""
        u = self.push("start every minion", lambda: self.start_all(nodes))
        self._parallel(nodes, self.stop_only)
        return u

    def start_all(self, nodes: list[Node]) -> None:
        self._parallel(nodes, self.start)

    @staticmethod
    def _parallel(nodes: list[Node], fn: Callable[[Node], None]) -> None:
        errors: list[str] = []

        def one(n: Node) -> None:
            try:
                fn(n)
            except Exception as exc:
                errors.append(f"{n.name}: {exc}")

        threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise DrillError("; ".join(errors))


def _cgroup2_root() -> str:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or ``…/unified``)."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return left.split()[4]
    except OSError:
        pass
    raise DrillError("leader-partition needs a cgroup v2 hierarchy (none mounted) or "
                     "isolate/heal commands")


def _cgroup2_of(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (``0::<path>`` in /proc/PID/cgroup), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        return None
    return "/"


def _tcp_ports_of(pids: list[int]) -> set[int]:
    """Local TCP ports of the sockets the processes ``pids`` hold (listening ones included)."""
    inodes: set[str] = set()
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def _process_group(pid: int) -> list[int]:
    """``pid`` and every live process in its process group."""
    out = [pid]
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def wait_master_socket(node: Node, timeout: float, running: Callable[[], bool]) -> None:
    """Wait until the local master's CLI socket accepts a connection (a stale file does not
    count)."""
    from hamaster.config import load_master_config
    from hamaster.localapi import LocalApiError, LocalClient

    sock_dir = load_master_config(node.confdir)["sock_dir"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            raise DrillError(f"{node.name} exited right after start; see its log "
                             f"({node.log or 'its log_file'})")
        try:
            LocalClient(sock_dir, timeout=1).close()
            return
        except LocalApiError:
            time.sleep(0.05)
    raise DrillError(f"{node.name} did not open its CLI socket within {timeout:.0f} s")
