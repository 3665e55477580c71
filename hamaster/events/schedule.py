"""Salt's master ``schedule:`` option, one run per slot cluster-wide.

Configuration::

    schedule:
      ping_web:
        function: salt.execute          # a hamaster runner
        args: ['web*', 'test.ping']
        kwargs: {}
        seconds: 30                     # or minutes / hours / days (added up), or
        # cron: '*/5 * * * *'           # (croniter)
        splay: 5                        # a delay in [0, splay] s, the same on every master
        run_on_start: false             # run once as soon as the schedule is first led
        maxrunning: 1                   # runs of this job at once on the leader
        catch_up: false                 # run slots missed while there was no leader
        enabled: true

Slots are wall-clock times every master agrees on (clocks synchronised): multiples of the
interval since the Unix epoch, or the cron expression's fire times (UTC). Only the lease holder
runs jobs. Before it runs a slot it creates ``schedule/<job>/<slot>`` with ``fenced_create``
(create-if-absent while its lease epoch is current), so a slot runs once even if two masters
think they lead for a moment (a frozen leader resuming). ``salt.execute`` runs get a jid
derived from the job and slot, so even then a minion runs it once.

Missed slots: a slot whose time passed with no leader (a failover takes up to the lease TTL)
is skipped — the new leader starts with the current slot if it is still within ``grace``
(half the interval, at most 30 s) of its time — unless ``catch_up: true``, which runs every
missed slot (up to ``MAX_CATCH_UP``) since the newest slot record. ``maxrunning`` counts runs on
the leader only; a run started by a previous leader is not counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hamaster.store.base import Lease, Store, StoreError

log = logging.getLogger(__name__)

SCHEDULE_PREFIX = "schedule"
TICK = 0.1
MAX_CATCH_UP = 10
KEEP_SLOTS = 200


class ScheduleConfigError(ValueError):
    """The ``schedule:`` option is malformed."""


@dataclass
class Job:
    """One scheduled job."""

    name: str
    function: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    interval: float = 0.0
    cron: str | None = None
    splay: float = 0.0
    run_on_start: bool = False
    maxrunning: int = 1
    catch_up: bool = False
    enabled: bool = True

    def slot_at_or_before(self, now: float) -> float:
        """The newest slot time ``<= now``."""
        if self.cron:
            from croniter import croniter

            base = datetime.fromtimestamp(now + 1e-6, UTC)
            return float(croniter(self.cron, base).get_prev(float))
        return float(int(now // self.interval) * self.interval)

    def slot_after(self, slot: float) -> float:
        """The slot following ``slot``."""
        if self.cron:
            from croniter import croniter

            return float(croniter(self.cron, datetime.fromtimestamp(slot, UTC))
                         .get_next(float))
        return slot + self.interval

    def grace(self, slot: float) -> float:
        """How late a slot may still start (half the period, at most 30 s, at least 1 s)."""
        period = self.slot_after(slot) - slot
        return max(1.0, min(period / 2, 30.0))

    def splay_of(self, slot: float) -> float:
        """The slot's splay delay: the same on every master (a hash of job and slot)."""
        if self.splay <= 0:
            return 0.0
        h = int(hashlib.sha256(f"{self.name}/{slot}".encode()).hexdigest()[:8], 16)
        return self.splay * (h / 0xFFFFFFFF)

    def describe(self) -> dict:
        """The job as ``schedule.list`` shows it."""
        out: dict[str, Any] = {"function": self.function, "args": self.args,
                               "kwargs": self.kwargs, "enabled": self.enabled,
                               "maxrunning": self.maxrunning, "catch_up": self.catch_up,
                               "run_on_start": self.run_on_start, "splay": self.splay}
        if self.cron:
            out["cron"] = self.cron
        else:
            out["seconds"] = self.interval
        return out


#: The job options this schedule honours, plus Salt's bookkeeping ones that change nothing
#: here (``name``, ``jid_include``, ``return_job``, ``persist``, ``metadata``); any other is
#: refused by name (Salt's ``when``, ``range``, ``once``, ``until``, ``after``, ``returner`` …
#: are not supported: a job that silently ignored one would run at times the operator did not
#: ask for).
JOB_KEYS = frozenset({"function", "args", "arg", "kwargs", "kwarg", "seconds", "minutes",
                      "hours", "days", "cron", "splay", "run_on_start", "maxrunning",
                      "catch_up", "enabled", "name", "jid_include", "return_job", "persist",
                      "metadata"})


