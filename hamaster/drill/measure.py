"""What a drill measures: pings through the survivors, a tracked job, detection, recovery, keys.

Masters are reached through their CLI socket (:class:`hamaster.localapi.LocalClient`) when they
run here, or by running the hamaster CLIs through the master's ``exec`` prefix (``ssh host``)
otherwise. Pings target the drill's minions by list (never ``*``), so a throwaway key or an
unrelated minion never makes a ping wait for its timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hamaster.drill import DrillError
from hamaster.drill.spec import Node

_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


class MasterApi:
    """One master's CLI surface: ping, publish, runners, hamaster-key."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.sock_dir: str | None = None
        if node.exec is None:
            from hamaster.config import load_master_config

            self.sock_dir = load_master_config(node.confdir)["sock_dir"]

    def _cli(self, prog: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [prog]
        if self.node.confdir:
            argv += ["-c", self.node.confdir]
        argv += list(args)
        if self.node.exec is not None:
            argv = [*self.node.exec, *argv]
        else:
            argv[0] = _bin(prog)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout} s")

    def ping(self, ids: list[str], timeout: float, why: list[str] | None = None) -> set[str]:
        """``test.ping`` to ``ids`` through this master; the ids that answered True.

        When ``why`` is given, the reasons for ids that did not answer are appended to it
        (not targeted by the master, an answer other than True, an error, the timeout).
        """
        why = why if why is not None else []
        if self.sock_dir is None:
            res = self._cli("hamaster", "-t", str(timeout), "--gather-job-timeout",
                            "0",  # no probes
                            "--out", "json", "--static", "-L", ",".join(ids),
                            "test.ping", timeout=timeout + 30)
            try:
                got = json.loads(res.stdout) if res.stdout.strip() else {}
            except json.JSONDecodeError:
                why.append(f"hamaster exit {res.returncode}: {res.stderr.strip()[-200:]}")
                return set()
            bad = {k: v for k, v in got.items() if v is not True}
            if bad:
                why.append(f"answers: {str(bad)[:300]}")
            return {k for k, v in got.items() if v is True}
        from hamaster.localapi import LocalApiError, LocalClient

        got: set[str] = set()
        t0 = time.monotonic()
        try:
            with LocalClient(self.sock_dir, timeout=timeout + 5) as c:
                c.send({"cmd": "publish", "tgt": list(ids), "tgt_type": "list", "fun": "test.ping",
                        "arg": [],
                        "timeout": timeout})
                pub = c.recv()
                if not pub.get("jid"):
                    why.append(f"not published: {pub.get('error')}")
                    return set()
                untargeted = sorted(set(ids) - set(pub.get("minions") or []))
                if untargeted:
                    why.append(f"job {pub['jid']}: the master did not target "
                               f"{', '.join(untargeted)}")
                for msg in c.stream():
                    for mid, ret in (msg.get("ret") or {}).items():
                        if isinstance(ret, dict) and ret.get("return") is True:
                            got.add(mid)
                        else:
                            why.append(f"job {pub['jid']}: {mid} answered {str(ret)[:200]}")
                    if msg.get("done") and msg.get("missing"):
                        why.append(f"job {pub['jid']}: no answer from {', '.join(msg['missing'])} "
                                   f"within {time.monotonic() - t0:.2f} s")
        except (LocalApiError, OSError) as exc:
            why.append(f"local API error after {time.monotonic() - t0:.2f} s: {exc}")
        return got

    def publish_async(self, ids: list[str], fun: str, arg: list) -> dict:
        """Publish without waiting: ``{"jid", "minions"}`` (``jid`` None when nothing matched)."""
        if self.sock_dir is None:
            res = self._cli("hamaster", "--async", "-L", ",".join(ids), fun, *[str(a) for a in arg])
            m = re.search(r"job ID: (\d+)", res.stdout)
            return {"jid": m.group(1) if m else None, "minions": list(ids) if m else []}
        from hamaster.localapi import LocalApiError, LocalClient

        try:
            with LocalClient(self.sock_dir, timeout=10) as c:
                c.send({"cmd": "publish", "tgt": list(ids), "tgt_type": "list", "fun": fun,
                        "arg": arg,
                        "wait": False})
                return c.recv()
        except (LocalApiError, OSError) as exc:
            return {"jid": None, "minions": [], "error": str(exc)}

    def runner(self, fun: str, *args: str, timeout: float = 10) -> Any:
        """Call a runner; raises :class:`DrillError` when the master cannot answer."""
        if self.sock_dir is None:
            res = self._cli("hamaster-run", "--out", "json", fun, *args, timeout=timeout)
            if res.returncode != 0:
                raise DrillError(f"hamaster-run {fun} on {self.name}: {res.stderr.strip()}")
            return json.loads(res.stdout or "null")
        from hamaster.localapi import LocalApiError, LocalClient

        try:
            with LocalClient(self.sock_dir, timeout=timeout) as c:
                return c.call({"cmd": "runner", "fun": fun, "arg": list(args),
                               "kwarg": {}}).get("return")
        except (LocalApiError, OSError) as exc:
            raise DrillError(f"{fun} on {self.name}: {exc}") from None

    def key(self, *args: str) -> subprocess.CompletedProcess:
        """Run ``hamaster-key`` against this master (as an operator would)."""
        return self._cli("hamaster-key", *args)

    def sees_key(self, kid: str) -> bool:
        """Whether this master's in-memory view has ``kid`` accepted (a publish to it matches)."""
        return kid in (self.publish_async([kid], "test.ping", []).get("minions") or [])

    def leader(self) -> tuple[str | None, int]:
        """``(holder, epoch)`` of the leader lease in this master's ``cluster.status``."""
        st = self.runner("cluster.status")
        rec = st.get("leader") if isinstance(st, dict) else None
        if not isinstance(rec, dict):
            return None, 0
        return (rec.get("leader") or None), int(rec.get("epoch") or 0)

    def call(self, ids: list[str], fun: str, arg: list, timeout: float) -> dict:
        """Publish ``fun`` to ``ids`` and wait for the returns: ``{id: return}``."""
        if self.sock_dir is None:
            res = self._cli("hamaster", "-t", str(timeout), "--out", "json", "--static", "-L",
                            ",".join(ids),
                            fun, *[a if isinstance(a, str) else json.dumps(a) for a in arg],
                            timeout=timeout + 30)
            try:
                got = json.loads(res.stdout) if res.stdout.strip() else {}
            except json.JSONDecodeError:
                raise DrillError(f"{fun} through {self.name}: "
                                 f"{res.stderr.strip()[-300:]}") from None
            return got if isinstance(got, dict) else {}
        from hamaster.localapi import LocalApiError, LocalClient

        out: dict = {}
        try:
            with LocalClient(self.sock_dir, timeout=timeout + 5) as c:
                c.send({"cmd": "publish", "tgt": list(ids), "tgt_type": "list", "fun": fun,
                        "arg": arg,
                        "timeout": timeout})
                pub = c.recv()
                if not pub.get("jid"):
                    raise DrillError(f"{fun} through {self.name} not published: {pub.get('error')}")
                for msg in c.stream():
                    for mid, ret in (msg.get("ret") or {}).items():
                        out[mid] = ret.get("return") if isinstance(ret, dict) else ret
        except (LocalApiError, OSError) as exc:
            raise DrillError(f"{fun} through {self.name}: {exc}") from None
        return out

    def status_of(self, master_id: str) -> tuple[bool | None, bool | None]:
        """``(alive, store_ok)`` of ``master_id`` in this master's ``cluster.status``."""
        st = self.runner("cluster.status")
        if not isinstance(st, dict):
            return None, None
        rec = (st.get("masters") or {}).get(master_id)
        alive = bool(rec.get("alive")) if isinstance(rec, dict) else False
        return alive, st.get("store_ok")


