"""How the ``hamaster`` CLI waits for a job, as Salt's ``LocalClient`` does, and batch runs.

Salt's waiting rule (``salt/client/__init__.py``, ``get_iter_returns``): wait up to ``timeout``
for the targeted minions; then publish ``saltutil.find_job JID`` to those still missing and
keep waiting for every minion that reports the job as running (its own deadline moves to
``now + timeout`` with each such answer); probe again every ``gather_job_timeout`` while any
minion said it was running. A minion is given up when the last probe window has passed with
no minion running the job and its own deadline is over.

The probe is published through this master (any live master can run any command); returns,
including the probe's, that reach another master of the cluster are picked up from the shared
job cache while someone waits (``Master._sync_remote_returns``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hamaster.jobs.jid import gen_jid

if TYPE_CHECKING:
    from hamaster.master.daemon import Master

log = logging.getLogger(__name__)

NO_RESPONSE = "No response"
NOT_CONNECTED = "Not connected"
#: A hamaster minion heartbeats every ``master_heartbeat_interval`` (2 s); one silent this long
#: (or three of the intervals the master asks for, when longer) is reported as
#: ``[Not connected]`` rather than ``[No response]``.
SILENT_AFTER = 10.0
#: Heartbeat intervals (the master's hint, when it gives one) after which a silent minion no
#: longer counts as connected (here and in ``hamaster_minions_connected``).
SILENT_HEARTBEATS = 3

OnReturn = Callable[[str, dict], Awaitable[None]]


def no_return_reason(master: Master, minion_id: str) -> str:
    """``Not connected`` when this master has no live session with the minion, else ``No response``.

    Salt says ``[Not connected]`` for a minion without a connection to the master. Here: no
    session since this master started, or a hamaster minion (which heartbeats) silent for
    :data:`SILENT_AFTER` seconds (or :data:`SILENT_HEARTBEATS` hinted heartbeat intervals). A
    stock minion sends nothing while idle, so an existing session counts as connected.
    """
    sess = master.handler.sessions.get(minion_id)
    if sess is None:
        return NOT_CONNECTED
    silent_after = max(SILENT_AFTER, SILENT_HEARTBEATS * master.heartbeat_hint)
    if sess.hamaster and time.time() - sess.last_seen > silent_after:
        return NOT_CONNECTED
    return NO_RESPONSE


def _could_run(master: Master, minion_id: str, published: float) -> bool:
    """Whether the minion had a session with this master (its publish key) at ``published``."""
    sess = master.handler.sessions.get(minion_id)
    return sess is not None and sess.created <= published


class _Tag:
    """Feeds one job's ``(minion_id, ret)`` into a shared queue as ``(tag, minion_id, ret)``."""

    def __init__(self, target: asyncio.Queue, tag: str) -> None:
        self.target = target
        self.tag = tag

    def put_nowait(self, item: tuple[str, dict]) -> None:
        self.target.put_nowait((self.tag, *item))


def _running(ret: dict) -> bool:
    """Whether a ``saltutil.find_job`` return says the job is running on that minion."""
    if not isinstance(ret, dict):
        return False
    retcode = ret.get("retcode") or 0
    if isinstance(retcode, int) and retcode > 0:
        log.info("saltutil.find_job failed on %s: %r", ret.get("id"), ret.get("return"))
        return False
    data = ret.get("return")
    if not isinstance(data, dict) or not data:
        return False
    return not ("return" in data and data["return"] == {})


async def wait_job(
    master: Master,
    jid: str,
    expected: set[str],
    timeout: float,
    gather_job_timeout: float,
    on_return: OnReturn | None = None,
) -> dict[str, str]:
    """Wait for ``expected``'s returns of ``jid`` by Salt's rule (module docstring).

    With ``gather_job_timeout`` 0 nobody is probed: the wait ends at ``timeout``.

    ``on_return(minion_id, ret)`` is awaited for each expected minion's first return. Returns
    ``{minion_id: reason}`` (:data:`NO_RESPONSE` or :data:`NOT_CONNECTED`) for those that did
    not return. Cancelling the task stops waiting (the job itself keeps running).
    """
    tracker = master.tracker
    probing = gather_job_timeout > 0
    events: asyncio.Queue = asyncio.Queue()
    job_sub = _Tag(events, "job")
    tracker.subscribe(jid, job_sub)
    probe: tuple[str, _Tag] | None = None
    # Kept as it shrinks (not recomputed as ``expected - found``): a job to 5,000 minions
    # would otherwise cost a 5,000-element set difference per return.
    remaining = set(expected)
    started = time.time()  # just after the publication
    now = time.monotonic()
    timeout_at = now + timeout
    minion_timeouts = {mid: now + timeout for mid in expected}
    running = True  # start as True, so that a late minion is probed at least once
    try:
        while remaining:
            now = time.monotonic()
            if now >= timeout_at and running:
                if probe is not None:
                    tracker.unsubscribe(*probe)
                    probe = None
                # A minion that had no session with this master when the job was published
                # could not decrypt it, so it cannot be running it: not probed, given up now.
                pending = sorted(m for m in remaining if _could_run(master, m, started))
                for mid in remaining.difference(pending):
                    minion_timeouts[mid] = now
                running = False
                pub = (master.publish(pending, "saltutil.find_job", [jid], tgt_type="list")
                       if probing and pending else {})
                if pub.get("jid"):
                    probe = (pub["jid"], _Tag(events, "probe"))
                    tracker.subscribe(*probe)
                    log.debug("job %s: probing %d minion(s) with job %s",
                              jid, len(pending), pub["jid"])
                    timeout_at = now + gather_job_timeout
            if now >= timeout_at and not running:
                if all(now >= minion_timeouts[m] for m in remaining):
                    break
                wake = min(minion_timeouts[m] for m in remaining)
            else:
                wake = timeout_at
            try:
                tag, mid, ret = await asyncio.wait_for(events.get(), timeout=max(wake - now, 0.001))
            except TimeoutError:
                continue
            if tag == "job":
                if mid not in remaining:
                    continue
                remaining.discard(mid)
                if on_return is not None:
                    await on_return(mid, ret)
            elif mid in remaining and _running(ret):
                minion_timeouts[mid] = time.monotonic() + timeout
                running = True
    finally:
        tracker.unsubscribe(jid, job_sub)
        if probe is not None:
            tracker.unsubscribe(*probe)
    return {mid: no_return_reason(master, mid) for mid in sorted(remaining)}