def _number(name: str, key: str, raw: Any) -> float:
    try:
        value = float(raw or 0)
    except (TypeError, ValueError):
        raise ScheduleConfigError(f"schedule job {name!r}: {key} must be a number, got {raw!r} "
                                  "(a Salt-style splay {start, end} is not supported)") from None
    if value < 0:
        raise ScheduleConfigError(f"schedule job {name!r}: {key} must be >= 0, got {raw!r}")
    return value


def parse_schedule_option(value: Any) -> list[Job]:
    """``schedule:`` → jobs; raises :class:`ScheduleConfigError` naming the bad job.

    ``enabled: false`` at the top level turns the whole schedule off (as in Salt): no jobs."""
    if not value:
        return []
    if not isinstance(value, dict):
        raise ScheduleConfigError("schedule must be a map of job name → options")
    if value.get("enabled", True) is False:
        return []
    jobs = []
    for name, o in value.items():
        if name == "enabled":
            continue
        if not isinstance(o, dict):
            raise ScheduleConfigError(f"schedule job {name!r} is not a map")
        unknown = sorted(str(k) for k in o if k not in JOB_KEYS)
        if unknown:
            raise ScheduleConfigError(f"schedule job {name!r}: unsupported option(s) "
                                      f"{', '.join(unknown)} (docs/events.md lists the "
                                      "supported ones)")
        fun = o.get("function")
        if not isinstance(fun, str) or not fun:
            raise ScheduleConfigError(f"schedule job {name!r} needs function: <runner>")
        if not all(c.isalnum() or c in "-_." for c in str(name)):
            raise ScheduleConfigError(f"schedule job name {name!r}: letters, digits, -_. only")
        interval = sum(_number(str(name), unit, o.get(unit)) * mult for unit, mult in
                       (("seconds", 1), ("minutes", 60), ("hours", 3600), ("days", 86400)))
        cron = o.get("cron")
        if cron:
            try:
                from croniter import croniter

                croniter(str(cron))
            except Exception as exc:
                raise ScheduleConfigError(f"schedule job {name!r}: bad cron {cron!r}: {exc}"
                                          ) from None
        elif interval <= 0:
            raise ScheduleConfigError(f"schedule job {name!r} needs seconds/minutes/hours/days "
                                      "or cron")
        args = o.get("args", o.get("arg")) or []
        kwargs = o.get("kwargs", o.get("kwarg")) or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ScheduleConfigError(f"schedule job {name!r}: args is a list, kwargs a map")
        try:
            maxrunning = int(o.get("maxrunning", 1) or 0)
        except (TypeError, ValueError):
            raise ScheduleConfigError(f"schedule job {name!r}: maxrunning must be an integer"
                                      ) from None
        jobs.append(Job(name=str(name), function=fun, args=list(args), kwargs=dict(kwargs),
                        interval=interval, cron=str(cron) if cron else None,
                        splay=_number(str(name), "splay", o.get("splay")),
                        run_on_start=bool(o.get("run_on_start")), maxrunning=maxrunning,
                        catch_up=bool(o.get("catch_up")),
                        enabled=o.get("enabled", True) is not False))
    return jobs


def slot_jid(job: str, slot: float) -> str:
    """The jid of a ``salt.execute`` run of ``job`` in ``slot``: the slot's time, then 6 hash
    digits (the same on every master)."""
    head = time.strftime("%Y%m%d%H%M%S", time.gmtime(slot))
    digest = hashlib.sha256(f"schedule/{job}/{slot}".encode()).hexdigest()
    return f"{head}{int(digest, 16) % 1_000_000:06d}"


#: ``submit(function, args, kwargs) -> Future`` — runs a runner on the master's loop.
Submit = Callable[[str, list, dict], Future]