class Pinger(threading.Thread):
    """Keeps pinging every minion through the masters it is told are up; counts failures."""

    def __init__(self, apis: list[MasterApi], ids: list[str],
                 timeout: float, interval: float) -> None:
        super().__init__(name="drill-pinger", daemon=True)
        self.apis = apis
        self.ids = ids
        self.timeout = timeout
        self.interval = interval
        self.excluded: set[str] = set()
        self.paused = False
        self.lock = threading.Lock()  # held for a whole round: exclude() waits for it
        self._stop_evt = threading.Event()
        self.rounds: list[dict] = []
        self.t0 = time.monotonic()

    def exclude(self, *names: str) -> None:
        """Stop pinging through ``names`` (returns once no ping through them is in flight)."""
        with self.lock:
            self.excluded |= set(names)

    def include(self, *names: str) -> None:
        with self.lock:
            self.excluded -= set(names)

    def pause(self, paused: bool = True) -> None:
        with self.lock:
            self.paused = paused

    def run(self) -> None:
        while not self._stop_evt.is_set():
            with self.lock:
                if not self.paused:
                    for api in self.apis:
                        if api.name in self.excluded:
                            continue
                        t = time.monotonic()
                        why: list[str] = []
                        ok = api.ping(self.ids, self.timeout, why)
                        missing = sorted(set(self.ids) - ok)
                        rnd = {"t": round(t - self.t0, 3), "master": api.name, "missing": missing,
                               "took_s": round(time.monotonic() - t, 3)}
                        if missing:
                            rnd["why"] = why
                        self.rounds.append(rnd)
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=self.timeout + 15)

    @property
    def sent(self) -> int:
        return len(self.rounds) * len(self.ids)

    @property
    def failed(self) -> int:
        return sum(len(r["missing"]) for r in self.rounds)

    def failures(self) -> list[dict]:
        return [r for r in self.rounds if r["missing"]]


