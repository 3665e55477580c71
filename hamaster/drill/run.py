"""Run a drill: preflight, break, measure, restore, check the objectives; a table and JSON.

Exit status of :func:`run_drill`'s caller: 0 every objective met, 1 an objective missed,
2 bad drill file, 3 the drill could not run (cluster unhealthy before it, a command failed),
130 interrupted (everything it broke was restored first).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from hamaster.drill import DrillError
from hamaster.drill.actions import Actions, Undo
from hamaster.drill.measure import (
    EventFirer,
    LogWatcher,
    MasterApi,
    Pinger,
    StoreSampler,
    lookup_returns,
    reactions_seen,
    schedule_jids,
    stage_pending_key,
    time_until_all_answer,
    wait_for,
)
from hamaster.drill.spec import LEADER_SCENARIOS, LEADER_VICTIM, SCENARIOS, Drill, Node
from hamaster.pki_sync.confirm import EXIT_UNCONFIRMED as KEY_UNCONFIRMED

OBJECTIVE_MEASURE = {
    "max_failed_pings": "failed_pings",
    "max_detect_s": "detect_s",
    "max_recovery_s": "recovery_s",
    "max_lost_results": "lost_results",
    "key_change_visible": "key_change_visible",
    "key_change_refused": "key_change_refused",
    "max_store_errors": "store_errors",
    "duplicate_reactions": "duplicate_reactions",
    "missed_reactions": "missed_reactions",
    "duplicate_schedule_runs": "duplicate_schedule_runs",
    "leader_failover_s": "leader_failover_s",
}


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP during the drill."""


