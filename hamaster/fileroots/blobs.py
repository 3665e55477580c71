"""Moving file_roots blobs between masters by sha256: a tiny TCP server, its client, the syncer.

Large files of the manifest (:mod:`hamaster.fileroots.manifest`) live only in the masters'
local caches; a master that lacks one fetches it from a peer master.

Protocol (one request per connection, plain TCP on ``file_blob_interface:file_blob_port``)::

    client → "GET <sha256> <ts> <base64 signature>\\n"
    server → "OK <size>\\n" + size bytes        or  "ERR <reason>\\n"

The signature is PKCS#1 v1.5 (SHA-224) by the cluster's shared master private key over
``"<sha256>|<ts>"``; the server checks it with the master public key and refuses a ``ts`` more
than :data:`AUTH_WINDOW` seconds from its clock. The client hashes what it receives and keeps
it only if it is exactly the requested sha256 (and size). Contents are *not* encrypted.

:class:`BlobService` is the master's part: it runs the server (when enabled), advertises
``host:port`` as ``blob_address`` in ``cluster/masters/<id>`` and, in a background task,
fetches every large blob the manifest names that the local cache lacks — on a manifest change
(store watch), on a cache miss reported by the file server, and every :data:`RESCAN` seconds.
The request handler never waits for a peer: until a blob is present the file is "missing"
(the minion tries its next master or retries later).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hamaster import crypto
from hamaster.fileroots.manifest import (
    CACHE_DIRNAME,
    MANIFEST_PREFIX,
    BlobCache,
    is_sha256,
    load_manifest,
)
from hamaster.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from hamaster.store.base import Store

log = logging.getLogger(__name__)

SIG_ALGO = "PKCS1v15-SHA224"
#: A request's ``ts`` must be within this many seconds of the server's clock.
AUTH_WINDOW = 60.0
MAX_LINE = 4096
IO_TIMEOUT = 30.0
#: Signed requests served at once (reading blocks from the cache and sending them).
MAX_CLIENTS = 32
#: Connections that have not sent a valid request line yet, at once (all peers together).
MAX_PENDING = 128
#: Connections at once from one peer address (a master fetches one blob at a time).
MAX_PER_PEER = 8
#: A connection must send its request line within this many seconds or is closed: idle
#: connections cannot hold the port for long.
REQUEST_TIMEOUT = 5.0
#: Refusals (bad signature, busy, over the per-peer limit) are logged at warning at most once
#: per this many seconds per reason; the rest at debug (counted in ``BlobServer.refused``).
REFUSAL_LOG_WINDOW = 60.0
RESCAN = 30.0
RETRY = 2.0
# Cached blobs no longer named by the manifest are deleted once they are this old (s), checked at
# most every PRUNE_EVERY s: a replaced file may still be read by a minion for a while.
PRUNE_AFTER = 3600.0
PRUNE_EVERY = 600.0
_BLOCK = 1 << 20


class BlobAuthError(Exception):
    """A blob request that is malformed, unsigned, forged or outside the time window."""


class BlobFetchError(Exception):
    """A blob could not be fetched from a peer (refused, missing, truncated, wrong content)."""


# --------------------------------------------------------------------------- requests


def _signed(sha: str, ts: str) -> bytes:
    return f"{sha}|{ts}".encode()


def make_request(priv: rsa.RSAPrivateKey, sha: str, ts: float | None = None) -> bytes:
    """The request line for blob ``sha``, signed now (or at ``ts``)."""
    if not is_sha256(sha):
        raise ValueError(f"not a sha256: {sha!r}")
    stamp = f"{time.time() if ts is None else ts:.3f}"
    sig = base64.b64encode(crypto.sign(priv, _signed(sha, stamp), SIG_ALGO)).decode()
    return f"GET {sha} {stamp} {sig}\n".encode()


def check_request(line: bytes, pub: rsa.RSAPublicKey, now: float | None = None,
                  window: float = AUTH_WINDOW) -> str:
    """The sha256 a request line asks for; :class:`BlobAuthError` unless it is well signed."""
    try:
        verb, sha, stamp, sig_b64 = line.decode("ascii").strip().split(" ")
        ts = float(stamp)
        sig = base64.b64decode(sig_b64, validate=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BlobAuthError("malformed request") from exc
    if verb != "GET" or not is_sha256(sha) or ts != ts:  # ts != ts: NaN
        raise BlobAuthError("malformed request")
    now = time.time() if now is None else now
    if abs(now - ts) > window:
        raise BlobAuthError(f"request time {ts:.0f} is more than {window:.0f}s from ours")
    if not crypto.verify(pub, _signed(sha, stamp), sig, SIG_ALGO):
        raise BlobAuthError("bad signature (not signed by the cluster's master key)")
    return sha


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → ``(host, port)``; ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- server


class BlobServer:
    """Serves ``GET <sha256>`` from a :class:`BlobCache` to requests signed by the master key.

    Admission, before anything is read: at most ``max_per_peer`` connections per peer address
    and ``max_pending`` connections still waiting for their request line (all peers); a
    connection over either limit gets ``ERR busy`` and is closed at once. The request line must
    arrive within ``request_timeout`` seconds. Only a well-signed request takes one of the
    :data:`MAX_CLIENTS` transfer slots, so idle or unsigned connections never hold those.
    """

    def __init__(self, cache: BlobCache, pub: rsa.RSAPublicKey, host: str, port: int = 0,
                 window: float = AUTH_WINDOW, *, max_per_peer: int = MAX_PER_PEER,
                 max_pending: int = MAX_PENDING, request_timeout: float = REQUEST_TIMEOUT):
        self.cache = cache
        self.pub = pub
        self.host = host
        self.port = port
        self.window = window
        self.max_per_peer = max_per_peer
        self.max_pending = max_pending
        self.request_timeout = request_timeout
        self.served = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CLIENTS)
        self._per_peer: dict[str, int] = {}
        self._pending = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._ratelog = RateLimitedLog(log, window=REFUSAL_LOG_WINDOW)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("file blob server on %s:%s", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and end every connection still open (idle ones included)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # their handlers end on the closed connection
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def _refuse(self, reason: str, peer: Any, detail: str) -> None:
        """Count a refusal; log it at warning once per window per reason, else at debug."""
        self.refused += 1
        msg = "refused a file blob request from %s: %s"
        if not self._ratelog.warn(reason, "", msg + " (more such refusals within %ds at debug)",
                                  peer, detail, int(REFUSAL_LOG_WINDOW)):
            log.debug(msg, peer, detail)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._writers.add(writer)
        try:
            try:
                await self._admit_and_serve(reader, writer, peer)
            except (ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError) as exc:
                log.debug("blob request from %s: %r", peer, exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        except asyncio.CancelledError:
            # The loop is shutting down. A connection handler is a top-level task: end it
            # quietly (Python 3.11's stream callback logs a traceback for a cancelled one).
            writer.transport.abort()
        finally:
            self._writers.discard(writer)

    async def _admit_and_serve(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, peer: Any) -> None:
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        if self._per_peer.get(ip, 0) >= self.max_per_peer:
            self._refuse("per-peer", peer, f"over {self.max_per_peer} connections from {ip}")
            writer.write(b"ERR busy\n")
            return
        if self._pending >= self.max_pending:
            self._refuse("pending", peer, f"over {self.max_pending} connections waiting")
            writer.write(b"ERR busy\n")
            return
        self._per_peer[ip] = self._per_peer.get(ip, 0) + 1
        pending = True
        self._pending += 1
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self.request_timeout)
            self._pending -= 1
            pending = False
            try:
                sha = check_request(line, self.pub, window=self.window)
            except BlobAuthError as exc:
                self._refuse("auth", peer, str(exc))
                writer.write(f"ERR {exc}\n".encode())
                return
            if self._slots.locked():
                self._refuse("busy", peer, f"all {MAX_CLIENTS} transfer slots in use")
                writer.write(b"ERR busy\n")
                return
            async with self._slots:
                await self._send(writer, sha, peer)
        finally:
            if pending:
                self._pending -= 1
            left = self._per_peer.get(ip, 1) - 1
            if left > 0:
                self._per_peer[ip] = left
            else:
                self._per_peer.pop(ip, None)

    async def _send(self, writer: asyncio.StreamWriter, sha: str, peer: Any) -> None:
        size = self.cache.size(sha)
        if size is None:
            writer.write(b"ERR missing\n")
            return
        writer.write(f"OK {size}\n".encode())
        offset = 0
        while offset < size:
            block = await asyncio.to_thread(self.cache.read, sha, offset,
                                            min(_BLOCK, size - offset))
            if not block:
                raise ConnectionError(f"blob {sha} shrank while being sent")
            writer.write(block)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            offset += len(block)
        self.served += 1
        log.debug("sent blob %s (%d bytes) to %s", sha, size, peer)


# --------------------------------------------------------------------------- client


async def fetch(address: str, sha: str, priv: rsa.RSAPrivateKey, cache: BlobCache,
                expected_size: int | None = None, timeout: float = IO_TIMEOUT) -> int:
    """Fetch blob ``sha`` from the peer at ``address`` into ``cache``; returns its size.

    Raises :class:`BlobFetchError` when the peer refuses or lacks it, the connection breaks, or
    the content is not exactly ``sha`` (nothing is then left in the cache).
    """
    host, port = split_address(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE),
                                                timeout)
    except (OSError, TimeoutError) as exc:
        raise BlobFetchError(f"cannot connect to {address}: {exc}") from exc
    try:
        writer.write(make_request(priv, sha))
        await asyncio.wait_for(writer.drain(), timeout)
        head = (await asyncio.wait_for(reader.readuntil(b"\n"), timeout)).decode(
            "ascii", "replace").strip()
        verb, _, rest = head.partition(" ")
        if verb != "OK":
            raise BlobFetchError(f"{address} refused blob {sha}: {rest or head}")
        if not rest.isdigit():
            raise BlobFetchError(f"{address} sent a malformed header {head!r}")
        size = int(rest)
        if expected_size is not None and size != expected_size:
            raise BlobFetchError(f"{address} offers {size} bytes for {sha}, "
                                 f"manifest says {expected_size}")
        with cache.writer() as w:
            while w.size < size:
                block = await asyncio.wait_for(reader.read(min(_BLOCK, size - w.size)), timeout)
                if not block:
                    raise BlobFetchError(
                        f"{address} closed after {w.size} of {size} bytes of {sha}")
                w.write(block)
            try:
                w.commit(sha)
            except ValueError as exc:
                raise BlobFetchError(f"{address}: {exc}") from exc
        return size
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise BlobFetchError(f"fetching {sha} from {address}: {exc!r}") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --------------------------------------------------------------------------- master service


def _advertised_host(interface: str) -> str:
    if interface in ("", "0.0.0.0", "::", "*"):
        return socket.gethostname()
    return f"[{interface}]" if ":" in interface else interface


def peer_addresses(records: Mapping[str, Mapping[str, Any]], own_id: str) -> list[str]:
    """``blob_address`` of every live master in ``records`` (``cluster/masters/<id>`` records
    with ``alive``) other than ``own_id``, sorted by master id."""
    out = []
    for mid, rec in sorted(records.items()):
        addr = rec.get("blob_address")
        if mid != own_id and rec.get("alive") and isinstance(addr, str) and addr:
            out.append(addr)
    return out


class BlobService:
    """A master's blob server plus the background fetcher of missing blobs.

    Its dependencies are explicit: the shared ``store`` (the manifest is read and watched
    there), the local blob ``cache``, the cluster master key ``key`` (signs fetches; its public
    half checks requests; :meth:`rekey` swaps it), ``peers()`` (blocking: the ``host:port``
    addresses of the other live masters' blob servers), and the ``port`` (None: fetch only)
    and ``interface`` to serve on. The file server reports cache misses to
    :meth:`request_sync` (the master registers it with ``FileServer.set_blob_missing``).
    """

    def __init__(self, store: Store, cache: BlobCache, key: rsa.RSAPrivateKey,
                 peers: Callable[[], list[str]], port: int | None = None,
                 interface: str = "127.0.0.1") -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.peers = peers
        self.port = port  # None: no server (fetch only)
        self.interface = interface
        self.server: BlobServer | None = None
        self.address = ""
        self.missing: set[str] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pruned_at = 0.0

    @classmethod
    def from_opts(cls, opts: dict, store: Store | None, cache: BlobCache | None,
                  key: rsa.RSAPrivateKey, peers: Callable[[], list[str]]) -> BlobService | None:
        """The service for a clustered master (``store`` is its shared store), None for a
        lone master (no store). ``cache`` defaults to ``<cachedir>/file_blobs``.

        ``file_blob_port``: > 0 serves on that port; 0 (default) serves on a port the OS picks
        when the backend cannot hold large blobs (its class's ``PEER_BLOBS``: etcd) and not at
        all otherwise; < 0 never serves. The server binds
        on ``file_blob_interface`` (default: ``interface``).
        """
        if store is None:
            return None
        raw = opts.get("file_blob_port", 0) or 0
        try:
            port: int | None = int(raw)
        except (TypeError, ValueError):
            log.warning("file_blob_port must be an integer, got %r; not serving blobs", raw)
            port = -1
        if port == 0 and not store.PEER_BLOBS:
            port = None
        elif port is not None and port < 0:
            port = None
        cache = cache or BlobCache(f"{opts['cachedir']}/{CACHE_DIRNAME}")
        interface = opts.get("file_blob_interface") or opts.get("interface", "127.0.0.1")
        return cls(store, cache, key, peers, port, interface)

    def rekey(self, key: rsa.RSAPrivateKey) -> None:
        """Sign fetches with ``key`` and accept only requests signed by it from now on (the
        cluster master key changed)."""
        self.key = key
        if self.server is not None:
            self.server.pub = key.public_key()

    async def start(self) -> None:
        """Serve (when a port is set) and watch the manifest for blobs to fetch."""
        self._loop = asyncio.get_running_loop()
        if self.port is not None:
            iface = self.interface
            server = BlobServer(self.cache, self.key.public_key(), iface, self.port)
            try:
                await server.start()
            except OSError as exc:  # the master still serves; peers cannot fetch from it
                log.error("cannot serve file blobs on %s:%s: %s", iface, self.port, exc)
            else:
                self.server = server
                self.address = f"{_advertised_host(iface)}:{server.port}"
        try:
            await asyncio.to_thread(self.store.watch, MANIFEST_PREFIX.rstrip("/"),
                                    lambda changes: self.request_sync())
        except Exception as exc:  # the periodic rescan still catches up
            log.warning("cannot watch the file manifest: %s", exc)

    def request_sync(self, sha: str | None = None) -> None:
        """Wake the fetcher (thread-safe; called by the store watch and on cache misses)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def sync_once(self) -> dict:
        """Fetch every large blob the manifest names that the cache lacks:
        ``{fetched, missing}``."""
        entries = await asyncio.to_thread(load_manifest, self.store)
        if time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            named = {e.sha256 for e in entries.values() if not e.inline}
            removed = await asyncio.to_thread(self.cache.prune, named, PRUNE_AFTER)
            if removed:
                log.info("pruned %d file blob(s) no longer in the manifest", len(removed))
        want = {e.sha256: e.size for e in entries.values()
                if not e.inline and not self.cache.has(e.sha256)}
        fetched: list[str] = []
        if want:
            peers = await asyncio.to_thread(self.peers)
            for sha, size in sorted(want.items()):
                for addr in peers:
                    try:
                        await fetch(addr, sha, self.key, self.cache, size)
                    except BlobFetchError as exc:
                        log.debug("blob %s not fetched from %s: %s", sha, addr, exc)
                        continue
                    log.info("fetched file blob %s (%d bytes) from %s", sha, size, addr)
                    fetched.append(sha)
                    break
        missing = set(want) - set(fetched)
        if missing and missing != self.missing:
            log.warning("%d file blob(s) not available from any peer yet: %s",
                        len(missing), ", ".join(sorted(missing)[:5]))
        self.missing = missing
        return {"fetched": sorted(fetched), "missing": sorted(self.missing)}

    async def sync_forever(self, stop: asyncio.Event) -> None:
        """Run :meth:`sync_once` on every wake-up, every :data:`RESCAN` s, sooner while missing."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                return
            except Exception as exc:
                log.warning("file blob sync failed: %s", exc)
                self.missing.add("?")
            wait = RETRY if self.missing else RESCAN
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            # let a burst of watch events / misses coalesce; never spin on repeated misses
            await asyncio.sleep(0.5 if self.missing else 0.05)

    async def close(self) -> None:
        """Stop serving (the fetcher stops with the ``stop`` event given to sync_forever)."""
        if self.server is not None:
            await self.server.close()