class StoreSampler(threading.Thread):
    """Samples ``store_ok`` of every master from its own ``cluster.status`` while a backend is
    lost."""

    def __init__(self, apis: list[MasterApi], interval: float = 0.25) -> None:
        super().__init__(name="drill-store-sampler", daemon=True)
        self.apis = apis
        self.interval = interval
        self.t0 = time.monotonic()
        self.samples: list[dict] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            for api in self.apis:
                try:
                    _, ok = api.status_of(api.name)
                except DrillError:
                    ok = None
                self.samples.append({"t": round(time.monotonic() - self.t0, 3),
                                     "master": api.name, "store_ok": ok})
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling now; a status call still in flight (a store timing out) is not waited
        for."""
        self.stopped_at = round(time.monotonic() - self.t0, 3)
        self._stop_evt.set()
        self.join(timeout=0.5)

    def taken(self) -> list[dict]:
        """The samples taken before :meth:`stop`."""
        end = getattr(self, "stopped_at", None)
        return [s for s in list(self.samples) if end is None or s["t"] <= end]

    def errors(self, masters: set[str]) -> list[dict]:
        """Samples of ``masters`` that did not report ``store_ok: true`` (false, or no answer)."""
        return [s for s in self.taken() if s["master"] in masters and s["store_ok"] is not True]


class LogWatcher:
    """Finds when each minion logged a line (e.g. "<host:port> stopped answering")."""

    def __init__(self, minions: list[Node]) -> None:
        self.offsets: dict[str, int] = {}
        self.paths = {n.name: n.log for n in minions if n.log}
        for name, path in self.paths.items():
            try:
                self.offsets[name] = os.path.getsize(path)
            except OSError:
                self.offsets[name] = 0
        self.found: dict[str, float] = {}

    def scan(self, needle: str) -> dict[str, float]:
        """Wall-clock time of the first line containing ``needle`` per minion (since creation)."""
        for name, path in self.paths.items():
            if name in self.found:
                continue
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[name])
                    data = fh.read().decode("utf-8", "replace")
            except OSError:
                continue
            for line in data.splitlines():
                if needle in line:
                    m = _LOG_TS.match(line)
                    ts = time.time()
                    if m:
                        try:
                            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                        except ValueError:
                            pass
                    self.found[name] = ts
                    break
        return dict(self.found)


def wait_for(cond: Callable[[], Any],
             timeout: float, interval: float = 0.1) -> tuple[Any, float | None]:
    """Poll ``cond`` until truthy: ``(value, seconds taken)`` or ``(last value, None)`` at the
    deadline."""
    t0 = time.monotonic()
    last: Any = None
    while True:
        try:
            last = cond()
        except DrillError:
            last = None
        if last:
            return last, time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            return last, None
        time.sleep(interval)


def time_until_all_answer(api: MasterApi, ids: list[str], timeout: float,
                          ping_timeout: float = 1.0) -> float | None:
    """Seconds until one ping through ``api`` is answered by every id (None at the deadline)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ok = api.ping(ids, ping_timeout)
        if set(ids) <= ok:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def lookup_returns(api: MasterApi, jid: str, ids: list[str], timeout: float,
                   errors: list[str] | None = None) -> dict:
    """``jobs.lookup_jid`` through ``api`` until every id has a return or the deadline.

    A lookup the master answers with an error is retried; the errors go to ``errors``.
    """
    got: dict = {}

    def have_all() -> bool:
        nonlocal got
        try:
            res = api.runner("jobs.lookup_jid", jid)
        except DrillError as exc:
            if errors is not None:
                errors.append(str(exc))
            raise
        got = res if isinstance(res, dict) else {}
        return set(ids) <= set(got)

    wait_for(have_all, timeout, interval=0.25)
    return got


