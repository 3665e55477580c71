"""The master daemon: binds the ZeroMQ sockets and the CLI socket, and wires the parts together.

``Master.run()`` serves until ``stop()``: the ROUTER socket (``ret_port``) goes through
:class:`~hamaster.master.reqhandler.RequestHandler`; publications go out on the PUB socket
(``publish_port``); the CLI talks over :mod:`hamaster.master.cliserver`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import os
import socket
import threading
import time
from typing import Any

import zmq
import zmq.asyncio

from hamaster import __version__, crypto, ids
from hamaster.bus import codec, messages
from hamaster.jobs.jid import gen_jid
from hamaster.keepalive import apply_tcp_keepalive
from hamaster.master.authqueue import AuthQueue, auth_minion_id
from hamaster.master.jobs import JobTracker, JobWriter
from hamaster.master.membership import DEFAULT_TTL, Membership, alive_count
from hamaster.master.pubkey import PublishKey
from hamaster.master.reqhandler import Deferred, RequestHandler
from hamaster.master.runners import RunnerContext, cluster_status_report
from hamaster.master.shared import SharedState, config_hash, open_shared_state
from hamaster.master.waiting import SILENT_HEARTBEATS
from hamaster.metrics import MasterMetrics
from hamaster.options import opt
from hamaster.pki_sync.keys import (
    KeyRegistryError,
    KeyState,
    load_or_create_master_keypair,
    master_key_names,
    public_pem_of,
    read_master_keypair,
    write_master_pub,
)
from hamaster.targeting import check_minions, expand_nodegroups

log = logging.getLogger(__name__)

STORE_WORKERS = 4      # threads for requests that need the store (_auth of unknown keys, files)
PILLAR_WORKERS = 2     # threads compiling pillar (CPU-bound: more would only crowd the loop)
#: Longest the request loop answers requests in one pass before letting other tasks run
#: (publishing, the CLI's streams, timers): a 1,000-minion burst of large returns otherwise
#: held the loop for a fifth of a second.
REQUEST_SLICE_S = 0.02
AUTH_SLICE_S = 0.05    # time per loop pass for queued _auth requests (master/authqueue.py)
# requests waiting on the store pool at once; more are dropped (minions retry)
MAX_DEFERRED = 5000
#: Period of the event-loop lag probe (hamaster_event_loop_lag_seconds), seconds.
LOOP_LAG_TICK_S = 0.1
#: ZeroMQ (ZMTP) heartbeat of the request socket, milliseconds.
ZMQ_HEARTBEAT_IVL_MS = 5000
#: ZMTP heartbeat of the publish socket, milliseconds: longer, since a subscriber only ever
#: goes away with its host or process (its minion closes and reopens its request sockets all
#: the time), and every heartbeat costs the I/O threads a walk of their timers.
ZMQ_PUB_HEARTBEAT_IVL_MS = 30000
# File-server commands: with file_roots in the shared store they read it, so they run in the
# store pool too (a hung NFS mount or a frozen etcd must not stall the loop).
FILE_COMMANDS = frozenset({
    "_master_opts", "_file_list", "_file_list_emptydirs", "_dir_list", "_symlink_list",
    "_file_hash",
    "_file_hash_and_stat", "_file_find", "_file_envs", "_serve_file",
})

CONNECTED_WINDOW = 30.0
#: The options Salt's ``_master_opts`` hands a minion (salt/master.py ``AESFuncs._master_opts``),
#: with salt-master's defaults. A stock minion's state system (``state.apply``,
#: ``saltutil.sync_*``) reads them and fails with ``KeyError`` when one is missing.
MASTER_OPTS_FOR_MINIONS: dict[str, Any] = {
    "top_file_merging_strategy": "merge",
    "env_order": [],
    "default_top": "base",
    "renderer": "jinja|yaml",
    "failhard": False,
    "state_top": "top.sls",
    "state_top_saltenv": None,
    "nodegroups": {},
    "state_auto_order": True,
    "state_events": False,
    "state_aggregate": False,
    "jinja_env": {},
    "jinja_sls_env": {},
    "jinja_lstrip_blocks": False,
    "jinja_trim_blocks": False,
}
MASTER_OPTS_ENV_ONLY = ("top_file_merging_strategy", "env_order", "default_top")
#: Seconds between two hashings of file_roots and the pillar tree (the membership record's
#: ``fileroots_hash`` / ``pillar_hash``).
TREE_HASH_INTERVAL = 10.0
DECODE_WORKERS = 2        # threads that decrypt large aes requests (Deferred.finish)
#: Bytes of large requests being decrypted at once; more are refused (``busy``; minions retry).
DECODE_BUDGET = 256 * 1024 * 1024


class Master:
    """One hamaster master process."""

    def __init__(self, opts: dict, state: SharedState | None = None) -> None:
        self.opts = opts
        self.master_id = opts.get("master_id") or socket.gethostname()
        self.metrics = MasterMetrics(self.master_id)
        self.state = state or open_shared_state(opts)
        self.keys = self.state.keys
        self.metrics.instrument_store(self.keys.store)
        self.member_ttl = float(opts.get("ha_member_ttl", DEFAULT_TTL))
        # cluster membership (hamaster/master/membership.py): record, presence, liveness
        self.membership = (Membership(self.state.store, self.master_id, self.member_ttl)
                           if self.state.store is not None else None)
        if self.membership is not None:
            self.membership.watch_lag(self.metrics.sync_lag.labels(self.master_id).observe)
        self.started_at = time.time()
        self._init_identity()
        self.publish_key = PublishKey(self.master_priv)
        self.job_cache = self.state.job_cache
        self.config_hash = config_hash(opts)
        from hamaster.fileroots.server import FileServer

        self.files = FileServer.from_opts(opts, self.state.store)
        self.job_writer = JobWriter(self.job_cache)
        self.tracker = JobTracker()
        self.grains: dict[str, dict] = {}
        self.handler = RequestHandler(
            opts,
            self.keys,
            self.master_priv,
            self.master_pub_text,
            self.publish_key,
            self.metrics,
            self._commands(),
        )
        self.handler.pillar_provider = self._pillar
        # -- pillar (hamaster/pillar/): compiled in the store pool, never on the loop --
        from hamaster.master.datacache import DEFAULT_MAX_RECORD, MinionDataCache
        from hamaster.pillar.service import PillarService

        self.data_cache = MinionDataCache(
            self.state.store, int(opts.get("minion_data_max_size") or DEFAULT_MAX_RECORD))
        self.data_cache.on_grains = self.grains.__setitem__
        self.pillar = PillarService(opts, self.state.store, on_compiled=self._on_pillar_compiled)
        self.handler.defer_pillar = True
        # -- end pillar --
        if self.files.reads_shared_store:
            self.handler.store_commands = FILE_COMMANDS
        self.keys.on_change(self._on_key_change)
        self.keys.throttle.on_throttle = self.metrics.key_throttled
        self.ctx: zmq.asyncio.Context | None = None
        self.pub_sock: zmq.asyncio.Socket | None = None
        self.router: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()
        self.fileroots_hash = ""
        self._tree_hashed_at = -TREE_HASH_INTERVAL  # monotonic time of the last tree hashing
        self._store_ok = True
        self._keys_dirty = True
        self.last_cluster_view: dict[str, dict] = {}
        self.metrics.config_info.labels(self.master_id).info({"hash": self.config_hash})
        self.ready = asyncio.Event()
        #: The heartbeat interval asked of minions so that they stay under
        #: ``max_heartbeats_per_second`` (0: no hint); refreshed by housekeeping.
        self.heartbeat_hint = 0.0
        # _auth requests wait here and get the time other requests leave (authqueue.py)
        self.auth_queue = AuthQueue.from_opts(
            opts, lambda why: self.metrics.auth_shed.labels(self.master_id, why).inc())
        # Requests that need the store (_auth of new, pending or changed keys; files from the
        # shared store) are answered here, so a slow store or a mass registration never stalls
        # the event loop that answers everyone else.
        self._store_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=STORE_WORKERS, thread_name_prefix="store-req")
        self._deferred_in_flight = 0
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=DECODE_WORKERS, thread_name_prefix="decode-req")
        self._decode_bytes = 0
        # pillar compiles (CPU-bound) get their own small pool (hamaster/pillar/service.py)
        self._pillar_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=PILLAR_WORKERS, thread_name_prefix="pillar")
        self._load_grains_cache()
        # -- event bus, leader lease, reactor, schedule (hamaster/master/events.py) --
        from hamaster.master.events import EventServices

        self.events = EventServices.for_master(self)
        self.runner_ctx = self._runner_context()

    def _runner_context(self) -> RunnerContext:
        """What runners get of this master (hamaster/master/runners.py): no more than that."""
        return RunnerContext(
            opts=self.opts, master_id=self.master_id, store=self.state.store, keys=self.keys,
            job_cache=self.job_cache, tracker=self.tracker, publish=self.publish,
            grains=self.grains,
            compile_pillar=lambda mid, grains, env: self.pillar.compiler.compile(mid, grains, env),
            blob_cache=self.files.blob_cache,
            cluster_status=functools.partial(cluster_status_report, self), events=self.events)

    # -- cluster identity (the master keypair) -----------------------------------------------------
    # One keypair for the whole cluster: taken (or created, or agreed on rsync) before anything
    # is served, then watched: a different pair in the store is adopted within a poll interval.

    def _init_identity(self) -> None:
        """Obtain the cluster's master keypair (blocks on rsync until the masters agree)."""
        store, prefix = self.keys.store, self.keys.prefix
        keysize = int(self.opts.get("keysize", 2048))
        self._identity_lock = threading.Lock()
        self._key_mismatch_store = False
        self._key_mismatch_peers: list[str] = []
        self._identity_loop: asyncio.AbstractEventLoop | None = None
        if self.state.ha and store.AGREES_MASTER_KEY:
            from hamaster.pki_sync.masterkey import agree_master_keypair

            store.start()   # the pusher carries our candidate to the peers (idempotent)
            priv_pem, pub_pem = agree_master_keypair(
                store, prefix, member_id=self.master_id,
                expected=1 + len(getattr(store, "peers", [])), keysize=keysize,
                create_now=bool(self.opts.get("ha_create_master_key")),
                poll=min(float(opt(self.opts, "ha_poll_interval")), 0.5),
                on_wait=self._announce_waiting)
        else:
            priv_pem, pub_pem = load_or_create_master_keypair(store, prefix, keysize)
        self._set_identity(priv_pem, pub_pem)
        log.info("master %s serves the cluster master key %s", self.master_id, self.master_finger)

    def _set_identity(self, priv_pem: bytes, pub_pem: bytes) -> None:
        self._master_priv_pem = priv_pem
        self.master_priv = crypto.load_private_key(priv_pem)
        self.master_pub_text = crypto.normalize_pem(pub_pem)
        self.master_finger = crypto.pem_fingerprint(self.master_pub_text)

    def _announce_waiting(self, status: dict) -> None:
        """While the rsync masters agree on the keypair: say so in our cluster record."""
        if self.membership is None or time.monotonic() - getattr(self, "_announced", -9.0) < 1.0:
            return
        self._announced = time.monotonic()
        self.membership.beat({"version": __version__, "started": self.started_at, **status})

    def _watch_identity(self) -> None:
        """Watch ``master.pem`` in the store (called from :meth:`run`, on the event loop)."""
        self._identity_loop = asyncio.get_running_loop()
        pem_key, _ = master_key_names(self.keys.prefix)

        def on_changes(changes: list) -> None:
            for change in changes:
                if change.key == pem_key:
                    self._check_store_identity(change.value)

        self.keys.store.watch(self.keys.prefix.rstrip("/"), on_changes)

    def _check_store_identity(self, priv_pem: bytes | None | bool = False) -> None:
        """Compare the store's ``master.pem`` with the key we serve; adopt a valid different one.

        ``priv_pem``: the new value from the watch (None: deleted), or False to read the store.
        Runs in the watcher thread or a worker thread; adoption happens on the event loop.
        """
        store, prefix = self.keys.store, self.keys.prefix
        pem_key, _ = master_key_names(prefix)
        with self._identity_lock:
            try:
                if priv_pem is False:
                    pair = read_master_keypair(store, prefix)
                elif priv_pem is None:
                    pair = None
                else:
                    pair = (priv_pem, public_pem_of(priv_pem))
            except (KeyRegistryError, ValueError, TypeError) as exc:
                if not self._key_mismatch_store:
                    log.error("the store's %s is not a valid private key (%s); this master keeps "
                              "serving %s: restore the cluster key file", pem_key, exc,
                              self.master_finger)
                self._key_mismatch_store = True
                self._update_mismatch_metric()
                return
            except Exception as exc:  # store down: nothing to compare with now
                log.debug("identity check skipped: %s", exc)
                return
            if pair is None:
                if priv_pem is False:   # really gone (not only a watch event): write ours back
                    log.warning("%s vanished from the store; writing back the pair this master "
                                "serves (%s)", pem_key, self.master_finger)
                    try:
                        self._restore_store_identity()
                    except Exception as exc:
                        log.warning("could not write back %s: %s", pem_key, exc)
                return
            finger = crypto.pem_fingerprint(pair[1])
            if priv_pem is False or finger != self.master_finger:
                write_master_pub(store, prefix, pair[1])   # Salt's layout follows master.pem
            if finger == self.master_finger:
                if self._key_mismatch_store:
                    log.warning("the store's master key matches this master's again (%s)", finger)
                self._key_mismatch_store = False
                self._update_mismatch_metric()
                return
        loop = self._identity_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._adopt_identity, pair[0], pair[1])

    def _restore_store_identity(self) -> None:
        pem_key, _ = master_key_names(self.keys.prefix)
        if self.keys.store.compare_and_put(pem_key, None, self._master_priv_pem):
            write_master_pub(self.keys.store, self.keys.prefix,
                             public_pem_of(self._master_priv_pem))

    def _adopt_identity(self, priv_pem: bytes, pub_pem: bytes) -> None:
        """Serve the store's keypair from now on (on the event loop): new signing key, new
        publish key, every session dropped (minions re-authenticate and check their pin)."""
        new_finger = crypto.pem_fingerprint(pub_pem)
        if new_finger == self.master_finger:
            return
        old_finger = self.master_finger
        try:
            crypto.load_private_key(priv_pem)     # RSA, consistent
        except crypto.CryptoError as exc:
            log.error("the store's master key %s cannot be used (%s); this master keeps serving %s",
                      new_finger, exc, old_finger)
            self._key_mismatch_store = True
            self._update_mismatch_metric()
            return
        log.error("the cluster master keypair in the store (%s) differs from the one this master "
                  "serves (%s): adopting the store's pair; minions that pinned %s will refuse "
                  "every master until their minion_master.pub is replaced",
                  new_finger, old_finger, old_finger)
        self._set_identity(priv_pem, pub_pem)
        self.handler.master_priv = self.master_priv
        self.handler.master_pub_text = self.master_pub_text
        self.publish_key.rekey(self.master_priv, f"master key changed {old_finger} -> {new_finger}")
        self.handler.sessions.clear()
        blob_service = getattr(self, "blob_service", None)
        if blob_service is not None:  # peers fetching file blobs now sign with the new key
            blob_service.rekey(self.master_priv)
        self._key_mismatch_store = False
        self.metrics.master_key_changes.labels(self.master_id).inc()
        self._update_mismatch_metric()

    def _check_peer_identities(self, masters: dict[str, dict]) -> None:
        """Flag live masters whose cluster record shows another master-key fingerprint."""
        differ = sorted(mid for mid, rec in masters.items()
                        if mid != self.master_id and rec.get("alive")
                        and rec.get("master_key_finger")
                        and rec.get("master_key_finger") != self.master_finger)
        if differ and differ != self._key_mismatch_peers:
            log.error("live masters %s serve another master key than this master (%s): %s",
                      ", ".join(differ), self.master_finger,
                      ", ".join(f"{m}={masters[m].get('master_key_finger')}" for m in differ))
        self._key_mismatch_peers = differ
        self._update_mismatch_metric()

    def _update_mismatch_metric(self) -> None:
        bad = self._key_mismatch_store or bool(self._key_mismatch_peers)
        self.metrics.master_key_mismatch.labels(self.master_id).set(1 if bad else 0)

    # -- end cluster identity --

    # -- wiring ---------------------------------------------------------------------------------

    def _commands(self) -> dict[str, Any]:
        return {
            "_return": self._on_return,
            "_syndic_return": lambda load: None,
            "_minion_event": self._on_minion_event,
            # load["id"] is the authenticated minion (reqhandler checks it equals the envelope's)
            "_mine": lambda load: self.data_cache.mine_store(load["id"], load.get("data"),
                                                             bool(load.get("clear"))),
            "_mine_get": self._mine_get,
            "_mine_delete": lambda load: self.data_cache.mine_delete(load["id"], load.get("fun")),
            "_mine_flush": lambda load: self.data_cache.mine_flush(load["id"]),
            "_register_resources": lambda load: True,
            "_master_tops": lambda load: {},
            "_ext_nodes": lambda load: {},
            "_master_opts": self._master_opts,
            "_file_list": self._files("file_list"),
            "_file_list_emptydirs": self._files("file_list_emptydirs"),
            "_dir_list": self._files("dir_list"),
            "_symlink_list": self._files("symlink_list"),
            "_file_hash": self._files("file_hash"),
            "_file_hash_and_stat": self._files("file_hash_and_stat"),
            "_file_find": self._files("file_find"),
            "_file_envs": lambda load: self.files.envs(),
            "_serve_file": self._serve_file,
            "_hamaster_ping": self._on_ping,
        }

    def _files(self, name: str) -> Any:
        def call(load: dict) -> Any:
            return getattr(self.files, name)(load)

        return call

    def _master_opts(self, load: dict) -> dict:
        """``_master_opts``: the environments (names only, as Salt sends them) and the
        state-system options, or only the environment ones with ``env_only``."""
        mopts: dict[str, Any] = {"file_roots": {env: [] for env in self.files.envs()}}
        for key in MASTER_OPTS_ENV_ONLY if load.get("env_only") else MASTER_OPTS_FOR_MINIONS:
            mopts[key] = self.opts.get(key, MASTER_OPTS_FOR_MINIONS[key])
        return mopts

    def _serve_file(self, load: dict) -> Any:
        ret = self.files.serve_file(load)
        data = ret.get("data") if isinstance(ret, dict) else None
        if isinstance(data, bytes | str):
            self.metrics.file_bytes_served.labels(self.master_id).inc(len(data))
        return ret

    def _on_key_change(self, mid: str, old: KeyState | None, new: KeyState | None) -> None:
        if old is KeyState.ACCEPTED and new is not KeyState.ACCEPTED:
            self.handler.forget(mid)
            if self.opts.get("rotate_aes_key", True):
                self.publish_key.rotate(f"key of {mid} left the accepted state "
                                        f"({new.value if new else 'deleted'})")
        if new is None and old is not None:
            self.data_cache.forget(mid)  # as salt-key -d clears the minion's cached data
        # Counting keys costs O(keys); a bulk accept fires one event per key. Recount at most
        # once per housekeeping pass (2 s) instead of once per event.
        self._keys_dirty = True

    def _update_key_metrics(self) -> None:
        try:
            for state, ids in self.keys.list_keys().items():
                self.metrics.keys.labels(self.master_id, state.value).set(len(ids))
        except Exception:  # metrics never break the master
            log.debug("key metrics update failed", exc_info=True)

    # -- grains cache ---------------------------------------------------------------------------

    def _grains_path(self) -> str:
        return os.path.join(self.opts["cachedir"], "minions")

    def _load_grains_cache(self) -> None:
        base = self._grains_path()
        try:
            names = os.listdir(base)
        except OSError:
            return
        for mid in names:
            try:
                with open(os.path.join(base, mid, "grains"), "rb") as fh:
                    data = codec.loads(fh.read())
                if isinstance(data, dict):
                    self.grains[mid] = data
            except (OSError, codec.DecodeError):
                continue

    def _save_grains(self, mid: str, grains: dict) -> None:
        path = os.path.join(self._grains_path(), mid, "grains")
        try:
            crypto.write_secret_file(path, codec.dumps(grains), durable=False)  # a cache
        except OSError as exc:
            log.warning("cannot cache grains of %s: %s", mid, exc)

    def _pillar(self, mid: str, load: dict) -> dict:
        grains = load.get("grains")
        if isinstance(grains, dict):
            if self.grains.get(mid) != grains:
                self.grains[mid] = grains
                self._save_grains(mid, grains)
        # Runs in the store pool; ``mid`` is the authenticated session's id.
        return self.pillar.answer(mid, load)

    def _on_pillar_compiled(self, mid: str, grains: dict, pillar: dict, secret: bool) -> None:
        if grains:
            self.data_cache.put(mid, "grains", grains)
        # a pillar holding gpg-decrypted values stays in this master's memory only
        self.data_cache.put(mid, "pillar", pillar, memory_only=secret)

    def _mine_get(self, load: dict) -> dict:
        tgt_type = load.get("tgt_type") or load.get("expr_form") or "glob"
        return self.data_cache.mine_get(load["id"], load.get("tgt"), str(tgt_type),
                                        load.get("fun"), self.resolve_targets)

    # -- request commands -------------------------------------------------------------------------

    def _on_return(self, load: dict) -> None:
        jid = load.get("jid")
        mid = load["id"]
        if not ids.valid_jid(jid):
            if jid != "req":
                self.handler.ratelog.warn("bad_jid", mid, "return from %s with invalid jid %s "
                                          "dropped", ids.shown(mid), ids.shown(jid))
                self.metrics.reject("bad_jid")
            return None
        ts = load.get("ts")
        if self.tracker.is_stale_return(jid, mid,
                                        float(ts) if isinstance(ts, int | float) else None):
            log.warning("return from %s for job %s is older than the one already received; dropped",
                        ids.shown(mid), jid)
            self.metrics.reject("stale_return")
            return None
        ret = {
            "return": load.get("return"),
            "retcode": load.get("retcode", 0),
            "success": load.get("success", True),
            "fun": load.get("fun"),
            "fun_args": load.get("fun_args", []),
            "jid": jid,
            "id": mid,
            "master_id": load.get("master_id") or self.master_id,
            "received_by": self.master_id,
        }
        if "out" in load:
            ret["out"] = load["out"]
        self.metrics.returns_received.labels(self.master_id).inc()
        latency = self.tracker.add_return(jid, mid, ret)
        if latency is not None:
            self.metrics.return_latency.labels(self.master_id).observe(latency)
        self.job_writer.put_return(jid, mid, ret)
        self.events.job_ret(jid, mid, ret)
        return None

    def _on_minion_event(self, load: dict) -> None:
        tag = load.get("tag")
        if tag:
            log.debug("event %s from %s", tag, load.get("id"))
        self.events.minion_event(load)
        return None

    def _on_ping(self, load: dict) -> dict:
        sess = self.handler.sessions.get(load["id"])
        if sess is not None:
            sess.hamaster = True
        reply = {"master_id": self.master_id, "version": __version__,
                 "aes_generation": self.publish_key.generation}
        if self.heartbeat_hint:
            reply["heartbeat_interval"] = self.heartbeat_hint
        return reply

    @property
    def connected_window(self) -> float:
        """Seconds since its last request within which a minion counts as connected."""
        return max(CONNECTED_WINDOW, SILENT_HEARTBEATS * self.heartbeat_hint)

    def _refresh_connected(self) -> None:
        """Count the connected minions; from that, the heartbeat interval to ask of them.

        With ``max_heartbeats_per_second`` R and N minions connected, minions are asked to
        heartbeat every N / R seconds (one decimal) when that is longer than 1 s; they keep
        their own ``master_heartbeat_interval`` when it is longer still. Nomad servers space
        their clients' heartbeats the same way: a fleet's liveness traffic stays bounded.
        """
        connected = self.handler.connected_count(self.connected_window)
        self.metrics.minions_connected.labels(self.master_id).set(connected)
        rate = float(self.opts["max_heartbeats_per_second"])
        hint = round(connected / rate, 1) if rate > 0 else 0.0
        self.heartbeat_hint = hint if hint > 1.0 else 0.0

    # -- publishing --------------------------------------------------------------------------------

    def resolve_targets(self, tgt: Any, tgt_type: str) -> list[str]:
        """Accepted minions matching the target, judged on cached grains and pillar
        (nodegroups expanded from the ``nodegroups`` option)."""
        tgt, tgt_type = expand_nodegroups(tgt, tgt_type, self.opts.get("nodegroups") or {})
        return check_minions(tgt, tgt_type, self.keys.accepted_ids(), self.grains.get,
                             pillar_of=self.data_cache.pillar_of)

    def publish(
        self,
        tgt: Any,
        fun: str,
        arg: list,
        tgt_type: str = "glob",
        ret: str = "",
        user: str = "root",
        jid: str | None = None,
        extra: dict | None = None,
    ) -> dict:
        """Publish a job; returns ``{"jid", "minions"}`` or ``{"jid": None, "error"}``."""
        try:
            # minions cannot expand nodegroups: publish the compound target they stand for
            tgt, tgt_type = expand_nodegroups(tgt, tgt_type, self.opts.get("nodegroups") or {})
            minions = self.resolve_targets(tgt, tgt_type)
        except ValueError as exc:
            return {"jid": None, "minions": [], "error": f"invalid target: {exc}"}
        if not minions:
            return {"jid": None, "minions": [],
                    "error": "No minions matched the target. No command was sent, "
                             "no jid was assigned."}
        if jid and not ids.valid_jid(jid):
            return {"jid": None, "minions": [], "error": f"invalid jid {ids.shown(jid)}: expected "
                    "20 digits YYYYMMDDhhmmssffffff that are a real time"}
        jid = jid or gen_jid()
        inner: dict[str, Any] = {
            "fun": fun,
            "arg": list(arg),
            "tgt": tgt,
            "jid": jid,
            "ret": ret,
            "tgt_type": tgt_type,
            "user": user,
        }
        if extra:
            inner.update(extra)
        inner["master_id"] = self.master_id
        inner["serial"] = self.publish_key.next_serial()
        frame = messages.wrap_publication(self.publish_key.cipher, self.master_priv, inner)
        self._send_publication(frame, minions, tgt_type)
        load = {k: v for k, v in inner.items() if k != "serial"}
        load["minions"] = minions
        load["_stamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec = self.tracker.add(jid, load, minions)
        self.job_writer.put_load(jid, rec.load)  # a batch run's jid: every minion so far
        self.events.job_new(jid, load, minions)
        self.metrics.jobs_published.labels(self.master_id).inc()
        return {"jid": jid, "minions": minions}

    def _send_publication(self, frame: bytes, minions: list[str], tgt_type: str) -> None:
        assert self.pub_sock is not None
        if self.opts.get("zmq_filtering"):
            if tgt_type == "list" or len(minions) == 1:
                for mid in minions:
                    topic = hashlib.sha1(mid.encode()).hexdigest().encode()
                    self.pub_sock.send_multipart([topic, frame])
            else:
                self.pub_sock.send_multipart([b"broadcast", frame])
        else:
            self.pub_sock.send(frame)

    # -- sockets -----------------------------------------------------------------------------------

    def _bind(self) -> None:
        # Several I/O threads, each with its share of the connections: libzmq cancels a timer
        # by walking every timer of its thread, and every heartbeat answered cancels one, so
        # the heartbeat cost grows with the square of one thread's connections
        # (docs/scaling.md: 0.49 of a core for 10,000 connections on one thread, 0.09 on 4).
        self.ctx = zmq.asyncio.Context(io_threads=int(self.opts["zmq_io_threads"]))
        self.ctx.max_sockets = 65536
        iface = self.opts["interface"]
        host = f"[{iface}]" if ":" in iface else iface
        self.pub_sock = self.ctx.socket(zmq.PUB)
        self.pub_sock.setsockopt(zmq.LINGER, 0)
        self.pub_sock.setsockopt(zmq.SNDHWM, 100000)
        # ZeroMQ heartbeats drop a peer that stopped answering (within 90 s here, 15 s on the
        # request socket), with what it had queued: a minion that gave up on a request and
        # closed its socket costs the master nothing more. They are not free (zmq_io_threads
        # above; docs/scaling.md). TCP keepalive (Salt's tcp_keepalive* options) also finds
        # peers that vanished without a word, at no cost to the process.
        self.pub_sock.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_PUB_HEARTBEAT_IVL_MS)
        self.pub_sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ZMQ_PUB_HEARTBEAT_IVL_MS)
        apply_tcp_keepalive(self.pub_sock, self.opts)
        # Salt's zmq_backlog (default 1000; ZeroMQ's own is 100): the listen queue a fleet's
        # reconnect storm lands in (the kernel caps it at net.core.somaxconn).
        backlog = int(self.opts.get("zmq_backlog") or 1000)
        self.pub_sock.setsockopt(zmq.BACKLOG, backlog)
        if ":" in iface:
            self.pub_sock.setsockopt(zmq.IPV6, 1)
        self.pub_sock.bind(f"tcp://{host}:{self.opts['publish_port']}")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # libzmq drops a connection that announces a bigger frame, before reading it.
        self.router.setsockopt(zmq.MAXMSGSIZE, self.handler.max_request + 1024)
        self.router.setsockopt(zmq.RCVHWM, 100000)
        self.router.setsockopt(zmq.SNDHWM, 100000)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_IVL_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ZMQ_HEARTBEAT_IVL_MS)
        apply_tcp_keepalive(self.router, self.opts)
        self.router.setsockopt(zmq.BACKLOG, backlog)
        if ":" in iface:
            self.router.setsockopt(zmq.IPV6, 1)
        self.router.bind(f"tcp://{host}:{self.opts['ret_port']}")
        log.info(
            "master %s listening: publish %s:%s, requests %s:%s",
            self.master_id, iface, self.opts["publish_port"], iface, self.opts["ret_port"],
        )

    async def _serve_requests(self) -> None:
        """Answer requests: wait for the ROUTER to be readable, then drain it without awaiting.

        Draining through a synchronous shadow of the socket costs one event-loop wake-up per
        burst instead of one per request (a 1,000-minion return burst is one burst).
        """
        assert self.router is not None
        router = self.router
        sync = zmq.Socket.shadow(router.underlying)
        while not self._stop.is_set():
            # queued auths and room in the store pool for them: look at the socket, don't wait
            auths = bool(self.auth_queue) and self._deferred_in_flight < MAX_DEFERRED
            try:
                await router.poll(timeout=0 if auths else 10 if self.auth_queue else 1000,
                                  flags=zmq.POLLIN)
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                log.warning("ROUTER poll error: %s", exc)
                continue
            except asyncio.CancelledError:
                return
            end = time.monotonic() + REQUEST_SLICE_S
            for _ in range(2000):
                if time.monotonic() > end:
                    break       # the rest waits one pass: the loop's other tasks run first
                try:
                    frames = sync.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    log.warning("ROUTER receive error: %s", exc)
                    break
                self._answer(sync, frames)
            if self.auth_queue:
                self._answer_queued_auths(sync)
            self.metrics.auth_queue.labels(self.master_id).set(len(self.auth_queue))
            await asyncio.sleep(0)  # let the other tasks run between bursts

    def _answer_queued_auths(self, sock: zmq.Socket) -> None:
        """Answer queued ``_auth`` requests for one time slice (everything else went first)."""
        end = time.monotonic() + AUTH_SLICE_S
        while time.monotonic() < end and self._deferred_in_flight < MAX_DEFERRED:
            item = self.auth_queue.take()
            if item is None:
                return
            self._reply_to(sock, *item)

    def _answer(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Handle one ROUTER message and send the reply (never blocks: ROUTER drops at HWM)."""
        if len(frames) < 2:
            self.metrics.reject("malformed")
            return
        ident = frames[0]
        payload = frames[-1]
        envelope = frames[1:-1]
        if envelope and envelope != [b""]:
            self.metrics.reject("malformed")
            self.handler.ratelog.warn("frames", ident.hex(),
                                      "dropped a request with %d frames from %s", len(frames),
                                      ident.hex())
            return
        mid = auth_minion_id(payload)
        if mid is not None:
            self.auth_queue.offer(mid, (ident, envelope, payload, time.monotonic()))
            return
        self._reply_to(sock, ident, envelope, payload)

    def _reply_to(self, sock: zmq.Socket, ident: bytes, envelope: list[bytes], payload: bytes,
                  arrived: float | None = None) -> None:
        reply = self.handler.handle(payload, peer=ident.hex(), allow_defer=True)
        if isinstance(reply, Deferred):
            if arrived is not None and reply.finish is None:
                reply = self._unless_stale(reply, arrived)
            self._run_deferred(sock, ident, envelope, reply)
            return
        self._send_reply(sock, ident, envelope, reply)

    def _unless_stale(self, work: Deferred, arrived: float) -> Deferred:
        """A queued ``_auth`` that needs the store: skipped (no reply, counted ``stale``) if it
        has waited past ``auth_queue_max_age`` by the time a store thread gets to it: with a slow
        store, the work of a storm's new keys otherwise outlives the minions' wait for it."""
        max_age = self.auth_queue.max_age

        def run() -> bytes | None:
            if time.monotonic() - arrived > max_age:
                self.metrics.auth_shed.labels(self.master_id, "stale").inc()
                return None
            return work.run()

        return Deferred(run, kind=work.kind)

    @staticmethod
    def _send_reply(sock: zmq.Socket, ident: bytes, envelope: list[bytes], reply: bytes) -> None:
        try:
            sock.send_multipart([ident, *envelope, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("reply to %s not delivered: %s", ident.hex(), exc)

    def _run_deferred(self, sock: zmq.Socket, ident: bytes,
                      envelope: list[bytes], work: Deferred) -> None:
        """Decide ``work`` in the store pool; the reply is sent from the loop thread when done."""
        if work.finish is not None:
            self._run_decode(sock, ident, envelope, work)
            return
        if self._deferred_in_flight >= MAX_DEFERRED:
            # The minion retries after its request timeout; nothing is lost by not queueing more.
            self.metrics.reject("busy")
            self.handler.ratelog.warn("busy", "store-pool", "%d requests waiting on the store; "
                                      "dropped a request from %s (the minion retries)",
                                      MAX_DEFERRED, ident.hex())
            return
        self._deferred_in_flight += 1
        pool = self._pillar_pool if work.kind == "pillar" else self._store_pool
        fut = asyncio.get_running_loop().run_in_executor(pool, work.run)

        def done(f: asyncio.Future) -> None:
            self._deferred_in_flight -= 1
            if f.cancelled() or f.exception() is not None:
                log.error("deferred request from %s failed: %r", ident.hex(),
                          None if f.cancelled() else f.exception())
                return
            if not self._stop.is_set() and f.result() is not None:  # None: shed as stale
                self._send_reply(sock, ident, envelope, f.result())

        fut.add_done_callback(done)

    def _run_decode(self, sock: zmq.Socket, ident: bytes,
                    envelope: list[bytes], work: Deferred) -> None:
        """Decrypt a large aes request in the decode pool, then finish it on the loop thread."""
        if self._decode_bytes + work.size > DECODE_BUDGET:
            self.metrics.reject("busy")
            self.handler.ratelog.warn("busy", "decode-pool", "%d bytes of large requests being "
                                      "decrypted; dropped one from %s (the minion retries)",
                                      self._decode_bytes, ident.hex())
            return
        self._decode_bytes += work.size
        fut = asyncio.get_running_loop().run_in_executor(self._decode_pool, work.run)

        def done(f: asyncio.Future) -> None:
            self._decode_bytes -= work.size
            if f.cancelled() or f.exception() is not None or self._stop.is_set():
                return
            assert work.finish is not None
            reply = work.finish(f.result())
            if isinstance(reply, Deferred):
                self._run_deferred(sock, ident, envelope, reply)
            else:
                self._send_reply(sock, ident, envelope, reply)

        fut.add_done_callback(done)

    async def _watch_loop_lag(self) -> None:
        """Observe how late the event loop wakes a timer (``hamaster_event_loop_lag_seconds``):
        anything that holds the loop (CPU work with the GIL, a blocking call) delays every
        minion's answer by as much."""
        observe = self.metrics.loop_lag.labels(self.master_id).observe
        while not self._stop.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(LOOP_LAG_TICK_S)
            observe(max(0.0, time.monotonic() - t0 - LOOP_LAG_TICK_S))

    async def _housekeeping(self) -> None:
        keep = float(self.opts.get("keep_jobs", 24))
        last_clean = 0.0
        while not self._stop.is_set():
            if self._keys_dirty:
                self._keys_dirty = False
                self._update_key_metrics()
            if not self.state.ha:
                self.metrics.masters_alive.labels(self.master_id).set(1)
                await self._refresh_tree_hashes()
            self._refresh_connected()
            self.metrics.store_up.labels(self.master_id).set(1 if self.keys.store.healthy() else 0)
            self.handler.ratelog.flush()
            if self.state.ha and self.keys.store.healthy():  # cluster identity: a safety net
                await asyncio.to_thread(self._check_store_identity)
            now = time.time()
            if keep and now - last_clean > 3600:
                last_clean = now
                try:
                    await asyncio.to_thread(self.job_cache.clean_old, keep)
                except Exception as exc:
                    log.warning("job cache cleanup failed: %s", exc)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=2.0)
            except TimeoutError:
                pass

    async def _refresh_tree_hashes(self) -> None:
        """Re-hash file_roots and the pillar tree when :data:`TREE_HASH_INTERVAL` has passed
        since the last time (called from the membership heartbeat, or from housekeeping on a
        single master); the hashes go into this master's record and metrics."""
        now = time.monotonic()
        if now - self._tree_hashed_at <= TREE_HASH_INTERVAL:
            return
        self._tree_hashed_at = now
        try:
            self.fileroots_hash = await asyncio.to_thread(self.files.manifest_hash)
            self.metrics.fileroots_info.labels(self.master_id).info({"hash": self.fileroots_hash})
        except Exception as exc:
            log.warning("cannot hash file_roots: %s", exc)
        try:
            await asyncio.to_thread(self.pillar.refresh_hash)
        except Exception as exc:
            log.warning("cannot hash the pillar tree: %s", exc)

    def cluster_record(self) -> dict:
        """What this master says about itself in ``cluster/masters/<master_id>``."""
        return {
            "master_id": self.master_id,
            "version": __version__,
            "ts": time.time(),
            "ttl": self.member_ttl,
            "started": self.started_at,
            "config_hash": self.config_hash,
            "master_key_finger": self.master_finger,  # cluster identity
            "state": "serving",
            "fileroots_hash": self.fileroots_hash,
            "pillar_hash": self.pillar.tree_hash,
            "store_ok": self.keys.store.healthy(),
            "minions_connected": self.handler.connected_count(self.connected_window),
            "address": f"{self.opts['interface']}:{self.opts['ret_port']}",
            "blob_address": getattr(self, "blob_address", ""),  # file blobs (fileroots/blobs.py)
        }

    async def _cluster_heartbeat(self) -> None:
        """Write our membership record every second; refresh the file_roots hash now and then."""
        assert self.membership is not None
        membership = self.membership
        while not self._stop.is_set():
            await self._refresh_tree_hashes()
            try:
                await asyncio.to_thread(membership.beat, self.cluster_record())
            except Exception as exc:
                if self._store_ok:
                    log.error("shared store unreachable, serving from memory: %s", exc)
                self._store_ok = False
            else:
                if not self._store_ok:
                    log.warning("shared store reachable again")
                self._store_ok = True
            try:
                alive = await asyncio.to_thread(membership.masters)
                self.metrics.masters_alive.labels(self.master_id).set(alive_count(alive))
                self._check_peer_identities(alive)  # cluster identity
            except Exception:
                pass
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def cluster_masters(self) -> dict[str, dict]:
        """Every master that ever registered, with ``alive`` and ``last_seen_s``
        (:func:`hamaster.master.membership.read_masters`)."""
        assert self.membership is not None
        return self.membership.masters()

    # -- key-change barrier (hamaster/pki_sync/confirm.py) ------------------------------------

    def _start_key_confirmations(self) -> Any:
        """Answer key-change requests (``hamaster-key`` waits for every live master's ack)."""
        from hamaster.pki_sync.confirm import KeyChangeResponder

        assert self.state.store is not None
        self._loop = asyncio.get_running_loop()
        responder = KeyChangeResponder(self.state.store, self.keys, self.master_id,
                                       fence=self._key_change_fence)
        responder.attach()
        return responder

    def _key_change_fence(self, ids: list[str]) -> int:
        """Run on the event loop (so no publication prepared under the old publish key is still
        being built), drop the sessions of ``ids`` there; returns the publish key generation.
        Called from the responder's thread; raises TimeoutError if the loop does not answer."""
        async def apply() -> int:
            for mid in ids:
                self.handler.forget(mid)
            return self.publish_key.generation

        fut = asyncio.run_coroutine_threadsafe(apply(), self._loop)
        try:
            return fut.result(timeout=2.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("event loop busy for 2 s") from None

    def _mark_stopped(self) -> None:
        """Say in ``cluster/masters/<id>`` that this master stopped (no one waits on it)."""
        assert self.membership is not None
        try:
            self.membership.leave(self.cluster_record())
        except Exception as exc:
            log.warning("could not mark this master stopped in the store: %s", exc)

    async def _sync_remote_returns(self) -> None:
        """For jobs a CLI is waiting on, pick up returns that reached other masters."""
        assert self.state.store is not None
        interval = float(opt(self.opts, "ha_poll_interval"))
        while not self._stop.is_set():
            for jid in list(self.tracker.waiters):
                rec = self.tracker.jobs.get(jid)
                if rec is None or set(rec.returns) >= set(rec.minions):
                    continue
                try:
                    rets = await asyncio.to_thread(self.job_cache.get_new_returns, jid,
                                                   frozenset(rec.returns))
                except Exception:
                    continue
                for mid, ret in rets.items():
                    if mid not in rec.returns:
                        self.tracker.add_return(jid, mid, ret)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except TimeoutError:
                pass

    def _start_metrics(self) -> Any:
        """Serve ``/metrics`` on ``metrics_interface:metrics_port`` (0 disables it)."""
        port = int(self.opts.get("metrics_port") or 0)
        if not port:
            return None
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port,
                                            addr=self.opts.get("metrics_interface", "127.0.0.1"),
                                            registry=self.metrics.registry)
        log.info("metrics on http://%s:%s/metrics",
                 self.opts.get("metrics_interface", "127.0.0.1"), port)
        return server

    async def run(self) -> None:
        """Serve until :meth:`stop` is called."""
        from hamaster.master.cliserver import CliServer

        self._stop = asyncio.Event()
        self.keys.load()
        self.keys.attach_watch()
        key_confirm = self._start_key_confirmations() if self.state.ha else None
        if self.state.ha:
            self._watch_identity()  # cluster identity
        self.keys.store.start()
        if key_confirm is not None:
            key_confirm.start()
        await asyncio.to_thread(self.data_cache.start)  # minion data cache (grains, pillar, mine)
        self._update_key_metrics()
        self.job_writer.start()
        self._bind()
        cli = CliServer(self)
        await cli.start()
        metrics_server = self._start_metrics()
        tasks = [
            asyncio.create_task(self._serve_requests(), name="requests"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self._watch_loop_lag(), name="loop-lag"),
        ]
        if self.state.ha:
            tasks.append(asyncio.create_task(self._cluster_heartbeat(), name="cluster-heartbeat"))
            tasks.append(asyncio.create_task(self._sync_remote_returns(), name="remote-returns"))
        # -- file blobs between masters (hamaster/fileroots/blobs.py) --
        from hamaster.fileroots.blobs import BlobService, peer_addresses

        blob_service = self.blob_service = BlobService.from_opts(
            self.opts, self.state.store, self.files.blob_cache, self.master_priv,
            peers=lambda: peer_addresses(self.cluster_masters(), self.master_id))
        if blob_service is not None:
            await blob_service.start()
            self.files.set_blob_missing(blob_service.request_sync)
            self.blob_address = blob_service.address
            tasks.append(
                asyncio.create_task(blob_service.sync_forever(self._stop), name="file-blobs"))
        # -- end file blobs --
        await self.events.start()  # event bus, leader lease, reactor, schedule
        # -- REST API (hamaster/api): its own thread and event loop --
        api_service = None
        from hamaster.api import api_options

        apiopts = api_options(self.opts)
        if apiopts is not None:
            from hamaster.api.server import ApiService
            from hamaster.master.apibridge import MasterApiBridge

            api_service = ApiService(MasterApiBridge(self, asyncio.get_running_loop()), apiopts)
            await api_service.start()
        # -- end REST API --
        self.ready.set()
        log.info("master %s ready (hamaster %s)", self.master_id, __version__)
        try:
            await self._stop.wait()
        finally:
            if api_service is not None:  # REST API first: its requests may need this loop
                await asyncio.to_thread(api_service.close)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.close()  # event bus, leader lease, reactor, schedule
            if key_confirm is not None:
                await asyncio.to_thread(key_confirm.close)   # its fence may need this loop
                await asyncio.to_thread(self._mark_stopped)
            if blob_service is not None:  # file blobs
                self.files.set_blob_missing(None)
                await blob_service.close()
            await cli.close()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.job_writer.stop()
            self.data_cache.stop()
            self._store_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._pillar_pool.shutdown(wait=False, cancel_futures=True)
            self.pillar.close()
            self.keys.store.close()
            if self.router is not None:
                self.router.close(0)
            if self.pub_sock is not None:
                self.pub_sock.close(0)
            if self.ctx is not None:
                self.ctx.term()
            log.info("master %s stopped", self.master_id)

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()
