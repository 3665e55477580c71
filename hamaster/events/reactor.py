"""Salt's reactor, run exactly once per cluster: on the lease holder only, each reaction claimed
create-if-absent under the lease epoch before it acts.

Configuration (Salt's ``reactor:`` master option)::

    reactor:
      - 'salt/minion/*/start':
        - /srv/reactor/start.sls
      - 'myapp/*':
        - salt://reactor/myapp.sls      # from the cluster's file_roots (saltenv base)

Each sls is rendered with ``tag`` and ``data`` (``jinja|yaml``, :mod:`hamaster.events.render`)
into reactions ``{name: {"<kind>.<fun>": [ {option: value}, ... ]}}`` where kind is

- ``local`` — publish to minions: ``tgt``, ``tgt_type`` (glob), ``arg`` (positional list),
  ``args`` (Salt's newer form: a list of ``{kw: value}`` maps, or a plain list), ``kwarg``;
- ``runner`` — a hamaster runner (``hamaster-run`` functions): ``arg``, ``kwarg``, other
  options passed as keyword arguments;
- ``wheel`` — ``key.accept`` / ``key.reject`` / ``key.delete`` with ``match`` (a minion id).

Exactly once. Every master reads the whole bus; only the holder of the leader lease reacts.
Before acting on an event it creates the event's *claim* with ``fenced_create`` (the lease
still ours and the claim absent): ``reactor/claims/<source>-<seq>-<idx>`` for a master's own
events; for minion events ``reactor/claims/<fingerprint>`` when the fingerprint is strong (the
event names the job that fired it) and ``reactor/claims/<fingerprint>-<bucket>`` otherwise,
where ``bucket`` is the receipt time divided by the merge window (the claims of the
neighbouring buckets are checked too), so the copies of one minion event received by several
masters share a claim (the rule of :mod:`hamaster.events.bus`). The
claim says ``claimed`` with the epoch, then ``done`` when every action ran. The leader stores
how far it got (``reactor/cursor``) every second; a new leader starts from there, so the
events the old one had not handled are handled once: their claims are absent, or ``done``
(skipped), or ``claimed`` by an older epoch (the old leader died mid-reaction): then the
``local`` and ``wheel`` actions run again — ``local`` publishes under a jid derived from the
claim and the action (sls and reaction name), so a minion that already ran it drops the repeat
(minions de-duplicate jids) — and ``runner`` actions are *not* re-run (at most once; logged).

A failing render, an unknown action or a runner that raises is logged and counted
(``hamaster_reactions_total{result="error"}``); the other reactions and the bus go on.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from hamaster.events.bus import Event, EventBus, Position
from hamaster.events.render import RenderError, render_jinja_yaml
from hamaster.store.base import Lease, Store, StoreError

log = logging.getLogger(__name__)

CLAIMS_PREFIX = "reactor/claims"
CURSOR_KEY = "reactor/cursor"
CURSOR_EVERY = 1.0
CLAIM_RETENTION = 3 * 3600.0
SEEN_FPS = 100_000


class _LostLease(Exception):
    """Internal: the lease was lost while handling events."""


class ReactorConfigError(ValueError):
    """The ``reactor:`` option is malformed."""


def parse_reactor_option(value: Any) -> list[tuple[str, list[str]]]:
    """``reactor:`` → ``[(tag glob, [sls path, ...]), ...]``; raises on a malformed option."""
    if not value:
        return []
    if not isinstance(value, list):
        raise ReactorConfigError("reactor must be a list of {tag glob: [sls paths]}")
    out: list[tuple[str, list[str]]] = []
    for item in value:
        if not isinstance(item, dict):
            raise ReactorConfigError(f"reactor entry {item!r} is not a map")
        for glob, paths in item.items():
            if isinstance(paths, str):
                paths = [paths]
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ReactorConfigError(f"reactor entry {glob!r}: paths must be a list")
            out.append((str(glob), list(paths)))
    return out


def derive_jid(claim_key: str, action: str, ts: float) -> str:
    """A jid (20 digits, Salt's shape) derived from a claim and an action (``<sls>#<name>``):
    the event's time to the second, then 6 digits of a hash, so every leader publishes the same
    jid for the same action."""
    head = time.strftime("%Y%m%d%H%M%S", time.gmtime(ts))
    digest = hashlib.sha256(f"{claim_key}/{action}".encode()).hexdigest()
    return f"{head}{int(digest, 16) % 1_000_000:06d}"


class ReactorHost:
    """What the reactor needs of the master (implemented in :mod:`hamaster.master.events`)."""

    def read_sls(self, path: str) -> str:  # pragma: no cover - interface
        """The text of an sls (absolute path or ``salt://``)."""
        raise NotImplementedError

    def publish(self, tgt: Any, fun: str, arg: list, tgt_type: str, jid: str) -> dict:
        """Publish a job (from the reactor thread); ``{"jid", "minions"}`` or an ``error``."""
        raise NotImplementedError  # pragma: no cover

    def runner(self, fun: str, arg: list, kwarg: dict) -> Any:
        """Run a hamaster runner (from the reactor thread) and return its result."""
        raise NotImplementedError  # pragma: no cover

    def wheel_key(self, fun: str, match: str) -> Any:
        """``key.accept`` / ``key.reject`` / ``key.delete`` of minion ``match``."""
        raise NotImplementedError  # pragma: no cover


class Reactor:
    """Reacts to bus events on the lease holder; one thread."""

    def __init__(self, rules: list[tuple[str, list[str]]], store: Store, bus: EventBus,
                 lease: Callable[[], Lease | None], host: ReactorHost, master_id: str,
                 metrics: Any = None) -> None:
        self.rules = rules
        self.store = store
        self.bus = bus
        self.lease = lease
        self.host = host
        self.master_id = master_id
        self.metrics = metrics
        self.window = bus.merge_window
        self._q: queue.Queue[list[Event] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._epoch = 0            # the epoch we caught up under
        self._done: Position = {}  # handled up to here (per source)
        self._cursor_saved: Position = {}
        self._cursor_at = 0.0
        # Fingerprints of minion events handled (or found claimed) here → receipt time: the
        # other copies are skipped without asking the store.
        self._seen_fps: OrderedDict[str, float] = OrderedDict()
        bus.on_events(self._on_events, with_copies=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reactor thread."""
        self._thread = threading.Thread(target=self._run, name="reactor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a reaction in progress finishes first)."""
        self._stop.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _on_events(self, events: list[Event]) -> None:
        if any(self._matches(ev.tag) for ev in events):
            self._q.put(events)
        else:
            self._q.put([])        # wake: the cursor may move

    def _matches(self, tag: str) -> list[str]:
        paths: list[str] = []
        for glob, sls in self.rules:
            if fnmatch.fnmatchcase(tag, glob):
                paths.extend(sls)
        return paths

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._q.get(timeout=0.5)
            except queue.Empty:
                batch = []
            if batch is None:
                return
            lease = self.lease()
            if lease is None:
                if self._epoch:
                    log.info("reactor: not leader (any more); %d event(s) left to the leader",
                             len(batch))
                self._epoch = 0
                continue
            try:
                if self._epoch != lease.epoch:
                    self._catch_up(lease)
                else:
                    for ev in batch:
                        if self._stop.is_set():
                            break
                        self._handle(ev, lease)
                self._save_cursor(lease)
            except _LostLease:
                continue
            except StoreError as exc:
                log.error("reactor: store unreachable (%s); catching up when it returns", exc)
                self._epoch = 0
                self._stop.wait(1.0)
            except Exception:
                log.exception("reactor loop failed; catching up again")
                self._epoch = 0

    def _catch_up(self, lease: Lease) -> None:
        """Newly leader: handle every event after the stored cursor (claims de-duplicate)."""
        raw = self.store.get(CURSOR_KEY)
        since: Position | None = None
        if raw is not None:
            try:
                since = {src: (int(v[0]), int(v[1])) for src, v in json.loads(raw)["pos"].items()}
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("reactor: malformed cursor ignored")
        if since is None:
            since = self.bus.position()     # first leader ever: react from now on
        log.info("reactor: leader (epoch %d); catching up from %s", lease.epoch, since)
        self._done = dict(since)
        self._epoch = lease.epoch
        for ev in self.bus.events_after(since):
            if self._stop.is_set() or self.lease() is None:
                return
            self._handle(ev, lease)

    def _save_cursor(self, lease: Lease) -> None:
        now = time.monotonic()
        if self._done == self._cursor_saved or now - self._cursor_at < CURSOR_EVERY:
            return
        body = json.dumps({"pos": self._done, "epoch": lease.epoch, "master": self.master_id})
        self.store.put(CURSOR_KEY, body.encode())
        self._cursor_saved = dict(self._done)
        self._cursor_at = now

    # -- one event ----------------------------------------------------------------------------

    def _handle(self, ev: Event, lease: Lease) -> None:
        last = self._done.get(ev.src)
        if last is not None and ev.pos <= last:
            return
        paths = self._matches(ev.tag)
        if paths and ev.fp and self._copy_of_seen(ev):
            paths = []
        if paths:
            log.debug("reactor: handling %s %s@%s.%s", ev.tag, ev.src, ev.seq, ev.idx)
        if paths and not self._react(ev, paths, lease):
            # Not leader any more (or not sure): stop here; whoever leads next (maybe us
            # again, after a catch-up from the stored cursor) handles this event.
            self._epoch = 0
            raise _LostLease(ev.tag)
        if paths and ev.fp:
            self._seen_fps[ev.fp] = ev.ts
            self._seen_fps.move_to_end(ev.fp)
            while len(self._seen_fps) > SEEN_FPS:
                self._seen_fps.popitem(last=False)
        self._done[ev.src] = ev.pos

    def _copy_of_seen(self, ev: Event) -> bool:
        """True when another copy of ``ev`` was handled (or found claimed) here already."""
        ts = self._seen_fps.get(ev.fp or "")
        return ts is not None and (ev.strong or abs(ts - ev.ts) <= self.window)

    def _claim(self, ev: Event, lease: Lease) -> tuple[str, str]:
        """Claim ``ev``: ``(key, "new" | "retry" | "dup" | "lost")``.

        The lease used is the current one (renewed meanwhile), as long as its epoch is the one
        this reactor caught up under."""
        current = self.lease()
        if current is None or current.epoch != lease.epoch:
            return "", "lost"
        lease = current
        rec = {"epoch": lease.epoch, "master": self.master_id, "ts": ev.ts, "tag": ev.tag,
               "state": "claimed"}
        if ev.fp and ev.strong:
            key = f"{CLAIMS_PREFIX}/{ev.fp}"
        elif ev.fp:
            bucket = math.floor(ev.ts / self.window) if self.window > 0 else 0
            key = f"{CLAIMS_PREFIX}/{ev.fp}-{bucket}"
            for b in (bucket, bucket - 1, bucket + 1):
                k = f"{CLAIMS_PREFIX}/{ev.fp}-{b}"
                raw = self.store.get(k)
                if raw is not None and self._within(raw, ev.ts):
                    return k, self._existing(k, raw, lease)
        else:
            key = f"{CLAIMS_PREFIX}/{ev.src}-{ev.seq}-{ev.idx}"
        if self.store.fenced_create(key, json.dumps(rec).encode(), lease):
            return key, "new"
        raw = self.store.get(key)
        if raw is None:
            return key, "lost"      # not created and absent: the lease passed on
        return key, self._existing(key, raw, lease)

    def _within(self, raw: bytes, ts: float) -> bool:
        try:
            return abs(float(json.loads(raw)["ts"]) - ts) <= self.window
        except (ValueError, KeyError, TypeError):
            return True

    def _existing(self, key: str, raw: bytes, lease: Lease) -> str:
        try:
            rec = json.loads(raw)
            epoch, state = int(rec["epoch"]), rec["state"]
        except (ValueError, KeyError, TypeError):
            return "dup"
        if state == "done" or epoch >= lease.epoch:
            return "dup"
        # Claimed by an older epoch and never finished: the old leader died mid-reaction.
        new = json.dumps(dict(rec, epoch=lease.epoch, master=self.master_id, retry=True))
        if self.lease() is not None and self.store.compare_and_put(key, raw, new.encode()):
            return "retry"
        return "dup"

    def _react(self, ev: Event, paths: list[str], lease: Lease) -> bool:
        """Claim and run the reactions to ``ev``; False if the lease was lost before the claim."""
        key, verdict = self._claim(ev, lease)
        if verdict == "lost":
            log.warning("reactor: lease lost before claiming %s; leaving it to the leader", ev.tag)
            return False
        if verdict == "dup":
            self._count("duplicate")
            log.debug("reactor: %s already claimed (%s)", ev.tag, key)
            return True
        retry = verdict == "retry"
        if retry:
            self._count("retried")
            log.warning("reactor: re-running the reaction to %s left unfinished by an older "
                        "leader (local/wheel only; jids repeat, minions drop duplicates)", ev.tag)
        for path in paths:
            try:
                text = self.host.read_sls(path)
                rendered = render_jinja_yaml(text, {"tag": ev.tag, "data": ev.data}, name=path)
            except (OSError, RenderError, ValueError) as exc:
                log.error("reactor: %s for %s: %s", path, ev.tag, exc)
                self._count("error")
                continue
            if rendered is None:
                continue
            if not isinstance(rendered, dict):
                log.error("reactor: %s rendered to %s, not a map of reactions", path,
                          type(rendered).__name__)
                self._count("error")
                continue
            for name, body in rendered.items():
                jid = derive_jid(key, f"{path}#{name}", ev.ts)
                self._run_reaction(str(name), body, jid, retry, ev)
        try:
            raw = self.store.get(key)
            if raw is not None:
                done = dict(json.loads(raw), state="done")
                self.store.compare_and_put(key, raw, json.dumps(done).encode())
        except (StoreError, ValueError) as exc:
            log.warning("reactor: could not mark %s done: %s", key, exc)
        return True

    def _run_reaction(self, name: str, body: Any, jid: str, retry: bool, ev: Event) -> None:
        try:
            if not isinstance(body, dict) or len(body) != 1:
                raise ValueError("a reaction is {kind.fun: [options]}")
            (action, options), = body.items()
            params: dict[str, Any] = {}
            if isinstance(options, list):
                for item in options:
                    if not isinstance(item, dict):
                        raise ValueError(f"option {item!r} is not a map")
                    params.update(item)
            elif isinstance(options, dict):
                params.update(options)
            elif options is not None:
                raise ValueError("options must be a list of maps")
            kind, _, fun = str(action).partition(".")
            if kind == "local" and fun:
                self._local(fun, params, jid)
            elif kind == "runner" and fun:
                if retry:
                    log.warning("reactor: runner %s of %s not re-run (at most once)", fun, ev.tag)
                    return
                arg = list(params.pop("arg", []) or [])
                kwarg = dict(params.pop("kwarg", {}) or {})
                kwarg.update(params)
                self.host.runner(fun, arg, kwarg)
            elif kind == "wheel" and fun in ("key.accept", "key.reject", "key.delete"):
                match = params.get("match") or params.get("id")
                if not isinstance(match, str) or not match:
                    raise ValueError(f"wheel.{fun} needs match: <minion id>")
                self.host.wheel_key(fun, match)
            else:
                raise ValueError(f"unknown reactor action {action!r} (local.*, runner.*, "
                                 "wheel.key.accept/reject/delete)")
        except Exception as exc:
            log.error("reactor: reaction %r to %s failed: %s", name, ev.tag, exc)
            self._count("error")
            return
        self._count("ok")

    def _local(self, fun: str, params: dict, jid: str) -> None:
        tgt = params.get("tgt")
        if tgt is None:
            raise ValueError(f"local.{fun} needs tgt")
        arg = list(params.get("arg") or [])
        kwargs: dict[str, Any] = dict(params.get("kwarg") or {})
        args = params.get("args")
        if isinstance(args, list):
            for item in args:
                if isinstance(item, dict) and len(item) == 1 and not arg:
                    kwargs.update(item)
                else:
                    arg.append(item)
        elif isinstance(args, dict):
            kwargs.update(args)
        elif args is not None:
            arg.append(args)
        if kwargs:
            arg.append({"__kwarg__": True, **kwargs})
        res = self.host.publish(tgt, fun, arg, str(params.get("tgt_type") or "glob"), jid)
        if not res.get("jid"):
            raise RuntimeError(res.get("error") or "not published")
        log.info("reactor: published %s to %s as %s", fun, res.get("minions"), jid)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reactions.labels(self.metrics.master_id, result).inc()

    # -- housekeeping -------------------------------------------------------------------------

    def sweep_claims(self, older_than: float = CLAIM_RETENTION) -> int:
        """Delete claims older than ``older_than`` seconds (by their event time)."""
        cutoff = time.time() - older_than
        gone = 0
        for key, raw in self.store.get_many(CLAIMS_PREFIX).items():
            try:
                old = float(json.loads(raw)["ts"]) < cutoff
            except (ValueError, KeyError, TypeError):
                old = True
            if old and self.store.delete(key):
                gone += 1
        return gone


def read_sls_file(path: str, salt_reader: Callable[[str, str], bytes | None]) -> str:
    """Read an sls: an absolute path on this master, or ``salt://path[?saltenv=env]``."""
    if path.startswith("salt://"):
        rel, _, query = path[len("salt://"):].partition("?")
        env = "base"
        if query.startswith("saltenv="):
            env = query[len("saltenv="):]
        data = salt_reader(rel, env)
        if data is None:
            raise OSError(f"{path}: not found in file_roots ({env})")
        return data.decode("utf-8")
    if not os.path.isabs(path):
        raise ValueError(f"{path}: reactor sls paths are absolute or salt://")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 60.0) -> Any:
    """Run ``coro`` on the master's event loop from a worker thread and wait for its result."""
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    return fut.result(timeout=timeout)
