"""Event bus, reactor and schedule logic on a real fs store (two "masters" on one directory)."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from hamaster.events.bus import EventBus, decode_position, encode_position, fingerprint
from hamaster.events.reactor import Reactor, ReactorHost, derive_jid, parse_reactor_option
from hamaster.events.render import RenderError, render_jinja_yaml
from hamaster.events.schedule import Scheduler, parse_schedule_option, slot_jid
from hamaster.master.leader import elector_for
from hamaster.metrics import MasterMetrics
from hamaster.store.base import LeaseUnsupported
from hamaster.store.fs import FsStore
from tests.kit import wait_until


def _pair(tmp_path: Path) -> tuple[FsStore, FsStore]:
    return FsStore(tmp_path / "s", poll_interval=0.05), FsStore(tmp_path / "s", poll_interval=0.05)


def _flush(bus: EventBus) -> None:
    """Write what is queued now (the writer thread's work, done inline)."""
    items = []
    while not bus._q.empty():
        item = bus._q.get_nowait()
        if item is not None:
            items.append(item)
    if items:
        assert bus._write(items)
        bus._queued -= len(items)


def test_position_round_trip_and_bad_input() -> None:
    pos = {"m1": (1796560000000000000, 3), "m2": (5, 0)}
    assert decode_position(encode_position(pos)) == pos
    assert decode_position("") is None
    for bad in ("m1", "m1@x.1", "m1@5", "@5.1"):
        with pytest.raises(ValueError):
            decode_position(bad)


def test_one_stream_on_every_master_in_order_with_resume(tmp_path: Path) -> None:
    a_store, b_store = _pair(tmp_path)
    a, b = EventBus(a_store, "A"), EventBus(b_store, "B")
    a.attach()
    b.attach()
    for i in range(3):
        a.emit("app/a", {"i": i})
    _flush(a)
    b.emit("app/b", {"i": 0})
    _flush(b)
    b_store.poll_now()
    got, pos = b.read({}, "app/*")
    # In arrival order here (B's own batch first), in order per source.
    assert [(e.src, e.tag, e.data["i"]) for e in got] == [
        ("B", "app/b", 0), ("A", "app/a", 0), ("A", "app/a", 1), ("A", "app/a", 2)]
    assert all("_stamp" in e.data for e in got)
    # Resume from the middle, on the other master: exactly the rest.
    mid = {"A": got[2].pos}
    a_store.poll_now()
    rest, _ = a.read(mid, "app/*")
    assert [(e.src, e.data["i"]) for e in rest] == [("A", 2), ("B", 0)]
    later, _ = b.read(pos, "*")
    assert later == []
    # tagmatch filters but the position still moves past what did not match
    only_b, pos_b = b.read({}, "app/b")
    assert [e.tag for e in only_b] == ["app/b"] and pos_b["A"] == got[3].pos


def test_copies_of_a_minion_event_are_merged(tmp_path: Path) -> None:
    a_store, b_store = _pair(tmp_path)
    metrics = MasterMetrics("B")
    a, b = EventBus(a_store, "A"), EventBus(b_store, "B", metrics=metrics)
    a.attach()
    b.attach()
    fired_in_job = {"n": 1, "__pub_jid": "20261206120000000001"}
    # The copy B received, then A's copy of the same event (a different envelope around it).
    b.emit("my/tag", {"id": "m1", "data": fired_in_job, "ts": 1}, "m1", fired_in_job)
    a.emit("my/tag", {"id": "m1", "data": fired_in_job, "ts": 2}, "m1", fired_in_job)
    # Same data without a job id: merged within the window only.
    b.emit("start", {"id": "m1", "data": "up"}, "m1", "up")
    a.emit("start", {"id": "m1", "data": "up"}, "m1", "up")
    _flush(b)
    _flush(a)
    b_store.poll_now()
    got, _ = b.read({}, "*")
    assert [e.tag for e in got] == ["my/tag", "start"], [(e.src, e.tag) for e in got]
    assert metrics.events_merged.labels("B")._value.get() == 2
    # A strong copy arriving much later still merges; a weak one outside the window does not.
    late = [{"tag": "my/tag", "data": {}, "ts": time.time() + 600,
             "fp": fingerprint("m1", "my/tag", fired_in_job), "strong": True},
            {"tag": "start", "data": {}, "ts": time.time() + 600,
             "fp": fingerprint("m1", "start", "up")}]
    b._ingest([(f"events/C/{time.time_ns():020d}", json.dumps({"events": late}).encode())])
    got2, _ = b.read({"A": (10**20, 0), "B": (10**20, 0)}, "*")
    assert [e.tag for e in got2] == ["start"]


def test_malformed_batches_are_skipped(tmp_path: Path) -> None:
    store, _ = _pair(tmp_path)
    bus = EventBus(store, "A")
    bus.attach()
    bus._ingest([("events/X/00000000000000000001", b"not json"),
                 ("events/X/00000000000000000002", b'{"events": [1, {"tag": 5}, {"tag": "ok"}]}'),
                 ("events/bad", b"{}")])
    got, _ = bus.read({}, "*")
    assert [e.tag for e in got] == ["ok"]


def test_render_jinja_yaml_and_its_errors() -> None:
    out = render_jinja_yaml("x:\n  local.test.echo:\n    - arg: ['{{ data.n }}']\n",
                            {"tag": "t", "data": {"n": 3}})
    assert out == {"x": {"local.test.echo": [{"arg": ["3"]}]}}
    with pytest.raises(RenderError, match="Jinja"):
        render_jinja_yaml("{% if %}", {})
    with pytest.raises(RenderError, match="YAML"):
        render_jinja_yaml("a: [", {})
    with pytest.raises(RenderError, match="not allowed"):
        render_jinja_yaml("#!py\nx", {})
    with pytest.raises(RenderError):   # the sandbox refuses Python internals
        render_jinja_yaml("{{ data.__class__.__mro__[1].__subclasses__() }}", {"data": {}})


class RecordingHost(ReactorHost):
    """Executes the reactor's actions into lists (the master's side, without sockets)."""

    def __init__(self, sls: dict[str, str]) -> None:
        self.sls = sls
        self.published: list[tuple] = []
        self.runners: list[tuple] = []
        self.wheel: list[tuple] = []

    def read_sls(self, path: str) -> str:
        if path not in self.sls:
            raise OSError(f"{path}: no such file")
        return self.sls[path]

    def publish(self, tgt: Any, fun: str, arg: list, tgt_type: str, jid: str) -> dict:
        self.published.append((tgt, fun, arg, tgt_type, jid))
        return {"jid": jid, "minions": [tgt]}

    def runner(self, fun: str, arg: list, kwarg: dict) -> Any:
        if fun == "boom.now":
            raise RuntimeError("the runner raised")
        self.runners.append((fun, arg, kwarg))
        return True

    def wheel_key(self, fun: str, match: str) -> Any:
        self.wheel.append((fun, match))
        return True


GOOD = """\
echo_it:
  local.cmd.run:
    - tgt: {{ data['id'] }}
    - args:
      - cmd: echo {{ data['data']['n'] }}
accept_it:
  wheel.key.accept:
    - match: {{ data['id'] }}
run_it:
  runner.jobs.list_jobs: []
"""
BAD = """\
unknown:
  nosuch.thing: []
raises:
  runner.boom.now: []
"""


def test_reactor_bad_input_is_counted_and_others_still_run(tmp_path: Path) -> None:
    store, other = _pair(tmp_path)
    metrics = MasterMetrics("A")
    bus = EventBus(store, "A")
    bus.attach()
    lease = store.lease_acquire("leader", "A", 30.0)
    assert lease is not None
    host = RecordingHost({"/r/good.sls": GOOD, "/r/bad.sls": BAD, "/r/broken.sls": "{% if %}"})
    rules = parse_reactor_option([{"app/*": ["/r/broken.sls", "/r/missing.sls", "/r/bad.sls",
                                             "/r/good.sls"]}])
    reactor = Reactor(rules, store, bus, lambda: lease, host, "A", metrics)
    data = {"id": "web1", "data": {"n": 7, "__pub_jid": "20261206120000000002"}}
    bus.emit("app/go", data, "web1", data["data"])
    _flush(bus)
    (ev,), _ = bus.read({}, "*")
    reactor._handle(ev, lease)
    assert [p[:4] for p in host.published] == [
        ("web1", "cmd.run", [{"__kwarg__": True, "cmd": "echo 7"}], "glob")]
    assert host.wheel == [("key.accept", "web1")]
    assert host.runners == [("jobs.list_jobs", [], {})]
    count = metrics.reactions.labels
    assert count("A", "error")._value.get() == 4     # broken, missing, unknown, raises
    assert count("A", "ok")._value.get() == 3
    # The same event again: a copy here is skipped from memory; a new leader catching up finds
    # the claim: no action either way.
    reactor._done = {}
    reactor._handle(ev, lease)
    assert len(host.published) == 1
    again = Reactor(rules, store, bus, lambda: lease, host, "A", metrics)
    again._handle(ev, lease)
    assert len(host.published) == 1
    assert count("A", "duplicate")._value.get() == 1
    # The jid is derived from the claim, the same for any leader.
    claim = next(k for k in store.list("reactor/claims"))
    assert json.loads(store.get(claim))["state"] == "done"
    assert host.published[0][4] == derive_jid(claim, "/r/good.sls#echo_it", ev.ts)


def test_reactor_claim_left_by_a_dead_leader_is_rerun_with_the_same_jid(tmp_path: Path) -> None:
    a_store, b_store = _pair(tmp_path)
    bus = EventBus(b_store, "B")
    bus.attach()
    old = a_store.lease_acquire("leader", "A", 0.3)
    assert old is not None
    host_a = RecordingHost({"/r/good.sls": GOOD})
    rules = parse_reactor_option([{"app/*": "/r/good.sls"}])
    data = {"id": "web1", "data": {"n": 1}}
    bus.emit("app/go", data)
    _flush(bus)
    (ev,), _ = bus.read({}, "*")
    # A claims, then "dies" before acting (we stop after the claim).
    reactor_a = Reactor(rules, a_store, EventBus(a_store, "A"), lambda: old, host_a, "A")
    key, verdict = reactor_a._claim(ev, old)
    assert verdict == "new"
    new = wait_until(lambda: b_store.lease_acquire("leader", "B", 5.0), 5, 0.05,
                     "B acquiring the lease A held")
    assert new.epoch == old.epoch + 1
    host_b = RecordingHost({"/r/good.sls": GOOD})
    reactor_b = Reactor(rules, b_store, bus, lambda: new, host_b, "B")
    reactor_b._handle(ev, new)
    assert [p[4] for p in host_b.published] == [derive_jid(key, "/r/good.sls#echo_it", ev.ts)]
    assert host_b.runners == []            # runner actions are not re-run (at most once)
    assert host_b.wheel == [("key.accept", "web1")]
    # A, resumed with its stale lease, cannot claim anything new.
    assert reactor_a._claim(ev, old)[1] == "dup"


def test_schedule_one_run_per_slot_even_with_two_leaders(tmp_path: Path) -> None:
    a_store, b_store = _pair(tmp_path)
    jobs = parse_schedule_option({"tick": {"function": "test.fn", "seconds": 2,
                                           "args": [1], "kwargs": {"k": "v"}}})
    runs: list[tuple] = []

    def submit(fun: str, args: list, kwargs: dict) -> Future:
        runs.append((fun, args, kwargs))
        fut: Future = Future()
        fut.set_result(True)
        return fut

    lease = a_store.lease_acquire("leader", "A", 30.0)
    assert lease is not None
    sa = Scheduler(jobs, a_store, lambda: lease, submit, "A")
    sb = Scheduler(jobs, b_store, lambda: lease, submit, "B")   # a stale leader's view
    now = time.time()
    sa._lead(lease)
    sb._lead(lease)
    slot = sa._next["tick"]
    sa.tick(lease, slot + 0.1)
    sb.tick(lease, slot + 0.1)
    assert runs == [("test.fn", [1], {"k": "v"})]
    # Missed slots (no leader for a while) are skipped, not run late.
    sa.tick(lease, slot + 10.0)
    assert len(runs) == 2 and sa._next["tick"] == slot + 12   # +2..+8 skipped, +10 ran
    assert slot_jid("tick", slot) == slot_jid("tick", slot) != slot_jid("tick", slot + 2)
    assert now - 2 <= slot <= now + 2


def test_schedule_option_errors_and_cron() -> None:
    for bad, msg in (({"j": {"seconds": 1}}, "function"), ({"j": {"function": "f"}}, "seconds"),
                     ({"j": {"function": "f", "cron": "nope"}}, "cron"), ([1], "map"),
                     ({"j": {"function": "f", "seconds": 5, "when": "6pm"}}, "unsupported.*when"),
                     ({"j": {"function": "f", "seconds": 5, "splay": {"start": 1, "end": 3}}},
                      "splay must be a number"),
                     ({"j": {"function": "f", "seconds": -5}}, "seconds must be >= 0")):
        with pytest.raises(ValueError, match=msg):
            parse_schedule_option(bad)
    assert parse_schedule_option({"enabled": False, "j": {"function": "f", "seconds": 5}}) == []
    (job,) = parse_schedule_option({"c": {"function": "f", "cron": "*/5 * * * *"}})
    slot = job.slot_at_or_before(1_800_000_123.0)
    assert slot % 300 == 0 and slot <= 1_800_000_123 and job.slot_after(slot) == slot + 300


def test_exactly_once_features_refuse_rsync_naming_the_backends(tmp_path: Path) -> None:
    from hamaster.store.rsync import RsyncStore

    store = RsyncStore(tmp_path / "r", [])
    try:
        with pytest.raises(LeaseUnsupported, match="etcd or fs"):
            elector_for({"reactor": [{"a": ["/x.sls"]}]}, store, "m")
        assert elector_for({}, store, "m") is None     # no lease needed: none started
    finally:
        store.close()


def test_reactor_uses_the_renewed_lease_not_the_one_it_started_with(tmp_path: Path) -> None:
    """A batch that takes longer than the TTL must not lose events: the claim is made under the
    lease as renewed meanwhile (regression: the first fs run with a slow batch skipped an
    event as "lost" although this master still led)."""
    import dataclasses

    store, _ = _pair(tmp_path)
    bus = EventBus(store, "A")
    bus.attach()
    lease = store.lease_acquire("leader", "A", 30.0)
    assert lease is not None
    started_with = dataclasses.replace(lease, valid_until=time.monotonic() - 1)
    host = RecordingHost({"/r/good.sls": GOOD})
    reactor = Reactor(parse_reactor_option([{"app/*": "/r/good.sls"}]), store, bus,
                      lambda: lease, host, "A")
    bus.emit("app/go", {"id": "web1", "data": {"n": 1}})
    _flush(bus)
    (ev,), _ = bus.read({}, "*")
    reactor._handle(ev, started_with)
    assert len(host.published) == 1
    # Lease really lost (another epoch): the event is left for the next leader, not skipped.
    reactor2 = Reactor(parse_reactor_option([{"app/*": "/r/good.sls"}]), store, bus,
                       lambda: None, RecordingHost({"/r/good.sls": GOOD}), "A")
    bus.emit("app/go", {"id": "web1", "data": {"n": 2}})
    _flush(bus)
    ev2 = bus.read({ev.src: ev.pos}, "*")[0][0]
    with pytest.raises(Exception, match="app/go"):
        reactor2._handle(ev2, lease)
    assert ev2.src not in reactor2._done


def test_resume_on_a_master_that_kept_another_copy(tmp_path: Path) -> None:
    """Masters may keep different copies of a merged event (whichever arrived first); a listener
    resuming with the position after one copy does not get the other (regression)."""
    s1, s2 = _pair(tmp_path)
    one, two = EventBus(s1, "X"), EventBus(s2, "Y")
    data = {"n": 1, "__pub_jid": "20261206120000000009"}
    fp = fingerprint("m1", "app/e", data)
    copy_a = ("events/A/00000000000000000010",
              json.dumps({"events": [{"tag": "app/e", "data": data, "ts": 100.0, "fp": fp,
                                      "strong": True}]}).encode())
    copy_b = ("events/B/00000000000000000020",
              json.dumps({"events": [{"tag": "app/e", "data": data, "ts": 100.5, "fp": fp,
                                      "strong": True}]}).encode())
    one._ingest([copy_b, copy_a])       # B's copy first here
    two._ingest([copy_a, copy_b])       # A's copy first there
    (ev,), _ = one.read({}, "*")
    assert ev.src == "B"
    resumed, _ = two.read(decode_position(ev.cursor), "*")
    assert resumed == []


def test_huge_event_data_is_replaced_and_batches_stay_small(tmp_path: Path) -> None:
    """Bad input from a minion (a huge event) must not wedge the bus (etcd refuses > 1 MB)."""
    store, _ = _pair(tmp_path)
    bus = EventBus(store, "A")
    bus.attach()
    bus.start()
    try:
        bus.emit("big/one", {"blob": "x" * 2_000_000})
        for i in range(20):
            bus.emit("mid/x", {"blob": "y" * 100_000, "i": i})
        wait_until(lambda: len(bus.read({}, "*")[0]) >= 21, 10, 0.05, "21 events readable")
    finally:
        bus.stop()
    got, _ = bus.read({}, "*")
    assert got[0].data["_hamaster_truncated"] is True and got[0].data["bytes"] > 2_000_000
    assert [e.data["i"] for e in got[1:]] == list(range(20))
    sizes = [len(store.get(k) or b"") for k in store.list("events")]
    assert max(sizes) < 1_000_000 and len(sizes) >= 3


def test_new_leader_acts_on_a_copy_the_old_leader_never_handled(tmp_path: Path) -> None:
    """Masters see the copies of a minion event in different orders. The old leader's cursor
    can pass the copy the new leader saw first (the old one was about to act on another copy
    when it died): the new leader must act on the later copy (regression: it was skipped as a
    duplicate and the reaction was lost, seen once in ~8 runs of the fs SIGKILL test)."""
    store, _ = _pair(tmp_path)
    bus = EventBus(store, "Y")
    data = {"id": "web1", "data": {"n": 3, "__pub_jid": "20261206120000000003"}}
    fp = fingerprint("web1", "app/go", data["data"])
    ev = {"tag": "app/go", "data": data, "ts": time.time(), "fp": fp, "strong": True}
    other = {"tag": "other/tag", "data": {}, "ts": time.time()}
    bus._ingest([
        ("events/S0/00000000000000000010", json.dumps({"events": [ev]}).encode()),
        ("events/S0/00000000000000000011", json.dumps({"events": [other]}).encode()),
        ("events/S2/00000000000000000020", json.dumps({"events": [ev]}).encode()),
    ])
    store.put("reactor/cursor", json.dumps({"pos": {"S0": [11, 0]}}).encode())
    lease = store.lease_acquire("leader", "Y", 30.0)
    assert lease is not None
    host = RecordingHost({"/r/good.sls": GOOD})
    reactor = Reactor(parse_reactor_option([{"app/*": "/r/good.sls"}]), store, bus,
                      lambda: lease, host, "Y")
    reactor._catch_up(lease)
    assert [p[1] for p in host.published] == ["cmd.run"]


def test_a_sources_batches_listed_out_of_order_are_all_read(tmp_path: Path) -> None:
    """A store pass may list a source's batches in any order; a listener resuming before both
    still gets both, in sequence order (the later one first used to hide the earlier one)."""
    store, _ = _pair(tmp_path)
    bus = EventBus(store, "A")
    bus.attach()
    first = ("events/X/00000000000000000010", b'{"events": [{"tag": "t/1"}]}')
    second = ("events/X/00000000000000000020", b'{"events": [{"tag": "t/2"}]}')
    bus._ingest([second, first])
    got, pos = bus.read({}, "*")
    assert [e.tag for e in got] == ["t/1", "t/2"]
    assert pos["X"] == (20, 0)


def test_fs_watch_reports_a_directory_in_key_order(tmp_path: Path) -> None:
    writer, reader = _pair(tmp_path)
    writer.put("events/X/00000000000000000000", b"{}")
    seen: list[str] = []
    reader.watch("events", lambda changes: seen.extend(c.key for c in changes))
    reader.poll_now()
    keys = [f"events/X/{n:020d}" for n in (5, 3, 9, 1, 7, 2, 8, 4, 6, 15, 13, 11, 12, 14, 10)]
    for k in keys:
        writer.put(k, b"{}")
    reader.poll_now()
    assert seen == sorted(keys)


def test_event_number_options_refuse_zero_and_junk_by_name() -> None:
    from hamaster.master.events import _option

    assert _option("event_retention", None, 3600.0) == 3600.0
    assert _option("event_merge_window", 0, 5.0, zero_ok=True) == 0.0
    for raw, msg in ((0, "event_retention must be > 0"), ("x", "must be a number"),
                     (-1, "must be > 0")):
        with pytest.raises(ValueError, match=msg):
            _option("event_retention", raw, 3600.0)