def batch_size(spec: str | int, count: int) -> int:
    """Salt's batch size: a number, or a percentage (``10%`` or ``%10``) of ``count``; at least 1.

    Raises ValueError with Salt's message for anything else.
    """
    text = str(spec).strip()
    try:
        if "%" in text:
            res = float(text.strip("%")) / 100.0 * count
            return max(1, math.ceil(res) if res < 1 else int(res))
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(
            f"Invalid batch data sent: {spec}\nData must be in the form of %10, 10% or 3")
    return size


Send = Callable[[dict], Awaitable[None]]


async def run_batch(master: Master, req: dict, send: Send, gone: asyncio.Event) -> None:
    """Run ``req`` (a local ``publish`` with ``batch``) in batches, streaming frames to ``send``.

    As Salt's ``salt.cli.batch``: the target is pinged first (minions that do not answer get no
    job); then at most ``batch`` minions run the job at once, one jid for the whole run, and
    the next minion starts as each one returns (or is given up). ``gone`` is set when the CLI
    disconnects: no further minion is started.

    Frames: ``{"jid", "minions", "down", "batch_size"}`` (or ``{"jid": None, "error"}``), then
    ``{"batch_start": [ids]}``, ``{"ret": {id: ret}}``, ``{"missing": {id: reason}}`` as they
    happen, and ``{"done": True, "jid", "missing", "not_returned"}``.
    """
    spec = str(req.get("batch"))
    timeout = float(req.get("timeout") or master.opts.get("timeout", 5))
    gather = float(req.get("gather_job_timeout") or 0)
    try:
        batch_size(spec, 100)
    except ValueError as exc:
        await send({"jid": None, "minions": [], "error": str(exc)})
        return
    ping = master.publish(req.get("tgt", "*"), "test.ping", [],
                          tgt_type=req.get("tgt_type", "glob"), user=req.get("user", "root"))
    if not ping.get("jid"):
        await send(ping)
        return
    targeted = set(ping["minions"])
    answered: set[str] = set()

    async def pinged(mid: str, ret: dict) -> None:
        answered.add(mid)

    await wait_job(master, ping["jid"], targeted, timeout, gather, pinged)
    up = sorted(answered)
    size = batch_size(spec, len(up))
    jid = str(req.get("jid") or gen_jid())
    await send({"jid": jid, "minions": up, "down": sorted(targeted - answered), "batch_size": size})
    events: asyncio.Queue = asyncio.Queue()
    not_returned: dict[str, str] = {}
    pending = list(up)
    active: set[str] = set()
    tasks: set[asyncio.Task] = set()

    async def sub(ids: list[str]) -> None:
        async def on_return(mid: str, ret: dict) -> None:
            events.put_nowait(("ret", mid, ret))

        missing = await wait_job(master, jid, set(ids), timeout, gather, on_return)
        for mid, reason in missing.items():
            events.put_nowait(("missing", mid, reason))

    async def watch_gone() -> None:
        await gone.wait()
        events.put_nowait(("gone", "", None))

    watcher = asyncio.create_task(watch_gone())
    try:
        while pending or active:
            if pending and len(active) < size:
                ids, pending = pending[: size - len(active)], pending[size - len(active):]
                pub = master.publish(ids, req["fun"], list(req.get("arg") or []), tgt_type="list",
                                     ret=req.get("ret", ""), user=req.get("user", "root"), jid=jid)
                started = list(pub.get("minions") or [])
                for mid in sorted(set(ids) - set(started)):  # its key went away meanwhile
                    not_returned[mid] = no_return_reason(master, mid)
                    await send({"missing": {mid: not_returned[mid]}})
                if started:
                    await send({"batch_start": started})
                    active.update(started)
                    task = asyncio.create_task(sub(started))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                continue
            kind, mid, data = await events.get()
            if kind == "gone":
                log.info("batch job %s: the CLI left; %d minion(s) not started", jid, len(pending))
                return
            active.discard(mid)
            if kind == "ret":
                await send({"ret": {mid: data}})
            else:
                not_returned[mid] = data
                await send({"missing": {mid: data}})
        await send({"done": True, "jid": jid, "missing": sorted(not_returned),
                    "not_returned": not_returned})
    finally:
        watcher.cancel()
        for t in list(tasks):
            t.cancel()