def stage_pending_key(master: Node, kid: str) -> None:
    """Put a throwaway minion key in the pending state, as an unknown minion's auth does."""
    from hamaster.config import load_master_config
    from hamaster.master.shared import open_shared_state
    from hamaster.pki_sync.keys import generate_keypair

    _, pub = generate_keypair()
    keys = open_shared_state(load_master_config(master.confdir)).keys
    keys.authorize(kid, pub)
    keys.load()
    from hamaster.pki_sync.keys import KeyState

    if kid not in keys.list_keys().get(KeyState.PENDING, []):
        raise DrillError(f"could not stage the pending key {kid} (auto_accept or autosign on?)")


# -- leader drills: numbered events, the reactions they caused, the schedule's jids ----------------


class EventFirer(threading.Thread):
    """Fires ``<prefix>/<nonce>`` events with data ``{"n": i}`` at one minion, every ``interval``
    seconds, as published ``event.send`` jobs through the masters it is told are up (in turn)."""

    def __init__(self, apis: list[MasterApi], minion: str, tag: str, interval: float) -> None:
        super().__init__(name="drill-event-firer", daemon=True)
        self.apis = apis
        self.minion = minion
        self.tag = tag
        self.interval = interval
        self.fired: list[int] = []        # n published (the minion was targeted)
        self.errors: list[str] = []       # publishes that failed (n not counted as fired)
        self._next = 0
        self._stop_evt = threading.Event()
        self._lock = threading.Lock()

    def fire_one(self) -> int | None:
        """Fire the next number now; returns it, or None if no master published it."""
        with self._lock:
            n = self._next
            self._next += 1
        for k in range(len(self.apis)):
            api = self.apis[(n + k) % len(self.apis)]
            pub = api.publish_async([self.minion], "event.send", [self.tag, {"n": n}])
            if pub.get("jid") and self.minion in (pub.get("minions") or [self.minion]):
                self.fired.append(n)
                return n
            self.errors.append(f"n={n} through {api.name}: "
                               f"{pub.get('error') or 'minion not targeted'}")
        return None

    def run(self) -> None:
        t_next = time.monotonic()
        while not self._stop_evt.is_set():
            self.fire_one()
            t_next += self.interval
            self._stop_evt.wait(max(0.0, t_next - time.monotonic()))

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=30)


def reactions_seen(api: MasterApi, minion: str, path: str,
                   nonce: int, timeout: float = 15) -> list[int]:
    """The numbers the drill reactor appended for ``nonce`` to ``path`` on ``minion`` (one entry per
    line: a number twice means it was reacted to twice); read with ``cmd.run grep`` through
    ``api``."""
    import shlex

    got = api.call([minion], "cmd.run",
                   [f"grep '^{int(nonce)} ' {shlex.quote(path)} || true"], timeout)
    if minion not in got:
        raise DrillError(f"{minion} did not answer cmd.run (reading {path}) through {api.name}")
    text = got[minion]
    if not isinstance(text, str):
        raise DrillError(f"reading {path} on {minion}: {str(text)[:300]}")
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == str(nonce) and parts[1].lstrip("-").isdigit():
            out.append(int(parts[1]))
    return out


def jid_slot(jid: str) -> int | None:
    """The UTC second a schedule jid names (its first 14 digits), None if it is not one."""
    import calendar

    try:
        return calendar.timegm(time.strptime(str(jid)[:14], "%Y%m%d%H%M%S"))
    except ValueError:
        return None


def schedule_jids(api: MasterApi, marker: str, since: float, until: float) -> dict[int, list[str]]:
    """``{slot: [jid, ...]}`` of the drill schedule's jobs (``test.echo <marker>``) in the job cache
    whose slot is in ``[since, until]`` (wall clock)."""
    jobs = api.runner("jobs.list_jobs", timeout=30)
    out: dict[int, list[str]] = {}
    for jid, rec in (jobs or {}).items():
        if not isinstance(rec, dict) or rec.get("Function") != "test.echo":
            continue
        if marker not in [str(a) for a in rec.get("Arguments") or []]:
            continue
        slot = jid_slot(jid)
        if slot is not None and since <= slot <= until:
            out.setdefault(slot, []).append(str(jid))
    return out