class DrillRun:
    """One execution of a drill."""

    def __init__(self, drill: Drill, progress: Callable[[str], None] | None = None) -> None:
        self.d = drill
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.events: list[dict] = []
        self.notes: list[str] = []
        self.measured: dict[str, Any] = {}
        self._progress = progress or (lambda s: print(s, file=sys.stderr, flush=True))
        self.actions = Actions(drill, self.say)
        self.apis = {m.name: MasterApi(m) for m in drill.masters}
        self.ids = [n.name for n in drill.minions]
        self.pinger: Pinger | None = None
        self.kid: str | None = None

    def say(self, msg: str) -> None:
        t = time.monotonic() - self.t0
        self.events.append({"t": round(t, 3), "event": msg})
        self._progress(f"[{t:7.2f}] {msg}")

    # -- framework --------------------------------------------------------------------------------

    def execute(self) -> dict:
        """Run the drill; always restore; return the result document."""
        aborted: str | None = None
        interrupted = False

        def on_signal(signum: int, _frame: Any) -> None:
            raise Interrupted(signal.Signals(signum).name)

        def while_restoring(signum: int, _frame: Any) -> None:
            self._progress(f"{signal.Signals(signum).name}: restoring what the drill "
                           f"changed, please wait")

        sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        old = {s: signal.signal(s, on_signal) for s in sigs}
        problems: list[str] = []
        try:
            self.say(f"drill {self.d.name!r}: scenario {self.d.scenario}, {len(self.d.masters)} "
                     f"masters, {len(self.ids)} minions")
            self.preflight()
            getattr(self, "sc_" + self.d.scenario.replace("-", "_"))()
        except Interrupted as exc:
            interrupted = True
            aborted = f"interrupted ({exc})"
            self.say(f"{aborted}: restoring")
        except DrillError as exc:
            aborted = str(exc)
            self.say(f"drill aborted: {exc}")
        finally:
            for s in sigs:
                signal.signal(s, while_restoring)
            try:
                # Pings measure the failure and the recovery, not the drill's own clean-up:
                # deleting the throwaway key rotates the publish key by design (every minion
                # re-authenticates), and post_check proves afterwards that every minion answers.
                if self.pinger is not None:
                    self.pinger.stop()
                problems = self.actions.restore_all()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        if self.pinger is not None:
            self.measured["pings_sent"] = self.pinger.sent
            self.measured.setdefault("failed_pings", self.pinger.failed)
            self.measured["ping_failures"] = self.pinger.failures()[:50]
        if not interrupted:
            self.post_check()
        return self.result(aborted, interrupted, problems)

    def preflight(self) -> None:
        for m in self.d.masters:
            try:
                self.apis[m.name].runner("cluster.status")
            except DrillError as exc:
                raise DrillError(f"preflight: master {m.name} does not answer: {exc}") from None
        for m in self.d.masters:
            took = time_until_all_answer(self.apis[m.name], self.ids, self.d.preflight_timeout_s)
            if took is None:
                raise DrillError(f"preflight: not every minion answers through {m.name} "
                                 f"within {self.d.preflight_timeout_s:.0f} s; fix the "
                                 f"cluster before drilling it")
        self.say(f"preflight: every minion answers through every master ({', '.join(self.apis)})")
        if self.d.key_change:
            self.stage_key()

    def post_check(self) -> None:
        ok = True
        for m in self.d.masters:
            took = time_until_all_answer(self.apis[m.name], self.ids, self.d.preflight_timeout_s)
            if took is None:
                ok = False
                self.notes.append(f"after the drill, not every minion answers through {m.name}")
        self.measured["healthy_after"] = ok
        self.say("after the drill: every minion answers through every master" if ok
                 else "after the drill: the cluster is NOT healthy")

    # -- building blocks --------------------------------------------------------------------------

    def start_pinger(self, exclude: set[str]) -> Pinger:
        self.pinger = Pinger(list(self.apis.values()), self.ids,
                             self.d.ping_timeout_s, self.d.ping_interval_s)
        self.pinger.excluded = set(exclude)
        self.pinger.start()
        return self.pinger

    def track_job(self, via: MasterApi) -> str:
        pub = via.publish_async(self.ids, "test.sleep", [self.d.job_sleep_s])
        if not pub.get("jid"):
            raise DrillError(f"could not publish the tracked job through {via.name}: "
                             f"{pub.get('error')}")
        self.say(f"tracked job {pub['jid']} (test.sleep {self.d.job_sleep_s:g}) published "
                 f"through {via.name}")
        time.sleep(min(1.0, self.d.job_sleep_s / 2))  # let the minions start it before the failure
        return pub["jid"]

    def count_lost(self, jid: str, via: MasterApi) -> list[str]:
        """Results of the tracked job missing through ``via``; returns the lookups that failed."""
        errors: list[str] = []
        got = lookup_returns(via, jid, self.ids, self.d.job_sleep_s + 30, errors)
        if errors:
            self.measured["lookup_errors"] = len(errors)
            self.notes.append(f"jobs.lookup_jid through {via.name} failed {len(errors)} time(s), "
                              f"e.g.: {errors[0][-300:]}")
        lost = sorted(set(self.ids) - set(got))
        self.measured["lost_results"] = len(lost)
        self.measured["lost_ids"] = lost
        self.measured["tracked_jid"] = jid
        bad = {k: v for k, v in got.items() if v is not True}
        if bad:
            self.notes.append(f"tracked job returns that are not True: {bad}")
        self.say(f"tracked job {jid}: {len(got)}/{len(self.ids)} results found through {via.name}"
                 + (f"; LOST: {', '.join(lost)}" if lost else "")
                 + (f" ({len(errors)} lookups failed first)" if errors else ""))
        return errors

    def stage_key(self) -> None:
        kc = self.d.key_change
        if kc == "auto":
            self.kid = f"drill-{os.getpid()}-{int(time.time())}"
            stage_pending_key(self.d.masters[0], self.kid)
            self.actions.push(f"delete the throwaway key {self.kid}", self._delete_key)
            self.say(f"staged a throwaway pending key {self.kid}")
            # one tree per master: wait until it reached every one
            if self.d.cluster_backend == "rsync":
                kid = self.kid
                for api in self.apis.values():
                    _, took = wait_for(
                        lambda a=api: self._key_in_state(a, kid, "pre"), 15, interval=0.2)
                    if took is None:
                        raise DrillError(f"the staged key {kid} did not reach {api.name}'s "
                                         f"tree within 15 s "
                                         "(is rsync replication working?)")
        else:
            self.kid = kc

    @staticmethod
    def _key_in_state(api: MasterApi, kid: str, state: str) -> bool:
        """Whether ``hamaster-key -l STATE`` through ``api`` (its store, not its memory) lists
        ``kid``."""
        res = api.key("-l", state, "--out", "json")
        try:
            data = json.loads(res.stdout) if res.returncode == 0 else {}
        except json.JSONDecodeError:
            return False
        return any(isinstance(v, list) and kid in v for v in (data or {}).values())

    def _delete_key(self) -> None:
        assert self.kid
        errors = []
        for api in self.apis.values():
            res = api.key("-d", self.kid, "-y")
            if res.returncode in (0, KEY_UNCONFIRMED):   # stored; a peer applies it later
                return
            errors.append(res.stderr.strip())
        raise DrillError(f"could not delete {self.kid}: {errors}")

    def key_change(self, via: MasterApi) -> None:
        if not self.kid:
            return
        res = via.key("-a", self.kid, "-y")
        self.measured["key_change_made"] = res.returncode in (0, KEY_UNCONFIRMED)
        self._note_unconfirmed(res, via)
        if res.returncode in (0, KEY_UNCONFIRMED):
            self.say(f"key change: accepted {self.kid} through {via.name}")
        else:
            self.say(f"key change through {via.name} FAILED: {(res.stderr or res.stdout).strip()}")

    def key_visible(self, apis: list[MasterApi]) -> None:
        if not self.kid:
            return
        if not self.measured.get("key_change_made"):
            self.measured["key_change_visible"] = False
            return
        worst = 0.0
        for api in apis:
            _, took = wait_for(lambda a=api: a.sees_key(self.kid), 15, interval=0.1)
            if took is None:
                self.measured["key_change_visible"] = False
                self.say(f"key change NOT visible on {api.name} after 15 s")
                return
            worst = max(worst, took)
        self.measured["key_change_visible"] = True
        self.measured["key_visible_s"] = round(worst, 3)
        self.say(f"key change visible on {', '.join(a.name for a in apis)}")

    def detect(self, victim: Node, survivor: MasterApi, watcher: LogWatcher, t_fail: float,
               t_fail_wall: float,
               status: bool = True) -> None:
        needle = f"{victim.seen_as} stopped answering"
        minion_done = not watcher.paths
        status_done = not status
        if minion_done:
            self.notes.append("no minion logs known: detection from the minions' view not measured")
        det_min = det_status = None
        while (time.monotonic() - t_fail < self.d.detect_timeout_s
               and not (minion_done and status_done)):
            if not minion_done:
                found = watcher.scan(needle)
                if set(found) >= set(watcher.paths):
                    det_min = max(0.0, max(found.values()) - t_fail_wall)
                    minion_done = True
                    self.say(f"every minion declared {victim.name} dead after "
                             f"{det_min:.2f} s (minion logs)")
            if not status_done:
                try:
                    alive, _ = survivor.status_of(victim.name)
                except DrillError:
                    alive = None
                if alive is False:
                    det_status = time.monotonic() - t_fail
                    status_done = True
                    self.say(f"cluster.status on {survivor.name} shows {victim.name} not alive "
                             f"after {det_status:.2f} s")
            time.sleep(0.1)
        if watcher.paths:
            self.measured["detect_minions_s"] = round(det_min, 3) if det_min is not None else None
            if det_min is None:
                missing = sorted(set(watcher.paths) - set(watcher.found))
                self.notes.append(f"minions that never logged '{needle}' within "
                                  f"{self.d.detect_timeout_s:.0f} s: {', '.join(missing)}")
        if status:
            self.measured["detect_status_s"] = (round(det_status, 3) if det_status is not None
                                                else None)
        views = [
            v for k, v in self.measured.items() if k in ("detect_minions_s", "detect_status_s")]
        self.measured["detect_s"] = None if (not views or None in views) else round(max(views), 3)

    def hold(self) -> None:
        if self.d.hold_s > 0:
            self.say(f"holding the failure {self.d.hold_s:g} s")
            time.sleep(self.d.hold_s)

    def recover(self, api: MasterApi) -> None:
        took = time_until_all_answer(api, self.ids, self.d.recovery_timeout_s, ping_timeout=0.5)
        self.measured["recovery_s"] = round(took, 3) if took is not None else None
        self.say(f"every minion answers through {api.name} {took:.2f} s after it returned"
                 if took is not None
                 else f"NOT every minion answers through {api.name} within "
                      f"{self.d.recovery_timeout_s:.0f} s")

    # -- scenarios --------------------------------------------------------------------------------

    def _failover(self, breaker: Callable[[Node], Undo], status: bool = True) -> None:
        v = self.d.victim_node
        survivors = [m for m in self.d.masters if m is not v]
        s_api, v_api = self.apis[survivors[0].name], self.apis[v.name]
        self.start_pinger(exclude={v.name})
        jid = self.track_job(v_api)
        watcher = LogWatcher(self.d.minions)
        t_fail_wall, t_fail = time.time(), time.monotonic()
        undo = breaker(v)
        self.say(f"{self.d.scenario}: {v.name} is down for the drill")
        self.detect(v, s_api, watcher, t_fail, t_fail_wall, status=status)
        self.key_change(s_api)
        self.hold()
        self.actions.restore(undo)
        self.measured["outage_s"] = round(time.monotonic() - t_fail, 3)
        self.say(f"{v.name} restored")
        self.recover(v_api)
        self.key_visible([v_api])
        self.count_lost(jid, s_api)

    def sc_kill(self) -> None:
        self._failover(self.actions.kill)

    def sc_stop(self) -> None:
        self._failover(self.actions.stop)

    def sc_freeze(self) -> None:
        self._failover(self.actions.freeze)

    def sc_partition(self) -> None:
        v = self.d.victim_node
        local_cut = "isolate" not in v.commands
        self._failover(self.actions.isolate, status=not local_cut)

    def sc_backend_loss(self) -> None:
        d = self.d
        apis = list(self.apis.values())
        down = [self.apis[n] for n in d.store_down_on]
        steady = {a.name for a in apis} - set(d.store_down_on)
        self.start_pinger(exclude=set())
        jid = self.track_job(apis[0])
        via = self._key_change_via()
        lost_counted = False
        lookup_errors: list[str] = []
        t_fail = time.monotonic()
        sampler = StoreSampler(apis)
        sampler.t0 = t_fail
        sampler.start()
        try:
            undo = self.actions.backend_down()
            lost = [e["name"] for e in self.actions.lost_services()]
            if lost:
                self.measured["backend_lost"] = lost
            if down:
                self._detect_store_down(down, t_fail)
            else:
                self.say("the store is expected to stay up on every master: nothing to detect")
            if d.expect_key_change and self.kid:
                self._key_change_during(via)
                if d.expect_key_change == "works" and not down:
                    self.key_visible(apis)  # on every master while the backend part is still gone
            if not down:  # the store is up: lookups must work during the loss
                lookup_errors = self.count_lost(jid, apis[-1])
                lost_counted = True
            self.hold()
        finally:
            sampler.stop()
        errs = sampler.errors(steady)
        if steady:  # what users and alerts see from masters that should have kept their store
            self.measured["store_errors"] = len(errs) + len(lookup_errors)
        if errs:
            self.measured["store_error_samples"] = errs[:20]
            bad = sorted({e["master"] for e in errs})
            self.say(f"{len(errs)} cluster.status samples with store_ok not true on "
                     f"{', '.join(bad)}, "
                     "which should have kept the store")
            self.notes.append(f"store_ok was not true on {', '.join(bad)} from {errs[0]['t']:.1f} "
                              f"s to {errs[-1]['t']:.1f} s after the loss ({len(errs)} samples)")
        elif steady:
            self.say(f"store_ok stayed true on {', '.join(sorted(steady))} "
                     f"({sum(1 for x in sampler.taken() if x['master'] in steady)} samples)")
        self.actions.restore(undo)
        self.measured["outage_s"] = round(time.monotonic() - t_fail, 3)
        t_back = time.monotonic()
        self.say("backend restored")
        rec: float | None = 0.0
        for api in apis:
            _, took = wait_for(lambda a=api: a.status_of(a.name)[1] is True,
                               self.d.recovery_timeout_s)
            if took is None:
                rec = None
                break
            rec = time.monotonic() - t_back
        if rec is not None:
            took = time_until_all_answer(apis[0], self.ids, self.d.recovery_timeout_s)
            rec = None if took is None else max(rec, time.monotonic() - t_back)
        self.measured["recovery_s"] = round(rec, 3) if rec is not None else None
        self.say(f"every master reports store_ok: true and serves every minion {rec:.2f} s after "
                 f"the backend returned"
                 if rec is not None else "the masters did NOT recover the store")
        if d.expect_key_change and self.kid:
            if d.expect_key_change == "refused":
                self._converge_key(via, apis)
            elif down:
                self.key_visible(apis)  # e.g. rsync: kept locally, delivered once the peer is back
        if not lost_counted:
            self.count_lost(jid, apis[-1])

    def _detect_store_down(self, down: list[MasterApi], t_fail: float) -> None:
        # Every master is watched at once: a status call can itself wait on the store for up to
        # a store timeout, and polling the masters one after another would add those waits up.
        def detect(api: MasterApi) -> float | None:
            _, took = wait_for(lambda: api.status_of(api.name)[1] is False,
                               self.d.detect_timeout_s - (time.monotonic() - t_fail))
            return None if took is None else time.monotonic() - t_fail

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(down))) as pool:
            found = list(zip(down, pool.map(detect, down), strict=True))
        worst: float | None = 0.0
        for api, at in found:
            if at is None:
                worst = None
                self.notes.append(f"{api.name} never reported store_ok: false")
                break
            worst = max(worst, at)
        self.measured["detect_status_s"] = round(worst, 3) if worst is not None else None
        self.measured["detect_s"] = self.measured["detect_status_s"]
        if worst is not None:
            who = "every master reports" if len(down) == len(self.apis) else \
                f"{', '.join(a.name for a in down)} report{'s' if len(down) == 1 else ''}"
            self.say(f"{who} store_ok: false after {worst:.2f} s")

    def _key_change_via(self) -> MasterApi:
        """Through whom backend-loss changes a key: a degraded master if only some are, else the
        last."""
        names = [m.name for m in self.d.masters]
        down = self.d.store_down_on
        if down and len(down) < len(names):
            return self.apis[down[0]]
        return self.apis[names[-1]]

    def _key_change_during(self, via: MasterApi) -> None:
        assert self.kid
        t = time.monotonic()
        res = via.key("-a", self.kid, "-y")
        took = time.monotonic() - t
        made = res.returncode in (0, KEY_UNCONFIRMED)
        self._note_unconfirmed(res, via)
        self.measured["key_change_made"] = made
        self.measured["key_change_s"] = round(took, 3)
        if made:
            self.say(f"key change during the loss: accepted {self.kid} through "
                     f"{via.name} in {took:.2f} s")
            if self.d.expect_key_change == "refused":
                self.measured["key_change_refused"] = False
                self.notes.append("the key change went through although the store was "
                                  "expected to refuse it")
            return
        lines = [ln for ln in (res.stderr or res.stdout or "").splitlines() if ln.strip()]
        err = lines[-1].strip() if lines else f"exit {res.returncode}, no message"
        self.measured["key_change_error"] = err
        if self.d.expect_key_change == "refused":
            self.measured["key_change_refused"] = res.returncode != 124 and bool(lines)
        self.say(f"key change during the loss through {via.name} refused after {took:.2f} s: {err}")
        self.notes.append(f"key change during the loss (through {via.name}, {took:.1f} s): {err}")

    def _note_unconfirmed(self, res: Any, via: MasterApi) -> None:
        """hamaster-key exit 3: stored, but a live master did not confirm it within the wait
        (e.g. rsync, a peer that cannot be pushed to); kept as a figure, not a failure."""
        if res.returncode != KEY_UNCONFIRMED:
            return
        lines = [ln for ln in (res.stderr or "").splitlines() if "not confirmed" in ln]
        msg = lines[-1].strip() if lines else "not confirmed by every live master"
        self.measured["key_change_unconfirmed"] = msg
        self.notes.append(f"key change through {via.name} stored but not confirmed "
                          f"everywhere: {msg}")

    def _converge_key(self, via: MasterApi, apis: list[MasterApi]) -> None:
        """After a refused key change: the key converges, or is accepted again, once the store is
        back."""
        assert self.kid
        if self._key_in_state(via, self.kid, "acc"):
            self.measured["key_change_landed_late"] = True
            self.measured["key_change_made"] = True
            self.say(f"{self.kid} is accepted after all: the timed-out write was committed when "
                     f"the store returned")
        else:
            self.measured["key_change_landed_late"] = False
            res = via.key("-a", self.kid, "-y")
            self.measured["key_change_made"] = res.returncode == 0
            self.say(f"key change retried through {via.name} after the store returned: "
                     + ("accepted" if res.returncode == 0
                        else f"FAILED: {(res.stderr or res.stdout).strip()[-300:]}"))
        self.key_visible(apis)

    def sc_minion_storm(self) -> None:
        apis = list(self.apis.values())
        pinger = self.start_pinger(exclude=set())
        wait_for(lambda: len(pinger.rounds) >= len(apis), 10)
        pinger.pause()
        before = pinger.failed
        undo = self.actions.stop_minions(self.d.minions)
        self.say(f"stopped all {len(self.ids)} minions")
        self.key_change(apis[-1])
        self.actions.restore(undo)
        t_back = time.monotonic()
        self.say(f"started all {len(self.ids)} minions at once")
        per: dict[str, float | None] = {}
        for api in apis:
            took = time_until_all_answer(
                api, self.ids, max(0.0, self.d.recovery_timeout_s - (time.monotonic() - t_back)),
                ping_timeout=0.5)
            per[api.name] = None if took is None else round(time.monotonic() - t_back, 3)
        self.measured["recovery_by_master"] = per
        self.measured["recovery_s"] = None if None in per.values() else max(per.values())
        self.say(f"every minion answers through every master {self.measured['recovery_s']} "
                 f"s after the restart")
        pinger.pause(False)
        n = len(pinger.rounds)
        wait_for(lambda: (len(pinger.rounds) >= n + 2 * len(apis)
                          and time.monotonic() - t_back > self.d.hold_s), 30)
        self.measured["failed_pings_before_storm"] = before
        self.key_visible(apis)

    def sc_rolling_restart(self) -> None:
        pinger = self.start_pinger(exclude=set())
        first = self.apis[self.d.masters[0].name]
        jid = self.track_job(first)
        per: dict[str, float | None] = {}
        for i, m in enumerate(self.d.masters):
            pinger.exclude(m.name)
            undo = self.actions.stop(m)
            if i == 0:
                self.key_change(self.apis[self.d.masters[1].name])
            self.actions.restore(undo)
            self.say(f"{m.name} restarted")
            took = time_until_all_answer(self.apis[m.name], self.ids,
                                         self.d.recovery_timeout_s, ping_timeout=0.5)
            per[m.name] = round(took, 3) if took is not None else None
            self.say(f"every minion answers through {m.name} {took:.2f} s after its restart"
                     if took is not None else f"NOT every minion answers through {m.name}")
            pinger.include(m.name)
        self.measured["recovery_by_master"] = per
        self.measured["recovery_s"] = None if None in per.values() else max(per.values())
        self.key_visible(list(self.apis.values()))
        self.count_lost(jid, self.apis[self.d.masters[-1].name])

    # -- leader scenarios -------------------------------------------------------------------------

    def sc_leader_kill(self) -> None:
        self._leader_failover(self.actions.kill)

    def sc_leader_freeze(self) -> None:
        self._leader_failover(self.actions.freeze)

    def sc_leader_partition(self) -> None:
        self._leader_failover(self.actions.isolate_process)

    def _resolve_leader(self) -> tuple[Node, int]:
        """The lease holder now (asked through every master in turn) and its epoch."""
        def ask() -> tuple[str, int] | None:
            for api in self.apis.values():
                try:
                    name, epoch = api.leader()
                except DrillError:
                    continue
                if name:
                    return name, epoch
            return None

        found, _ = wait_for(ask, self.d.preflight_timeout_s, interval=0.2)
        if not found:
            raise DrillError("no master holds the leader lease (cluster.status shows no "
                             "leader): the leader drills need a lease (ha_backend etcd or "
                             "fs) and a healthy cluster")
        name, epoch = found
        if name not in self.apis:
            raise DrillError(f"the leader is {name}, which is not a master of this drill "
                             f"({', '.join(self.apis)})")
        return self.d.master(name), epoch

    def _check_leader_config(self, want_schedule: bool) -> None:
        """Every local master has the drill's reactor (and schedule) options, or a clear error."""
        from hamaster.drill.setup import effective_master_options, missing_leader_options

        for m in self.d.masters:
            if m.exec is not None or not m.confdir:
                continue
            missing = missing_leader_options(effective_master_options(m.confdir), want_schedule)
            if missing:
                raise DrillError(f"{m.name} ({m.confdir}) is not configured for the leader drills: "
                                 + "; ".join(missing) + " — see docs/drills.md (Leader drills) or "
                                 "`hamaster-cluster up --leader-drills`")

    def _wait_reactions(self, api: MasterApi, minion: str, nonce: int, want: set[int],
                        timeout: float) -> list[int]:
        """Read the reaction file through ``api`` until every number in ``want`` is in it (or the
        deadline); returns the last reading."""
        last: list[int] = []
        reads = self.measured.setdefault("reaction_reads", [])  # (t, numbers seen or the error)

        def done() -> bool:
            nonlocal last
            try:
                last = reactions_seen(api, minion, self.d.reaction_file, nonce)
            except DrillError as exc:
                reads.append([round(time.monotonic() - self.t0, 2), str(exc)[:200]])
                raise
            reads.append([round(time.monotonic() - self.t0, 2), len(set(last) & want)])
            return want <= set(last)

        wait_for(done, timeout, interval=0.5)
        del reads[:-60]
        return last

    def _leader_failover(self, breaker: Callable[[Node], Undo]) -> None:
        from hamaster.drill.setup import EVENT_PREFIX, SCHEDULE_MARKER, SCHEDULE_SECONDS

        d = self.d
        want_schedule = "duplicate_schedule_runs" in d.objectives
        self._check_leader_config(want_schedule)
        v, epoch = self._resolve_leader()
        d.victim = v.name
        self.measured["leader_before"] = {"master": v.name, "epoch": epoch}
        self.say(f"the leader is {v.name} (epoch {epoch}): it is the victim")
        survivors = [self.apis[m.name] for m in d.masters if m is not v]
        s_api = survivors[0]
        minion = d.event_minion or self.ids[0]
        nonce = time.time_ns() // 1000
        tag = f"{EVENT_PREFIX}/{nonce}"
        t_start_wall = time.time()

        # The reactor answers at all (configuration, sls, the minion's cmd.run) before the failure.
        firer = EventFirer(survivors, minion, tag, d.event_interval_s)
        first = firer.fire_one()
        if first is None:
            raise DrillError(f"could not publish event.send to {minion}: {firer.errors[-1:]}")
        got = self._wait_reactions(s_api, minion, nonce, {first}, 20)
        if first not in got:
            raise DrillError(f"no reaction to {tag} (n={first}) on {minion} within 20 s: is the "
                             f"drill reactor configured on every master (reactor: - "
                             f"'{EVENT_PREFIX}/*': [<drill sls>]) and does it append to "
                             f"{d.reaction_file}? See docs/drills.md (Leader drills)")
        self.say(f"firing {tag} events at {minion} every {d.event_interval_s:g} s through "
                 f"{', '.join(a.name for a in survivors)}")
        firer.start()
        wait_for(lambda: len(firer.fired) >= 5, 10)

        t_fail = time.monotonic()
        undo = breaker(v)
        self.say(f"{d.scenario}: the leader {v.name} is down for the drill")
        failover: float | None = None
        new: tuple[str | None, int] = (None, 0)
        while time.monotonic() - t_fail < d.detect_timeout_s:
            try:
                new = s_api.leader()
            except DrillError:
                new = (None, 0)
            if new[0] and new[0] != v.name and new[1] > epoch:
                failover = time.monotonic() - t_fail
                break
            time.sleep(0.1)
        self.measured["leader_failover_s"] = round(failover, 3) if failover is not None else None
        if failover is not None:
            self.measured["leader_after"] = {"master": new[0], "epoch": new[1]}
            self.say(f"{s_api.name} sees {new[0]} hold the lease (epoch {new[1]}) "
                     f"{failover:.2f} s after "
                     "the failure")
        else:
            self.say(f"NO new leader seen through {s_api.name} within {d.detect_timeout_s:.0f} s")
        self.hold()
        self.actions.restore(undo)
        t_back_wall = time.time()
        self.measured["outage_s"] = round(time.monotonic() - t_fail, 3)
        self.say(f"{v.name} restored")
        # Keep firing while the old leader is back (a stale leader resuming must not react again).
        n_back = len(firer.fired)
        wait_for(lambda: len(firer.fired) >= n_back + max(5, int(1.0 / d.event_interval_s)), 20)
        firer.stop()
        fired = set(firer.fired)
        self.measured["events_fired"] = len(fired)
        if firer.errors:
            self.measured["event_publish_errors"] = len(firer.errors)
            self.notes.append(f"{len(firer.errors)} event.send publishes failed, e.g. "
                              f"{firer.errors[0]}")
        self.say(f"fired {len(fired)} events; waiting for their reactions on {minion}")
        t_last = time.monotonic()
        seen = self._wait_reactions(s_api, minion, nonce, fired, d.recovery_timeout_s)
        if fired <= set(seen):  # how long the last reactions took to show (reading included)
            self.measured["reactions_settled_s"] = round(time.monotonic() - t_last, 3)
        counts: dict[int, int] = {}
        for n in seen:
            counts[n] = counts.get(n, 0) + 1
        dups = sorted(n for n, k in counts.items() if k > 1)
        missed = sorted(fired - set(counts))
        self.measured["reactions"] = len(seen)
        self.measured["duplicate_reactions"] = len(dups)
        self.measured["missed_reactions"] = len(missed)
        if dups:
            self.measured["duplicate_ns"] = dups[:50]
        if missed:
            self.measured["missed_ns"] = missed[:50]
        self.say(f"reactions: {len(seen)} for {len(fired)} events, {len(dups)} duplicated, "
                 f"{len(missed)} missed")
        if want_schedule:
            self._count_schedule(s_api, SCHEDULE_MARKER, SCHEDULE_SECONDS,
                                 t_start_wall, t_back_wall)

    def _count_schedule(self, api: MasterApi, marker: str, every: int,
                        since: float, back: float) -> None:
        """Slots of the drill schedule with more than one jid in the job cache, from ``since`` to
        the first slot run after ``back`` (the victim restored; waited for, up to 3 slots)."""
        def resumed() -> dict[int, list[str]] | None:
            slots = schedule_jids(api, marker, since, time.time())
            return slots if any(s >= back for s in slots) else None

        slots, took = wait_for(resumed, 3 * every + 5, interval=0.5)
        self.measured["schedule_resumed"] = took is not None
        if took is None:
            self.notes.append(f"no run of the drill schedule found in {api.name}'s job cache for a "
                              f"slot after the restore within {3 * every + 5} s")
            until = time.time() - every
            slots = schedule_jids(api, marker, since, until)
        else:
            until = max(slots)
        dup = {s: j for s, j in slots.items() if len(j) > 1}
        span = int(until // every) - int(-(-since // every)) + 1
        self.measured["schedule_runs"] = sum(len(j) for j in slots.values())
        self.measured["schedule_slots"] = max(span, 0)
        self.measured["schedule_slots_missed"] = max(0, span - len(slots))
        self.measured["duplicate_schedule_runs"] = len(dup)
        if dup:
            self.measured["duplicate_schedule_jids"] = {str(s): j
                                                        for s, j in list(dup.items())[:20]}
        self.say(f"schedule: {len(slots)} of {span} slots ran, {len(dup)} with more than one jid")

    # -- result -----------------------------------------------------------------------------------

    def result(self, aborted: str | None, interrupted: bool, problems: list[str]) -> dict:
        sc = SCENARIOS[self.d.scenario]
        checks = []
        for name, limit in self.d.objectives.items():
            key = OBJECTIVE_MEASURE[name]
            value = self.measured.get(key)
            if isinstance(limit, bool):
                met = value is True if limit else True
            else:
                met = value is not None and value <= limit
            checks.append({"objective": name, "limit": limit, "value": value, "met": met})
        if "healthy_after" in self.measured:
            checks.append({"objective": "healthy_after", "limit": True,
                           "value": self.measured["healthy_after"],
                           "met": self.measured["healthy_after"] is True})
        if problems:
            checks.append({"objective": "restored", "limit": True, "value": False, "met": False})
        ok = aborted is None and not problems and all(c["met"] for c in checks)
        return {
            "drill": self.d.name,
            "file": self.d.path,
            "scenario": self.d.scenario,
            "victim": (self.d.victim_node.name
                       if self.d.scenario in ("kill", "stop", "freeze", "partition")
                       or (self.d.scenario in LEADER_SCENARIOS and self.d.victim != LEADER_VICTIM)
                       else None),
            "masters": [m.name for m in self.d.masters],
            "minions": self.ids,
            "started": self.started,
            "duration_s": round(time.monotonic() - self.t0, 3),
            "measured": self.measured,
            "objectives": checks,
            "ok": ok,
            "aborted": aborted,
            "interrupted": interrupted,
            "restore_problems": problems,
            "notes": self.notes + ([sc.note] if sc.note else []),
            "events": self.events,
        }


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def render_table(res: dict) -> str:
    """The human summary of a drill result."""
    m = res["measured"]
    obj = {c["objective"]: c for c in res["objectives"]}
    rows = [("failed pings",
             f"{_fmt(m.get('failed_pings'))} of {_fmt(m.get('pings_sent'))}", "max_failed_pings",
             ""),
            ("detect (minions' view)", _fmt(m.get("detect_minions_s"), " s"), None, ""),
            ("detect (cluster.status)", _fmt(m.get("detect_status_s"), " s"), None, ""),
            ("detect", _fmt(m.get("detect_s"), " s"), "max_detect_s", " s"),
            ("recovery", _fmt(m.get("recovery_s"), " s"), "max_recovery_s", " s"),
            ("results lost", f"{_fmt(m.get('lost_results'))}", "max_lost_results", ""),
            ("key change refused", _fmt(m.get("key_change_refused")), "key_change_refused", ""),
            ("key change visible", _fmt(m.get("key_change_visible")), "key_change_visible", ""),
            ("store errors", _fmt(m.get("store_errors")), "max_store_errors", ""),
            ("leader failover", _fmt(m.get("leader_failover_s"), " s"), "leader_failover_s", " s"),
            ("reactions duplicated", _fmt(m.get("duplicate_reactions")), "duplicate_reactions", ""),
            ("reactions missed",
             f"{_fmt(m.get('missed_reactions'))} of {_fmt(m.get('events_fired'))}",
             "missed_reactions", ""),
            ("schedule slots doubled", _fmt(m.get("duplicate_schedule_runs")),
             "duplicate_schedule_runs", ""),
            ("cluster healthy after", _fmt(m.get("healthy_after")), "healthy_after", "")]
    lost = m.get("backend_lost")
    lines = [f"drill {res['drill']!r}: scenario {res['scenario']}"
             + (f", victim {res['victim']}" if res["victim"] else "")
             + (f", lost {', '.join(lost)}" if lost else "") + f", {res['duration_s']:.1f} s",
             f"{'measure':<24} {'value':<16} {'objective':<12} result", "-" * 62]
    for label, value, key, unit in rows:
        c = obj.get(key) if key else None
        if value.startswith("n/a") and c is None:
            continue
        limit = "" if c is None else (("yes" if c["limit"] else "-") if isinstance(c["limit"], bool)
                                      else f"<= {_fmt(c['limit'])}{unit}")
        verdict = "" if c is None else ("ok" if c["met"] else "MISSED")
        lines.append(f"{label:<24} {value:<16} {limit:<12} {verdict}")
    for n in res["notes"]:
        lines.append(f"note: {n}")
    if res["aborted"]:
        lines.append(f"ABORTED: {res['aborted']}")
    for p in res["restore_problems"]:
        lines.append(f"RESTORE PROBLEM: {p}")
    missed = [c["objective"] for c in res["objectives"] if not c["met"]]
    lines.append("RESULT: PASS (every objective met)" if res["ok"]
                 else f"RESULT: FAIL ({', '.join(missed) or res['aborted'] or 'see above'})")
    return "\n".join(lines)


def exit_code(res: dict) -> int:
    if res["interrupted"]:
        return 130
    if res["aborted"]:
        return 3
    return 0 if res["ok"] else 1