class Scheduler:
    """Runs the master schedule on the lease holder; one thread."""

    def __init__(self, jobs: list[Job], store: Store, lease: Callable[[], Lease | None],
                 submit: Submit, master_id: str, metrics: Any = None) -> None:
        self.jobs = {j.name: j for j in jobs}
        self.store = store
        self.lease = lease
        self.submit = submit
        self.master_id = master_id
        self.metrics = metrics
        self._next: dict[str, float] = {}      # job -> next slot this leader considers
        self._running: dict[str, int] = {}
        self._epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (runs in progress finish on the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(TICK):
            lease = self.lease()
            if lease is None:
                self._epoch = 0
                continue
            try:
                if lease.epoch != self._epoch:
                    self._lead(lease)
                self.tick(lease, time.time())
                self._prune()
            except StoreError as exc:
                log.error("schedule: store unreachable (%s)", exc)
                self._epoch = 0
                self._stop.wait(1.0)
            except Exception:
                log.exception("schedule: tick failed")

    def _lead(self, lease: Lease) -> None:
        """Newly leader: decide each job's first slot (skip the missed ones, or catch up)."""
        now = time.time()
        self._epoch = lease.epoch
        for job in self.jobs.values():
            current = job.slot_at_or_before(now)
            first = current if now - current <= job.grace(current) else job.slot_after(current)
            if job.catch_up:
                last = self._last_recorded(job)
                if last is not None:
                    first = min(first, job.slot_after(last))
                    first = max(first, self._nth_before(job, current, MAX_CATCH_UP))
            if job.run_on_start and self._claim(job, "start", lease):
                self._launch(job, now, "start")
            self._next[job.name] = first
        log.info("schedule: leading (epoch %d): %s", lease.epoch,
                 {n: _iso(t) for n, t in self._next.items()})

    def _nth_before(self, job: Job, slot: float, n: int) -> float:
        if job.cron:
            from croniter import croniter

            it = croniter(job.cron, datetime.fromtimestamp(slot, UTC))
            for _ in range(n):
                slot = float(it.get_prev(float))
            return slot
        return slot - n * job.interval

    def _last_recorded(self, job: Job) -> float | None:
        slots = [k.rsplit("/", 1)[-1] for k in self.store.list(f"{SCHEDULE_PREFIX}/{job.name}")]
        nums = [float(s) for s in slots if s.replace(".", "", 1).isdigit()]
        return max(nums) if nums else None

    def tick(self, lease: Lease, now: float) -> None:
        """Run every slot that is due (called every ``TICK`` on the leader)."""
        for job in self.jobs.values():
            slot = self._next.get(job.name)
            if slot is None:
                continue
            while slot + job.splay_of(slot) <= now:
                if not job.catch_up and now - slot > job.grace(slot) + job.splay:
                    log.warning("schedule: %s slot %s missed (no leader then); skipped",
                                job.name, _iso(slot))
                    self._count("skipped")
                elif job.enabled:
                    self._run_slot(job, slot, lease)
                slot = job.slot_after(slot)
                if self.lease() is None:
                    break
            self._next[job.name] = slot

    def _claim(self, job: Job, slot: str, lease: Lease) -> bool:
        current = self.lease()          # renewed since the tick started: use the newest
        if current is not None and current.epoch == lease.epoch:
            lease = current
        rec = {"epoch": lease.epoch, "master": self.master_id, "at": time.time()}
        return self.store.fenced_create(f"{SCHEDULE_PREFIX}/{job.name}/{slot}",
                                        json.dumps(rec).encode(), lease)

    def _run_slot(self, job: Job, slot: float, lease: Lease) -> None:
        if job.maxrunning and self._running.get(job.name, 0) >= job.maxrunning:
            log.warning("schedule: %s slot %s skipped: %d run(s) still going (maxrunning)",
                        job.name, _iso(slot), self._running[job.name])
            self._count("skipped")
            return
        if not self._claim(job, f"{slot:.0f}" if slot == int(slot) else f"{slot}", lease):
            self._count("duplicate")
            return
        self._launch(job, slot, f"{slot:.0f}")

    def _launch(self, job: Job, slot: float, label: str) -> None:
        kwargs = dict(job.kwargs)
        if job.function == "salt.execute" and not kwargs.get("jid"):
            kwargs["jid"] = slot_jid(job.name, slot if label != "start" else time.time())
        self._running[job.name] = self._running.get(job.name, 0) + 1
        log.info("schedule: running %s (slot %s) %s", job.name, label, job.function)
        try:
            fut = self.submit(job.function, list(job.args), kwargs)
        except Exception as exc:
            self._done(job, exc)
            return
        fut.add_done_callback(lambda f: self._done(job, f.exception()))

    def _done(self, job: Job, exc: BaseException | None) -> None:
        self._running[job.name] = max(0, self._running.get(job.name, 1) - 1)
        if exc is not None:
            log.error("schedule: %s failed: %s", job.name, exc)
            self._count("error")
        else:
            self._count("ok")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.schedule_runs.labels(self.metrics.master_id, result).inc()

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for job in self.jobs.values():
            keys = self.store.list(f"{SCHEDULE_PREFIX}/{job.name}")
            for key in keys[:-KEEP_SLOTS]:
                self.store.delete(key)

    def listing(self) -> dict:
        """``schedule.list``: every job, its next slot and the newest slot record."""
        out: dict[str, dict] = {}
        now = time.time()
        for job in self.jobs.values():
            d = job.describe()
            nxt = job.slot_after(job.slot_at_or_before(now))
            d["next_fire_time"] = _iso(nxt + job.splay_of(nxt))
            try:
                last = self._last_recorded(job)
            except StoreError:
                last = None
            d["last_slot"] = _iso(last) if last is not None else None
            out[job.name] = d
        return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")
