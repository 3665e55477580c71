"""One minion's connection to one master: auth, request channel, publications, liveness.

A :class:`MasterConnection` authenticates (retrying while the key is pending), subscribes to
the master's publications, checks the master is alive with an application-level heartbeat
every ``master_heartbeat_interval`` seconds, and when the master is dead, frozen or partitioned
tears down and reconnects with capped backoff. The minion holds one of these per master.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, CrypticleError, SerialGuard
from hamaster.minion.serialmarks import SerialMarks

if TYPE_CHECKING:
    from hamaster.minion.identity import MinionIdentity

log = logging.getLogger(__name__)

# Retry pacing while a master is unreachable. The cap is short on purpose: a master that comes
# back must be in use again within seconds (the HA recovery target is 5 s), and a retry against a
# dead master costs one refused or unanswered TCP connect. Operators can raise it with
# ``master_retry_max``.
BACKOFF_MAX = 2.0
# A TCP connect that gets no answer (a blackholed or partitioned master) is abandoned and retried
# by ZeroMQ after this many milliseconds, instead of waiting on the kernel's SYN back-off (1, 3, 7 s …).
CONNECT_TIMEOUT_MS = 1000
# Longest wait between tries to a master whose answer this minion refuses (e.g. not the pinned key).
REFUSED_RETRY_MAX = 60.0
# A connection that held this long resets the reconnect back-off.
STABLE_CONNECTION_S = 30.0
# Requests in flight to one master at once (each on its own REQ socket).
MAX_PARALLEL_REQUESTS = 4
# While a reply is awaited, the socket's own readiness is re-checked this often. ZeroMQ wakes
# event loops through an edge-triggered descriptor, and a wake-up that is lost leaves a reply
# sitting unread until the request times out; the check reads it at once and logs that it did.
REPLY_RECHECK_S = 0.5

# Publications already verified and decrypted in this process: (frame digest, publish key,
# pinned master key) → load. Only ever filled after a successful signature check.
_OPENED: dict[tuple[bytes, str, str | None], dict] = {}


class RequestFailed(Exception):
    """A request to this master timed out or was refused."""


class MasterConnection:
    """Connection state machine for one (minion identity, master) pair."""

    def __init__(
        self,
        ident: MinionIdentity,
        ctx: zmq.asyncio.Context,
        host: str,
        port: int,
        on_publication: Callable[[MasterConnection, dict], None],
        on_connected: Callable[[MasterConnection], Any] | None = None,
    ) -> None:
        self.ident = ident
        self.opts = ident.opts
        self.ctx = ctx
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.on_publication = on_publication
        self.on_connected = on_connected
        self.state = "disconnected"  # disconnected | pending | rejected | connected
        self.aes: Crypticle | None = None
        self.session: Crypticle | None = None
        self.publish_port: int | None = None
        self.master_pub: Any = None
        self.is_hamaster = False
        self.master_id: str | None = None
        self.serials = SerialGuard()
        #: Set when the master gives no serial at auth (a stock salt-master): the serial mark
        #: is then saved in ``cachedir`` so that it survives a restart.
        self._saved_marks: SerialMarks | None = None
        self.last_ok = 0.0
        self.connected_event = asyncio.Event()
        # REQ sockets carry one request at a time: keep a few, so a slow request (a large file
        # chunk, a master waiting on its store) never holds up a job's return behind it.
        self._idle_reqs: list[zmq.asyncio.Socket] = []
        self._req_slots = asyncio.Semaphore(MAX_PARALLEL_REQUESTS)
        self._sub: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()
        self._reauth_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.hb_interval = float(self.opts.get("master_heartbeat_interval", 2.0))
        self.dead_after = float(self.opts.get("master_dead_after", 6.0))
        self.retry_max = float(self.opts.get("master_retry_max", BACKOFF_MAX))
        self.request_timeout = float(self.opts.get("auth_timeout", 5))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the connection's background task."""
        self._task = asyncio.create_task(self._run(), name=f"conn-{self.ident.minion_id}-{self.name}")

    async def stop(self) -> None:
        """Stop and close every socket."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_sockets()
        while self._idle_reqs:
            self._idle_reqs.pop().close(0)

    @property
    def alive(self) -> bool:
        """True while authenticated and the last heartbeat is recent."""
        return self.state == "connected" and time.monotonic() - self.last_ok < self.dead_after

    def _endpoint(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    def _set_connect_options(self, sock: zmq.asyncio.Socket) -> None:
        """Options every socket towards this master shares: fast reconnects, bounded connects."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)

    def _new_req(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.REQ)
        self._set_connect_options(sock)
        sock.connect(self._endpoint(self.port))
        return sock

    def _close_sockets(self) -> None:
        # The request socket is left to request(): closing it under an in-flight request
        # would cancel that request's future instead of failing it over to another master.
        for attr in ("_sub",):
            sock = getattr(self, attr)
            if sock is not None:
                sock.close(0)
                setattr(self, attr, None)

    # -- one request/reply --------------------------------------------------------------------------

    async def _roundtrip(self, frame: bytes, timeout: float, sock: zmq.asyncio.Socket | None = None) -> bytes:
        """Send one frame on a REQ socket and wait for the reply; a fresh socket if none given.

        ``timeout`` bounds the whole exchange (a REQ socket blocks on send while no peer is
        connected). Raises :class:`TimeoutError` when it runs out.
        """
        own = sock is None
        s = sock or self._new_req()
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(s.send(frame), timeout=timeout)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                try:
                    return await asyncio.wait_for(s.recv(), timeout=min(left, REPLY_RECHECK_S))
                except TimeoutError:
                    # zmq.asyncio's get(EVENTS) (not the getsockopt alias, which bypasses it)
                    # also re-arms pyzmq's wake-up for whatever is pending.
                    if s.get(zmq.EVENTS) & zmq.POLLIN:
                        log.warning("%s: a reply from %s was waiting unread (missed event-loop "
                                    "wake-up); reading it now", self.ident.minion_id, self.name)
                        return await asyncio.wait_for(s.recv(), timeout=max(left, 0.1))
        finally:
            if own:
                s.close(0)

    async def request(self, load: dict, timeout: float | None = None, retry_auth: bool = True) -> Any:
        """Send an aes request and return the decrypted reply; re-authenticates on ``bad load``."""
        for attempt in (0, 1):
            if self.session is None:
                raise RequestFailed(f"not authenticated with {self.name}")
            session = self.session
            nonce = messages.new_nonce()
            body = messages.stamp_load(dict(load), self.ident.minion_id, self.ident.tok, nonce)
            frame = messages.aes_request(self.ident.minion_id, session, body)
            async with self._req_slots:
                sock = self._idle_reqs.pop() if self._idle_reqs else self._new_req()
                try:
                    reply = await self._roundtrip(frame, timeout or self.request_timeout, sock)
                except BaseException as exc:
                    sock.close(0)  # a REQ socket that missed its reply cannot be reused
                    task = asyncio.current_task()
                    if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                        raise  # we are being cancelled, not the socket
                    if not isinstance(exc, TimeoutError | zmq.ZMQError | asyncio.CancelledError):
                        raise
                    raise RequestFailed(f"{load.get('cmd')} to {self.name} failed: {exc or 'timeout'}") from None
                if self._stop.is_set():
                    sock.close(0)
                else:
                    self._idle_reqs.append(sock)
            try:
                result = messages.parse_aes_reply(reply, session, nonce)
            except messages.BadLoadReply as exc:
                if attempt == 0 and retry_auth:
                    log.info("%s: master %s answered %s; re-authenticating", self.ident.minion_id, self.name, exc)
                    await self.reauthenticate()
                    continue
                raise RequestFailed(f"{load.get('cmd')} refused by {self.name}: {exc}") from None
            self.last_ok = time.monotonic()
            return result
        raise RequestFailed("unreachable")

    async def request_pillar(self, grains: dict) -> dict:
        """Send ``_pillar`` (carrying our grains, as Salt minions do) and open the private reply."""
        if self.session is None:
            raise RequestFailed("not authenticated")
        nonce = messages.new_nonce()
        load = {
            "id": self.ident.minion_id,
            "grains": grains,
            "saltenv": None,
            "pillarenv": None,
            "pillar_override": {},
            "extra_minion_data": {},
            "ver": "2",
            "cmd": "_pillar",
        }
        body = messages.stamp_load(load, self.ident.minion_id, self.ident.tok, nonce)
        reply = await self._roundtrip(messages.aes_request(self.ident.minion_id, self.session, body), self.request_timeout)
        return messages.parse_pillar_reply(
            reply, minion_priv=self.ident.priv, master_pub=self.master_pub, nonce=nonce
        )

    # -- auth ---------------------------------------------------------------------------------------

    async def _auth_once(self) -> messages.AuthResult:
        pinned = self.ident.pinned_master_pub()
        pinned_key = crypto.load_public_key(pinned) if pinned else None
        nonce = messages.new_nonce()
        frame, token = messages.auth_request(self.ident.minion_id, self.ident.pub_text, nonce, pinned_key)
        reply = await self._roundtrip(frame, float(self.opts.get("auth_timeout", 5)))
        result = messages.parse_auth_reply(
            reply,
            minion_priv=self.ident.priv,
            nonce=nonce,
            token_plain=token,
            pinned_master_pub=pinned,
            master_finger=str(self.opts.get("master_finger") or ""),
        )
        if result.status == "accepted":
            if not pinned and result.master_pub_text:
                # Trust on first use happens once per minion, not once per connection: another
                # master may have been pinned while this reply was on its way.
                trusted = self.ident.pin_master_pub(result.master_pub_text)
                if trusted != crypto.normalize_pem(result.master_pub_text):
                    raise messages.MasterKeyMismatch(
                        f"master presented key {crypto.pem_fingerprint(result.master_pub_text)}, "
                        "not the pinned master key "
                        f"({crypto.pem_fingerprint(trusted)}) another master presented first: "
                        "this master's key is not the one this minion trusts")
            try:
                inner = codec.loads(codec.to_bytes(codec.loads(reply)["load"]))
                self.is_hamaster = bool(inner.get("hamaster"))
            except Exception:
                self.is_hamaster = False
        return result

    async def reauthenticate(self) -> bool:
        """Authenticate again now (rotated publish key or lost session); True on success."""
        async with self._reauth_lock:
            try:
                result = await self._auth_once()
            except (TimeoutError, zmq.ZMQError, messages.AuthReplyError, crypto.CryptoError) as exc:
                log.warning("%s: re-authentication with %s failed: %s", self.ident.minion_id, self.name, exc)
                return False
            if result.status != "accepted":
                log.warning("%s: master %s now says our key is %s", self.ident.minion_id, self.name, result.status)
                self.state = result.status
                return False
            self._apply(result)
            return True

    def _apply(self, result: messages.AuthResult) -> None:
        assert result.aes_key and result.session_key
        first = self.aes is None
        self.aes = Crypticle(result.aes_key)
        if result.publish_serial is not None:
            self._saved_marks = None
            if first:
                # Only the first auth of this process needs it: later ones come while subscribed,
                # so every publication under a new key reaches us live, and a publication
                # still in flight when the auth reply was made must not be refused.
                self.serials.set_floor(result.aes_key, result.publish_serial)
        else:
            self._saved_marks = SerialMarks.for_dir(str(self.opts.get("cachedir") or "."))
            self.serials.set_floor(result.aes_key, self._saved_marks.get(result.aes_key))
        self.session = Crypticle(result.session_key)
        self.publish_port = result.publish_port or int(self.opts.get("publish_port", 4505))
        self.master_pub = crypto.load_public_key(result.master_pub_text or "")
        self.state = "connected"
        self.last_ok = time.monotonic()

    async def _authenticate(self) -> bool:
        """Authenticate, waiting ``acceptance_wait_time`` between tries while pending."""
        wait = float(self.opts.get("acceptance_wait_time", 10))
        wait_max = float(self.opts.get("acceptance_wait_time_max", 0) or 0)
        logged: str | None = None
        backoff = 0.5
        refused_wait = 0.0
        while not self._stop.is_set():
            try:
                result = await self._auth_once()
            except messages.AuthReplyError as exc:
                msg = f"refusing master {self.name}: {exc}"
                if isinstance(exc, messages.MasterKeyMismatch):
                    msg += (
                        f"; the trusted master key is pinned in {self.ident.pinned_path} (if the "
                        "master key was replaced on purpose, remove that file and restart the minion)"
                    )
                if logged != msg:
                    log.error("%s: %s", self.ident.minion_id, msg)
                    logged = msg
                # Nothing changes until an operator acts: retry ever more slowly (up to a
                # minute), so a fleet with a stale pinned key does not flood the master with
                # RSA work it can only refuse.
                refused_wait = min(max(refused_wait * 2, wait, 1.0), REFUSED_RETRY_MAX)
                await self._sleep(refused_wait * (0.5 + random.random() / 2))
                continue
            except (TimeoutError, zmq.ZMQError, crypto.CryptoError) as exc:
                if logged != "down":
                    log.warning("%s: master %s not answering auth (%s); retrying", self.ident.minion_id, self.name, exc or "timeout")
                    logged = "down"
                await self._sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.retry_max)
                continue
            if result.status == "accepted":
                self._apply(result)
                log.info("%s: authenticated with master %s", self.ident.minion_id, self.name)
                return True
            self.state = result.status
            if logged != result.status:
                if result.status == "pending":
                    log.warning(
                        "%s: key pending on master %s; accept it there with `hamaster-key -a %s`",
                        self.ident.minion_id, self.name, self.ident.minion_id,
                    )
                else:
                    log.error("%s: master %s rejected our key", self.ident.minion_id, self.name)
                logged = result.status
            await self._sleep(wait)
            if wait_max and wait < wait_max:
                wait = min(wait + float(self.opts.get("acceptance_wait_time", 10)), wait_max)
        return False

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # -- publications -------------------------------------------------------------------------------

    def _connect_sub(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 10000)
        self._set_connect_options(sub)
        if self.opts.get("zmq_filtering"):
            sub.setsockopt(zmq.SUBSCRIBE, b"broadcast")
            sub.setsockopt(zmq.SUBSCRIBE, hashlib.sha1(self.ident.minion_id.encode()).hexdigest().encode())
        else:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self._endpoint(self.publish_port or 4505))
        self._sub = sub

    async def _sub_loop(self) -> None:
        assert self._sub is not None
        sub = self._sub
        while not self._stop.is_set():
            frames = await sub.recv_multipart()
            await self._on_frame(frames[-1])

    def _open(self, frame: bytes) -> dict:
        """Verify and decrypt a publication, sharing the work between the identities of a swarm.

        Identities in one process that hold the same publish key and pinned master key receive the
        same bytes; the first one does the RSA verify and the decryption, the others reuse it.
        """
        assert self.aes is not None
        key = (hashlib.sha256(frame).digest(), self.aes.key_string, self.ident.pinned_master_pub())
        hit = _OPENED.get(key)
        if hit is not None:
            return dict(hit)
        load = messages.open_publication(frame, self.aes, self.master_pub)
        _OPENED[key] = load
        while len(_OPENED) > 64:
            _OPENED.pop(next(iter(_OPENED)))
        return dict(load)

    async def _on_frame(self, frame: bytes) -> None:
        if self.aes is None or self.master_pub is None:
            return
        after_reauth = False
        try:
            load = self._open(frame)
        except CrypticleError:
            after_reauth = True
            generation = self.aes
            async with self._reauth_lock:
                pass
            if self.aes is generation:
                log.info("%s: publication from %s does not decrypt; re-authenticating", self.ident.minion_id, self.name)
                if not await self.reauthenticate():
                    return
            try:
                load = self._open(frame)
            except (CrypticleError, messages.PublicationError) as exc:
                log.debug("%s: dropping publication from %s: %s", self.ident.minion_id, self.name, exc)
                return
        except messages.PublicationError as exc:
            log.warning("%s: dropping publication from %s: %s", self.ident.minion_id, self.name, exc)
            return
        if not self.serials.accept(self.aes.key_string, load.get("serial"), ignore_floor=after_reauth):
            log.warning("%s: dropping replayed publication (serial %r) from %s", self.ident.minion_id, load.get("serial"), self.name)
            return
        if self._saved_marks is not None:
            self._saved_marks.record(self.aes.key_string, load["serial"])
        self.last_ok = time.monotonic()
        self.on_publication(self, load)

    # -- heartbeat ----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Ping the master; return when it has not answered for ``master_dead_after`` seconds."""
        hb_sock: zmq.asyncio.Socket | None = None
        try:
            while not self._stop.is_set():
                await self._sleep(self.hb_interval)
                if self._stop.is_set():
                    return
                if self.is_hamaster:
                    load: dict = {"cmd": "_hamaster_ping", "id": self.ident.minion_id}
                else:
                    load = {"cmd": "_file_envs", "id": self.ident.minion_id}
                if self.session is None:
                    return
                nonce = messages.new_nonce()
                body = messages.stamp_load(load, self.ident.minion_id, self.ident.tok, nonce)
                frame = messages.aes_request(self.ident.minion_id, self.session, body)
                if hb_sock is None:
                    hb_sock = self._new_req()
                try:
                    reply = await self._roundtrip(frame, self.dead_after, hb_sock)
                except (TimeoutError, zmq.ZMQError):
                    hb_sock.close(0)
                    hb_sock = None
                    if time.monotonic() - self.last_ok >= self.dead_after:
                        return
                    continue
                try:
                    info = messages.parse_aes_reply(reply, self.session, nonce)
                except messages.BadLoadReply:
                    if not await self.reauthenticate():
                        return
                    continue
                self.last_ok = time.monotonic()
                if isinstance(info, dict) and "master_id" in info:
                    new_id = info["master_id"]
                    if self.master_id is not None and new_id != self.master_id:
                        log.info("%s: master at %s is now %s", self.ident.minion_id, self.name, new_id)
                    self.master_id = new_id
        finally:
            if hb_sock is not None:
                hb_sock.close(0)

    # -- main loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            ok = await self._authenticate()
            if not ok:
                return
            self._connect_sub()
            self.connected_event.set()
            if self.on_connected is not None:
                asyncio.create_task(self._safe_on_connected())
            connected_at = time.monotonic()
            sub_task = asyncio.create_task(self._sub_loop())
            hb_task = asyncio.create_task(self._heartbeat_loop())
            done, _ = await asyncio.wait({sub_task, hb_task}, return_when=asyncio.FIRST_COMPLETED)
            for t in (sub_task, hb_task):
                t.cancel()
            await asyncio.gather(sub_task, hb_task, return_exceptions=True)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error("%s: connection task for %s failed: %r", self.ident.minion_id, self.name, t.exception())
            self.connected_event.clear()
            self._close_sockets()
            if self._stop.is_set():
                return
            self.state = "disconnected"
            log.warning(
                "%s: master %s stopped answering (no reply for %.0f s); reconnecting",
                self.ident.minion_id, self.name, self.dead_after,
            )
            if time.monotonic() - connected_at > STABLE_CONNECTION_S:
                backoff = 0.5  # a connection that held for a while: not flapping, retry soon
            await self._sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.retry_max)

    async def _safe_on_connected(self) -> None:
        try:
            assert self.on_connected is not None
            res = self.on_connected(self)
            if asyncio.iscoroutine(res):
                await res
        except Exception as exc:
            log.warning("%s: start-up calls to %s failed: %s", self.ident.minion_id, self.name, exc)
