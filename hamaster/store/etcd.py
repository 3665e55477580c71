"""The etcd store: keys under a prefix in an etcd v3 cluster, native watch, leases, transactions.

Client: ``etcd-sdk-python`` (imported as ``pyetcd``; the ``etcd3`` API on current
grpcio/protobuf). One :class:`pyetcd.MultiEndpointEtcd3Client` with failover over every
``ha_etcd_endpoints`` entry; it is created lazily in the process that uses it and re-created
after ``fork()`` (a gRPC channel inherited across fork does not work in the child).

Mapping: store key ``k`` is etcd key ``<prefix>/k`` (``prefix`` defaults to ``/hamaster``).

- ``compare_and_put`` is one etcd transaction: create-if-absent compares ``version == 0``,
  replace/delete compare ``value == expected``. If a transaction times out (outcome unknown) it
  is retried; a retry that fails its precondition although the key now holds exactly our value
  counts as success (our first attempt landed).
- ``put_many`` writes transactions of up to :data:`TXN_MAX_OPS` puts (etcd's default
  ``--max-txn-ops`` is 128) and at most :data:`TXN_MAX_BYTES` of values each.
- ``watch``: per watched prefix a snapshot ``{key: mod_revision}`` and the revision ``rev`` it
  is consistent at. A native prefix watch starting at ``rev + 1`` feeds a queue; the store's
  thread (``start()``) applies each watch response as one batch, skipping events at or below
  ``rev`` (so a resync and the stream never double-report). When the stream breaks (member
  down, failover, quorum lost) the watch is re-established with a *resync*: a paged re-list at
  one revision, diffed against the snapshot (changes, and deletions as ``value=None``), then a
  new watch from that revision + 1, so no change is missed even if the history was compacted.
  ``poll_now`` drains queued events and does the same resync for every watch synchronously.
  A full resync also runs every ``resync_interval`` seconds as a safety net.
- Membership: ``heartbeat`` keeps one lease per member (TTL rounded up to whole seconds, at
  least 1) and puts ``cluster/members/<id>`` attached to it; a master that stops heartbeating
  disappears when etcd expires its lease. ``members()`` lists the live ones: the liveness
  :mod:`hamaster.master.membership` reads.
- A leader election (the leader killed or partitioned) is invisible to callers: fast failures
  (refused connection, ``no leader``, ``leader changed``) are retried on every endpoint with a
  short back-off, and each attempt waits at most ``timeout / 3`` (a write forwarded to a dead
  leader otherwise hangs for etcd's own ~7 s), until one ``timeout`` has passed; only then is
  the store unavailable. A broken watch stream is re-established the same way.
- Unavailability (no member reachable, no quorum: an RPC exceeds ``timeout``) raises
  :class:`StoreUnavailable` naming the endpoints and the cause, and turns ``healthy()`` False.
  Writes are never queued or dropped silently. A write that timed out has an unknown outcome:
  etcd may still commit it when quorum returns (measured in the contract suite), so callers
  retry idempotently and watches report it if it lands. Reads are linearizable (never stale), so
  they fail too without quorum; masters serve from their in-memory views meanwhile.
- Leader lease: ``leases/<name>/holder`` (``{"holder", "epoch"}``) is attached to an etcd
  lease of ``ttl`` seconds that the holder keeps alive; ``leases/<name>/epoch`` counts holders.
  Taking the lease is one transaction: the holder key is absent and the epoch counter is what
  we read, then put both. etcd expires a holder that stops renewing. ``fenced_create`` is one
  transaction comparing the holder key with our record and the target key's version with 0.
- Values are limited to :data:`MAX_VALUE_BYTES` (etcd's default request limit is 1.5 MiB):
  large files belong in a content store addressed by hash, with only a manifest in etcd.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hamaster.options import FLOAT, HOST, STR, STR_LIST, STR_OR_NONE, Option, opt, with_defaults
from hamaster.store.base import (
    LEASES_PREFIX,
    MEMBERS_PREFIX,
    Change,
    Lease,
    LeaseInfo,
    Store,
    StoreError,
    StoreUnavailable,
    WatchCallback,
    validate_key,
    validate_lease_name,
    validate_prefix,
)

log = logging.getLogger(__name__)

TXN_MAX_OPS = 100
TXN_MAX_BYTES = 1_000_000
MAX_VALUE_BYTES = 1_000_000
PAGE = 500
GRPC_MAX_MSG = 64 * 1024 * 1024


# Pacing of retries after fast failures (an election, a refused connection):
# 50 ms doubling to 0.5 s.
RETRY_PAUSE = 0.05
RETRY_PAUSE_MAX = 0.5
ATTEMPT_TIMEOUT_MIN = 0.5


def _grpc_details(exc: BaseException | None) -> str:
    """The gRPC status details behind ``exc`` (pyetcd raises its own exceptions from them)."""
    seen = 0
    while exc is not None and seen < 4:
        details = getattr(exc, "details", None)
        if callable(details):
            try:
                return str(details() or "")
            except Exception:
                return ""
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return ""


def _permanent(exc: BaseException) -> bool:
    """True for a gRPC refusal that no retry changes (bad request, too large, not allowed)."""
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    return code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED)


def _server_timed_out(exc: BaseException) -> bool:
    """True for a gRPC error where the etcd member itself gave up waiting (no quorum)."""
    details = _grpc_details(exc)
    return "deadline exceeded" in details or "request timed out" in details


def _no_leader(exc: BaseException) -> bool:
    """True when a member answered that it has no leader (an election, or quorum lost)."""
    details = _grpc_details(exc)
    return "no leader" in details or "leader changed" in details


def _prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    arr = bytearray(prefix)
    for i in range(len(arr) - 1, -1, -1):
        if arr[i] < 0xFF:
            arr[i] += 1
            return bytes(arr[: i + 1])
    return b"\0"


def _parse_endpoint(ep: str) -> tuple[str, int]:
    ep = ep.strip()
    for scheme in ("http://", "https://"):
        if ep.startswith(scheme):
            ep = ep[len(scheme):]
    ep = ep.rstrip("/")
    host, sep, port = ep.rpartition(":")
    if not sep or not port.isdigit():
        return ep, 2379
    return host.strip("[]"), int(port)


@dataclass
class _EWatch:
    prefix: str                      # store prefix ('' = everything)
    callbacks: list[WatchCallback] = field(default_factory=list)
    revs: dict[str, int] = field(default_factory=dict)   # key -> mod_revision
    rev: int = 0                     # snapshot consistent up to this revision
    synced: bool = False             # snapshot taken at least once
    active: bool = False             # a native watch stream is feeding us
    gen: int = 0                     # generation: responses from older streams are ignored
    watch_id: Any = None


class EtcdStore(Store):
    """A :class:`Store` on an etcd v3 cluster."""

    NAME = "etcd"
    OPTIONS = (
        Option("ha_etcd_endpoints", [], STR_LIST, "etcd client endpoints, `host:port`.", HOST),
        Option("ha_etcd_prefix", "/hamaster", STR, "Key prefix of this cluster in etcd.", HOST),
        Option("ha_etcd_ca", None, STR_OR_NONE, "CA file: TLS to etcd.", HOST),
        Option("ha_etcd_cert", None, STR_OR_NONE, "Client certificate file (TLS).", HOST),
        Option("ha_etcd_key", None, STR_OR_NONE, "Client key file (TLS).", HOST),
        Option("ha_etcd_timeout", 5.0, FLOAT, "Seconds an etcd request may take.", HOST),
    )
    LEASES = True
    PEER_BLOBS = True

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> EtcdStore:
        """The store on ``ha_etcd_endpoints`` (a list, or a string of comma/space separated)."""
        poll = float(opt(opts, "ha_poll_interval"))
        opts = with_defaults(opts, cls.OPTIONS)
        endpoints = opts.get("ha_etcd_endpoints") or []
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.replace(",", " ").split() if e]
        if not endpoints:
            raise StoreError("ha_backend etcd needs ha_etcd_endpoints: [host:port, ...]")
        return cls(endpoints, prefix=opts["ha_etcd_prefix"] or "/hamaster",
                   ca=opts["ha_etcd_ca"], cert=opts["ha_etcd_cert"], key=opts["ha_etcd_key"],
                   timeout=float(opts["ha_etcd_timeout"]), poll_interval=poll)

    def __init__(self, endpoints: builtins.list[str], prefix: str = "/hamaster",
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 timeout: float = 5.0, poll_interval: float = 0.5,
                 resync_interval: float = 60.0, endpoint_retry: float = 1.0):
        """Configure the store; nothing connects until the first operation."""
        if not endpoints:
            raise StoreError("ha_backend etcd needs ha_etcd_endpoints (a list of host:port)")
        self.endpoints = [_parse_endpoint(ep) for ep in endpoints]
        self.base = (prefix or "").rstrip("/") + "/"
        self.ca, self.cert, self.key = ca, cert, key
        if (cert or key) and not ca:
            raise StoreError("ha_etcd_cert/ha_etcd_key need ha_etcd_ca (TLS to etcd)")
        self.timeout = float(timeout)
        # One RPC may wait this long before it is retried elsewhere: a write forwarded to a
        # leader that just died hangs until etcd's own request timeout (~7 s), so waiting for the
        # whole ``timeout`` in one attempt would turn every leader election into an error.
        self.attempt_timeout = max(ATTEMPT_TIMEOUT_MIN, self.timeout / 3)
        self.poll_interval = float(poll_interval)
        self.resync_interval = float(resync_interval)
        self.endpoint_retry = float(endpoint_retry)
        self._client_obj: Any = None
        self._client_pid = 0
        self._client_lock = threading.Lock()
        self._lock = threading.RLock()          # watches: snapshots and dispatch order
        self._lease_lock = threading.Lock()
        self._leases: dict[str, tuple[int, int]] = {}   # member -> (lease id, ttl)
        self._held: dict[tuple[str, str], tuple[int, int, bytes]] = {}  # -> (lease, epoch, rec)
        self._watches: dict[str, _EWatch] = {}
        self._events: queue.Queue = queue.Queue()
        self._healthy = True
        self._last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_resync = time.monotonic()
        self._timeout_at = -1e9                 # when a request last timed out (any thread)

    # ------------------------------------------------------------------ client

    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _client(self) -> Any:
        pid = os.getpid()
        with self._client_lock:
            if self._client_obj is not None and self._client_pid == pid:
                return self._client_obj
            if self._client_obj is not None:   # inherited across fork: never reuse
                self._client_obj = None
                for w in self._watches.values():
                    w.active = False
                    w.gen += 1
                self._thread = None
                self._events = queue.Queue()
                self._leases.clear()
            import pyetcd

            creds = None
            if self.ca:
                creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(
                    self.ca, self.key, self.cert)
            opts = [
                ("grpc.max_receive_message_length", GRPC_MAX_MSG),
                ("grpc.max_send_message_length", GRPC_MAX_MSG),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ]
            eps = [pyetcd.Endpoint(h, p, secure=creds is not None, creds=creds,
                                   time_retry=self.endpoint_retry, opts=opts)
                   for h, p in self.endpoints]
            self._client_obj = pyetcd.MultiEndpointEtcd3Client(
                endpoints=eps, timeout=self.attempt_timeout, failover=True)
            self._client_pid = pid
            return self._client_obj

    def _ok(self) -> None:
        if not self._healthy:
            log.warning("etcd store %s reachable again", self.describe())
        self._healthy = True

    def _down(self, msg: str) -> None:
        if self._healthy:
            log.error("etcd store unavailable: %s (serving from memory until it returns)", msg)
        self._healthy = False
        self._last_error = msg

    def _fail(self, what: str, exc: BaseException) -> StoreUnavailable:
        from pyetcd import exceptions as ex

        if isinstance(exc, ex.ConnectionTimeoutError) or _server_timed_out(exc):
            cause = (f"no answer within {self.timeout:g}s (etcd has no quorum or is "
                     "overloaded; a write may still be applied when quorum returns)")
        elif isinstance(exc, ex.NoServerAvailableError):
            cause = "no endpoint reachable (members down, network, or a TLS mismatch)"
            if time.monotonic() - self._timeout_at < 4 * self.timeout + 2:
                cause += (f"; a member that answered recently took over {self.timeout:g}s: "
                          "etcd likely has no quorum")
        elif _no_leader(exc):
            cause = (f"etcd has no leader (quorum lost, or an election that did not end within "
                     f"{self.timeout:g}s)")
        elif isinstance(exc, ex.ConnectionFailedError):
            cause = "connection failed (members down, network, or a TLS mismatch)"
        else:
            cause = f"{type(exc).__name__}: {exc}"
        msg = f"etcd {self.describe()}: {what} failed: {cause}"
        self._down(msg)
        return StoreUnavailable(msg)

    def _pause_before_retry(self, client: Any, exc: BaseException, deadline: float,
                            pause: float) -> bool:
        """After a fast failure, wait ``pause`` and say whether to try again before ``deadline``.

        A fast failure (refused connection, ``no leader``, ``leader changed``: gRPC UNAVAILABLE)
        is what a leader election looks like from a client, and elections end within a second or
        two. The client library marks every endpoint that answered UNAVAILABLE as failed for
        ``ha_etcd_endpoint_retry`` seconds, so during an election it soon has none left; they are
        made eligible again here, and the request is retried until the deadline (one
        ``ha_etcd_timeout`` after it started) rather than surfacing an error for a cluster that
        still has quorum.
        """
        from pyetcd import exceptions as ex

        if time.monotonic() + pause >= deadline:
            return False
        if isinstance(exc, ex.NoServerAvailableError):
            for endpoint in getattr(client, "endpoints", {}).values():
                endpoint.last_failed = 0
        time.sleep(pause)
        return True

    def _out_of_time(self, deadline: float) -> bool:
        """After a timed-out attempt: True when another attempt would end well past ``deadline``."""
        return deadline - time.monotonic() < self.attempt_timeout / 2

    def _call(self, what: str, fn: Any) -> Any:
        """Run ``fn(client)``, failing over between endpoints; StoreUnavailable at the end.

        Failures are retried on any endpoint until one ``timeout`` has passed, so a leader
        election is invisible to callers: fast ones (refused, ``no leader``) after a short
        pause, attempts that time out (each gets ``attempt_timeout``) at once.
        """
        import grpc
        from pyetcd import exceptions as ex

        deadline = time.monotonic() + self.timeout
        pause = RETRY_PAUSE
        last: BaseException | None = None
        timed_out: BaseException | None = None
        no_leader: BaseException | None = None
        while True:
            client = self._client()
            try:
                result = fn(client)
            except ex.ConnectionTimeoutError as exc:
                last = timed_out = exc
                self._timeout_at = time.monotonic()
                if self._out_of_time(deadline):
                    break
                continue
            except ex.PreconditionFailedError as exc:
                raise StoreError(f"etcd {self.describe()}: {what} rejected: {exc}") from exc
            except (ex.NoServerAvailableError, ex.ConnectionFailedError,
                    ex.InternalServerError, ex.Etcd3Exception) as exc:
                # Etcd3Exception here: WatchTimedOut, RevisionCompactedError … (transient).
                last = exc
                if _server_timed_out(exc):
                    timed_out = exc
                    self._timeout_at = time.monotonic()
                elif no_leader is None and _no_leader(exc):
                    no_leader = exc
                if not self._pause_before_retry(client, exc, deadline, pause):
                    break
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            except grpc.RpcError as exc:
                if _permanent(exc):
                    code = exc.code()
                    details = exc.details() if hasattr(exc, "details") else str(exc)
                    raise StoreError(f"etcd {self.describe()}: {what} rejected: "
                                     f"{code.name}: {details}") from exc
                last = exc
                if _server_timed_out(exc):
                    timed_out = exc
                    self._timeout_at = time.monotonic()
                if not self._pause_before_retry(client, exc, deadline, pause):
                    break
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            self._ok()
            return result
        assert last is not None
        # The most telling cause: a member answered too late, or answered it has no leader.
        if timed_out is not None:
            raise self._fail(what, timed_out) from last
        if no_leader is not None:
            raise self._fail(what, no_leader) from last
        raise self._fail(what, last) from last

    # ------------------------------------------------------------------ keys

    def _ek(self, key: str) -> bytes:
        validate_key(key)
        return (self.base + key).encode()

    def _epfx(self, prefix: str) -> bytes:
        prefix = validate_prefix(prefix)
        return (self.base + prefix + "/").encode() if prefix else self.base.encode()

    def _sk(self, ekey: bytes) -> str | None:
        try:
            s = ekey.decode()
        except UnicodeDecodeError:
            return None
        if not s.startswith(self.base):
            return None
        s = s[len(self.base):]
        try:
            return validate_key(s)
        except ValueError:
            return None

    @staticmethod
    def _check_value(key: str, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"store values are bytes, got {type(value).__name__} for {key!r}")
        value = bytes(value)
        if len(value) > MAX_VALUE_BYTES:
            raise StoreError(f"value for {key!r} is {len(value)} bytes; etcd values are limited "
                             f"to {MAX_VALUE_BYTES} (store large files by hash)")
        return value

    # ------------------------------------------------------------------ basic ops

    def get(self, key: str) -> bytes | None:
        """The value of ``key`` (a linearizable read) or None."""
        ek = self._ek(key)
        value, _meta = self._call(f"get {key!r}", lambda c: c.get(ek))
        return value

    def get_keys(self, keys: builtins.list[str]) -> dict[str, bytes | None]:
        """Several keys in one transaction: one round trip, the values of one revision."""
        eks = [self._ek(key) for key in keys]

        def run(c: Any) -> Any:
            return c.transaction(compare=[], success=[c.transactions.get(ek) for ek in eks],
                                 failure=[])

        _ok, responses = self._call(f"get of {len(keys)} keys", run)
        return {key: (kvs[0][0] if kvs else None)
                for key, kvs in zip(keys, responses, strict=True)}

    def put(self, key: str, value: bytes) -> None:
        """Write ``key`` (atomic; retried on another endpoint if one fails)."""
        ek = self._ek(key)
        value = self._check_value(key, value)
        self._call(f"put {key!r}", lambda c: c.put(ek, value))

    def put_many(self, items: builtins.list[tuple[str, bytes]]) -> None:
        """Write many keys in transactions of up to ``TXN_MAX_OPS`` puts."""
        batch: builtins.list[tuple[bytes, bytes]] = []
        size = 0
        for key, value in items:
            ek = self._ek(key)
            value = self._check_value(key, value)
            if batch and (len(batch) >= TXN_MAX_OPS or size + len(value) > TXN_MAX_BYTES):
                self._put_batch(batch)
                batch, size = [], 0
            batch.append((ek, value))
            size += len(value)
        if batch:
            self._put_batch(batch)

    def _put_batch(self, batch: builtins.list[tuple[bytes, bytes]]) -> None:
        def run(c: Any) -> Any:
            ops = [c.transactions.put(k, v) for k, v in batch]
            return c.transaction(compare=[], success=ops, failure=[])

        self._call(f"put of {len(batch)} keys", run)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        ek = self._ek(key)
        return bool(self._call(f"delete {key!r}", lambda c: c.delete(ek)))

    def delete_tree(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (one transaction); returns how many."""
        prefix = validate_prefix(prefix)
        if not prefix:
            raise ValueError("refusing to delete the whole store")
        ek = self._ek(prefix)
        ep = self._epfx(prefix)

        def run(c: Any) -> Any:
            return c.transaction(compare=[], success=[
                c.transactions.delete(ek),
                c.transactions.delete(ep, range_end=_prefix_end(ep)),
            ], failure=[])

        _ok, responses = self._call(f"delete_tree {prefix!r}", run)
        return sum(int(r.response_delete_range.deleted) for r in responses)

    def _range(self, what: str, start: bytes, end: bytes, keys_only: bool,
               revision: int | None = None) -> tuple[int, builtins.list[Any]]:
        """All kvs in [start, end) at one revision, paged; returns (revision, kvs)."""
        kvs: builtins.list[Any] = []
        rev = revision
        key = start
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE, "keys_only": keys_only}
            if rev:
                kwargs["revision"] = rev
            k = key
            resp = self._call(what, lambda c, k=k, kw=kwargs: c.get_range_response(
                k, end, sort_order="ascend", **kw))
            if not rev:
                rev = resp.header.revision
            kvs.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                break
            key = resp.kvs[-1].key + b"\0"
        return int(rev or 0), kvs

    def list(self, prefix: str) -> builtins.list[str]:
        """All keys under ``prefix`` (whole segments), sorted."""
        prefix = validate_prefix(prefix)
        out: builtins.list[str] = []
        if prefix:
            ek = self._ek(prefix)
            _v, meta = self._call(f"list {prefix!r}", lambda c: c.get(ek))
            if meta is not None:
                out.append(prefix)
        ep = self._epfx(prefix)
        _rev, kvs = self._range(f"list {prefix!r}", ep, _prefix_end(ep), keys_only=True)
        for kv in kvs:
            k = self._sk(kv.key)
            if k is not None:
                out.append(k)
        out.sort()
        return out

    def get_many(self, prefix: str) -> dict[str, bytes]:
        """Every key → value under ``prefix`` in paged range reads at one revision."""
        prefix = validate_prefix(prefix)
        ep = self._epfx(prefix)
        _rev, kvs = self._range(f"get_many {prefix!r}", ep, _prefix_end(ep), keys_only=False)
        out: dict[str, bytes] = {}
        for kv in kvs:
            k = self._sk(kv.key)
            if k is not None:
                out[k] = bytes(kv.value)
        return out

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes | None) -> bool:
        """One transaction: write ``value`` (None deletes) only if ``key`` holds ``expected``."""
        from pyetcd import exceptions as ex

        ek = self._ek(key)
        if value is not None:
            value = self._check_value(key, value)
        if expected is None and value is None:
            return self.get(key) is None

        def run(c: Any) -> Any:
            t = c.transactions
            if expected is None:
                compare = [t.version(ek) == 0]
            else:
                compare = [t.value(ek) == bytes(expected)]
            op = t.put(ek, value) if value is not None else t.delete(ek)
            succeeded, _ = c.transaction(compare=compare, success=[op], failure=[])
            return bool(succeeded)

        import grpc

        uncertain = False
        deadline = time.monotonic() + self.timeout
        pause = RETRY_PAUSE
        telling: BaseException | None = None   # a timeout or "no leader": the cause to report
        while True:
            client = self._client()
            try:
                ok = run(client)
            except (ex.NoServerAvailableError, ex.ConnectionFailedError) as exc:
                # "leader changed" is UNAVAILABLE too: the write may have been applied.
                uncertain = uncertain or isinstance(exc, ex.ConnectionFailedError)
                if telling is None and (_server_timed_out(exc) or _no_leader(exc)):
                    telling = exc
                if not self._pause_before_retry(client, exc, deadline, pause):
                    raise self._fail(self._cas_what(key, uncertain), telling or exc) from exc
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            except ex.ConnectionTimeoutError as exc:
                uncertain = True            # may have been applied; retry and check below
                telling = exc
                self._timeout_at = time.monotonic()
                if self._out_of_time(deadline):
                    raise self._fail(self._cas_what(key, uncertain), exc) from exc
                continue
            except grpc.RpcError as exc:
                if _permanent(exc):
                    return bool(self._call(f"compare_and_put {key!r}", run))  # its uniform error
                # e.g. UNKNOWN "context deadline exceeded": the member gave up on the proposal
                # (no quorum); the outcome is unknown.
                uncertain = True
                if _server_timed_out(exc):
                    telling = exc
                    self._timeout_at = time.monotonic()
                if not self._pause_before_retry(client, exc, deadline, pause):
                    raise self._fail(self._cas_what(key, uncertain), telling or exc) from exc
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            self._ok()
            if not ok and uncertain and value is not None and value != expected:
                return self.get(key) == value
            return ok

    @staticmethod
    def _cas_what(key: str, uncertain: bool) -> str:
        return f"compare_and_put {key!r}" + (" (outcome unknown)" if uncertain else "")

    # ------------------------------------------------------------------ membership

    def heartbeat(self, member_id: str, info: bytes, ttl: float) -> None:
        """Refresh ``member_id``'s lease (granted on first use) and put its record on it."""
        key = f"{MEMBERS_PREFIX}/{member_id}"
        ek = self._ek(key)
        info = self._check_value(key, info)
        ttl_s = max(1, math.ceil(float(ttl)))
        with self._lease_lock:
            lease = self._leases.get(member_id)
            lease_id = None
            if lease is not None and lease[1] == ttl_s:
                resp = self._call(f"lease keepalive for {member_id}",
                                  lambda c: builtins.list(c.refresh_lease(lease[0])))
                if resp and resp[0].TTL > 0:
                    lease_id = lease[0]
            if lease_id is None:
                granted = self._call(f"lease grant for {member_id}", lambda c: c.lease(ttl_s))
                lease_id = granted.id
                self._leases[member_id] = (lease_id, ttl_s)
            try:
                self._call(f"heartbeat {member_id}",
                           lambda c: c.put(ek, info, lease=lease_id))
            except StoreError:
                # The lease may have expired between keepalive and put: next call re-grants.
                self._leases.pop(member_id, None)
                raise

    def members(self) -> dict[str, bytes]:
        """Members whose lease is alive → their info."""
        ep = self._epfx(MEMBERS_PREFIX)
        _rev, kvs = self._range("members", ep, _prefix_end(ep), keys_only=False)
        out: dict[str, bytes] = {}
        for kv in kvs:
            k = self._sk(kv.key)
            if k is not None:
                out[k.rsplit("/", 1)[-1]] = bytes(kv.value)
        return out

    # ------------------------------------------------------------------ leader lease

    def lease_unsupported(self) -> str | None:
        """None: etcd leases and transactions give an honest leader lease."""
        return None

    def lease_acquire(self, name: str, member_id: str, ttl: float) -> Lease | None:
        """Keep our etcd lease alive, or take the holder key in one transaction if absent."""
        validate_lease_name(name)
        hk = self._ek(f"{LEASES_PREFIX}/{name}/holder")
        ck = self._ek(f"{LEASES_PREFIX}/{name}/epoch")
        ttl_s = max(1, math.ceil(float(ttl)))
        started = time.monotonic()
        with self._lease_lock:
            held = self._held.get((name, member_id))
            if held is not None:
                lease_id, epoch, rec = held
                resp = self._call(f"lease {name} keepalive",
                                  lambda c: builtins.list(c.refresh_lease(lease_id)))
                value, _meta = self._call(f"lease {name} read", lambda c: c.get(hk))
                if resp and resp[0].TTL > 0 and value == rec:
                    return Lease(name, member_id, epoch, started + ttl_s)
                log.warning("lease %s: epoch %d lost", name, epoch)
                del self._held[(name, member_id)]
            value, _meta = self._call(f"lease {name} read", lambda c: c.get(hk))
            if value is not None:
                return None
            counter, _meta = self._call(f"lease {name} epoch", lambda c: c.get(ck))
            try:
                epoch = int(counter or b"0") + 1
            except ValueError:
                epoch = 1
            granted = self._call(f"lease {name} grant", lambda c: c.lease(ttl_s))
            rec = json.dumps({"holder": member_id, "epoch": epoch}, sort_keys=True).encode()

            def take(c: Any) -> bool:
                t = c.transactions
                compare = [t.version(hk) == 0]
                compare.append(t.value(ck) == counter if counter is not None
                               else t.version(ck) == 0)
                ok, _ = c.transaction(compare=compare, success=[
                    t.put(hk, rec, lease=granted.id), t.put(ck, str(epoch).encode())],
                    failure=[])
                return bool(ok)

            if not self._call(f"lease {name} take", take):
                try:
                    self._call(f"lease {name} revoke", lambda c: c.revoke_lease(granted.id))
                except StoreError:
                    pass
                return None
            self._held[(name, member_id)] = (granted.id, epoch, rec)
            log.info("lease %s: %s took epoch %d", name, member_id, epoch)
            return Lease(name, member_id, epoch, started + ttl_s)

    def lease_info(self, name: str) -> LeaseInfo:
        """The holder key (None when absent) and the epoch counter."""
        validate_lease_name(name)
        hk = self._ek(f"{LEASES_PREFIX}/{name}/holder")
        ck = self._ek(f"{LEASES_PREFIX}/{name}/epoch")
        value, _m = self._call(f"lease {name} read", lambda c: c.get(hk))
        counter, _m = self._call(f"lease {name} epoch", lambda c: c.get(ck))
        try:
            epoch = int(counter or b"0")
        except ValueError:
            epoch = 0
        if value is None:
            return LeaseInfo(None, epoch)
        try:
            rec = json.loads(value)
            return LeaseInfo(str(rec["holder"]), int(rec["epoch"]))
        except (ValueError, KeyError, TypeError):
            return LeaseInfo(None, epoch)

    def lease_release(self, name: str, member_id: str, epoch: int) -> None:
        """Revoke our etcd lease: the holder key goes with it."""
        with self._lease_lock:
            held = self._held.pop((name, member_id), None)
        if held is None or held[1] != epoch:
            return
        self._call(f"lease {name} revoke", lambda c: c.revoke_lease(held[0]))

    def fenced_create(self, key: str, value: bytes, lease: Lease) -> bool:
        """One transaction: our holder record is current and ``key`` does not exist."""
        hk = self._ek(f"{LEASES_PREFIX}/{lease.name}/holder")
        ek = self._ek(key)
        value = self._check_value(key, value)
        rec = json.dumps({"holder": lease.holder, "epoch": lease.epoch}, sort_keys=True).encode()

        def run(c: Any) -> bool:
            t = c.transactions
            ok, _ = c.transaction(compare=[t.value(hk) == rec, t.version(ek) == 0],
                                  success=[t.put(ek, value)], failure=[])
            return bool(ok)

        if self._call(f"fenced create {key!r}", run):
            return True
        # A timed-out first attempt may have landed: our own value there counts as created.
        return False

    def healthy(self) -> bool:
        """True if the last operation (or watch stream) reached etcd."""
        return self._healthy

    # ------------------------------------------------------------------ watching

    def watch(self, prefix: str, callback: WatchCallback) -> None:
        """Call ``callback`` with batches of later changes under ``prefix``."""
        prefix = validate_prefix(prefix)
        with self._lock:
            w = self._watches.get(prefix)
            if w is None:
                w = _EWatch(prefix)
                self._watches[prefix] = w
                try:
                    self._resync(w, emit=False)
                    self._establish(w)
                except StoreError as exc:
                    log.warning("etcd watch on %r not established yet: %s", prefix, exc)
            w.callbacks.append(callback)

    def _resync(self, w: _EWatch, emit: bool = True) -> builtins.list[Change]:
        """Re-list ``w.prefix`` at one revision and diff against the snapshot (lock held)."""
        ep = self._epfx(w.prefix)
        rev, kvs = self._range(f"watch resync {w.prefix!r}", ep, _prefix_end(ep),
                               keys_only=False)
        if w.synced and rev < w.rev:
            return []
        seen: dict[str, int] = {}
        changes: builtins.list[Change] = []
        for kv in kvs:
            k = self._sk(kv.key)
            if k is None:
                continue
            seen[k] = kv.mod_revision
            if w.revs.get(k) != kv.mod_revision:
                changes.append(Change(k, bytes(kv.value)))
        for k in sorted(set(w.revs) - set(seen)):
            changes.append(Change(k, None))
        w.revs = seen
        w.rev = rev
        w.synced = True
        if emit and changes:
            self._dispatch(w, changes)
        return changes if emit else []

    def _establish(self, w: _EWatch) -> None:
        """Start a native prefix watch from ``w.rev + 1`` feeding the event queue."""
        w.gen += 1
        gen = w.gen
        ep = self._epfx(w.prefix)
        events = self._events

        def on_response(resp: Any, w: _EWatch = w, gen: int = gen) -> None:
            events.put((w, gen, resp))

        w.watch_id = self._call(
            f"watch {w.prefix!r}",
            lambda c: c.add_watch_callback(ep, on_response, range_end=_prefix_end(ep),
                                           start_revision=w.rev + 1))
        w.active = True

    def _apply(self, w: _EWatch, gen: int, resp: Any) -> builtins.list[Change]:
        """Apply one native watch response (lock held); returns the changes dispatched."""
        if gen != w.gen:
            return []
        if resp is None or isinstance(resp, BaseException):
            if w.active:
                w.active = False
                if resp is not None:
                    # The member serving the stream went away; that alone is not an outage.
                    # The repair (a resync through _call, with its retries) decides that.
                    log.info("etcd %s: watch on %r broke (%s); re-establishing",
                             self.describe(), w.prefix, type(resp).__name__)
            return []
        from pyetcd import events as ev

        changes: builtins.list[Change] = []
        for e in resp.events:
            mod = int(e.mod_revision)
            if mod <= w.rev:
                continue
            w.rev = mod
            k = self._sk(e.key)
            if k is None:
                continue
            if isinstance(e, ev.DeleteEvent):
                if w.revs.pop(k, None) is not None:
                    changes.append(Change(k, None))
            else:
                w.revs[k] = mod
                changes.append(Change(k, bytes(e.value)))
        if changes:
            self._ok()
            self._dispatch(w, changes)
        return changes

    def _dispatch(self, w: _EWatch, changes: builtins.list[Change]) -> None:
        for cb in builtins.list(w.callbacks):
            try:
                cb(changes)
            except Exception:
                log.exception("etcd store: watch callback for %r failed", w.prefix)

    def _drain(self) -> builtins.list[Change]:
        out: builtins.list[Change] = []
        while True:
            try:
                w, gen, resp = self._events.get_nowait()
            except queue.Empty:
                return out
            out.extend(self._apply(w, gen, resp))

    def _repair(self, force_resync: bool = False) -> builtins.list[Change]:
        """Resync + re-watch every broken watch (every watch when ``force_resync``)."""
        out: builtins.list[Change] = []
        for w in builtins.list(self._watches.values()):
            if w.active and not force_resync:
                continue
            try:
                out.extend(self._resync(w))
                if not w.active:
                    self._establish(w)
            except StoreError as exc:
                log.debug("etcd watch on %r still broken: %s", w.prefix, exc)
                break
        return out

    def poll_now(self) -> builtins.list[Change]:
        """Apply queued watch events, then resync every watch; return what was dispatched."""
        with self._lock:
            out = self._drain()
            out.extend(self._repair(force_resync=True))
            self._last_resync = time.monotonic()
            return out

    def start(self) -> None:
        """Start the thread that applies watch events and repairs broken watches."""
        self._client()
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="etcdstore-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        events = self._events
        while not self._stop.is_set():
            try:
                item = events.get(timeout=self.poll_interval)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                break
            try:
                with self._lock:
                    if item is not None:
                        self._apply(*item)
                    self._drain()
                    due = time.monotonic() - self._last_resync > self.resync_interval
                    if due:
                        self._last_resync = time.monotonic()
                    self._repair(force_resync=due)
            except Exception:  # never let the watcher die
                log.exception("etcd store: watch pass failed")
                self._stop.wait(self.poll_interval)

    def close(self) -> None:
        """Stop the thread, cancel watches and close the client (leases expire on their own)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, self.poll_interval * 4))
        self._thread = None
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
            same_process = self._client_pid == os.getpid()
        for w in self._watches.values():
            w.active = False
            w.gen += 1
        if client is not None and same_process:
            try:
                client.close()
            except Exception as exc:
                log.debug("etcd client close: %s", exc)
