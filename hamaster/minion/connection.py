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
from hamaster.keepalive import apply_tcp_keepalive
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
# by ZeroMQ after this many milliseconds, instead of waiting on the kernel's SYN
# back-off (1, 3, 7 s …).
CONNECT_TIMEOUT_MS = 1000
# Longest wait between tries to a master whose answer this minion refuses (e.g. not the pinned key).
REFUSED_RETRY_MAX = 60.0
# A connection that held this long resets the reconnect back-off.
STABLE_CONNECTION_S = 30.0
# Requests in flight to one master at once, each on its own REQ socket.
MAX_PARALLEL_REQUESTS = 4
# REQ sockets done with their exchange are kept for the next request, the most recently used
# first. Beyond the first, one left unused this long is closed: every connection kept costs the
# master ZeroMQ heartbeats (more than linearly, see docs/scaling.md), and a minion's start-up
# requests, which run in parallel, used to leave it with up to four connections to each master
# for good. Closing them at once instead would trade that for connection churn whenever a
# return overlaps a heartbeat (a new TCP connection and handshake each time).
IDLE_REQ_TTL = 30.0
# A request that finds every kept REQ socket busy waits this long for one to come back before it
# opens a new one. The exchange in flight is most often a heartbeat, answered within
# milliseconds; without the wait, every return that overlapped a heartbeat cost the master a new
# TCP connection and ZMTP handshake, at the moment a fleet-wide job made it busiest (the 5,000
# storm of docs/scaling.md: hundreds of returns per job failed to connect within their 1 s).
REQ_REUSE_WAIT = 0.5
# Longest heartbeat interval a master may ask for (its ``heartbeat_interval`` hint, sent when
# it has more connected minions than ``max_heartbeats_per_second`` allows at our own interval).
HEARTBEAT_HINT_MAX = 120.0
# Defaults of Salt's ``recon_default`` / ``recon_max`` (milliseconds) when the config has none:
# shorter than Salt's 1000 / 10000 so that a master that comes back is used again within seconds.
RECON_DEFAULT_MS = 200
RECON_MAX_MS = 1000


class Unreachable(TimeoutError):
    """The request could not even be handed to the master: no connection to it."""

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
        #: (socket, idle since): the most recently used last
        self._idle_reqs: list[tuple[zmq.asyncio.Socket, float]] = []
        self._req_slots = asyncio.Semaphore(MAX_PARALLEL_REQUESTS)
        self._reqs_busy = 0                 # kept-or-new REQ sockets inside an exchange
        self._req_back = asyncio.Event()    # set when an exchange gives its socket back
        self._sub: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()
        # Held for every _auth this connection sends: never more than one in flight per master.
        self._reauth_lock = asyncio.Lock()
        #: Incremented by every successful auth: a caller that saw generation g and finds a
        #: larger one after taking the lock knows the re-auth it wanted has already happened.
        self.auth_generation = 0
        #: Set while the master is known dead (heartbeat gave up), cleared when connected again.
        self.dead = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.hb_interval = float(self.opts.get("master_heartbeat_interval", 2.0))
        self.dead_after = float(self.opts.get("master_dead_after", 6.0))
        #: The master's ``heartbeat_interval`` hint (0: none); see :attr:`heartbeat_every`.
        self.hb_hint = 0.0
        self.retry_max = float(self.opts.get("master_retry_max", BACKOFF_MAX))
        self.request_timeout = float(self.opts.get("auth_timeout", 5))
        recon = int(self.opts.get("recon_default") or RECON_DEFAULT_MS)
        self.recon_max = max(int(self.opts.get("recon_max") or RECON_MAX_MS), recon)
        if self.opts.get("recon_randomize", True):
            # Salt's meaning: a wait drawn once, between recon_default and recon_default +
            # recon_max, so that a fleet does not reconnect in step.
            recon = random.randint(recon, recon + self.recon_max)
        self.recon_ivl = recon

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the connection's background task."""
        self._task = asyncio.create_task(self._run(),
                                         name=f"conn-{self.ident.minion_id}-{self.name}")

    async def stop(self) -> None:
        """Stop and close every socket."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_sockets()
        while self._idle_reqs:
            self._idle_reqs.pop()[0].close(0)

    @property
    def alive(self) -> bool:
        """True while authenticated and the last heartbeat is recent."""
        return self.state == "connected" and time.monotonic() - self.last_ok < self.dead_window

    @property
    def heartbeat_every(self) -> float:
        """Seconds between heartbeats: ``master_heartbeat_interval``, or longer when the master
        asks for it (a master with many minions spaces their heartbeats so that they stay under
        its ``max_heartbeats_per_second``, as Nomad servers do with their clients)."""
        return max(self.hb_interval, self.hb_hint)

    @property
    def dead_window(self) -> float:
        """Seconds of silence after which the master is dead: ``master_dead_after``, stretched
        in proportion when the heartbeat interval is (the same number of missed heartbeats)."""
        if self.hb_hint <= self.hb_interval or self.hb_interval <= 0:
            return self.dead_after
        return self.dead_after * self.hb_hint / self.hb_interval

    def _endpoint(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    def _set_connect_options(self, sock: zmq.asyncio.Socket) -> None:
        """Options every socket towards this master shares: fast reconnects, bounded connects."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, self.recon_ivl)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(self.recon_max, self.recon_ivl))
        sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        apply_tcp_keepalive(sock, self.opts)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)

    def _new_req(self) -> zmq.asyncio.Socket:
        """A REQ socket to this master. ``IMMEDIATE``: a request is only queued on a live
        connection, so a send that does not complete means "not connected" (:class:`Unreachable`),
        told apart from a connected master that does not answer in time (busy)."""
        sock = self.ctx.socket(zmq.REQ)
        try:
            self._set_connect_options(sock)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(self._endpoint(self.port))
        except BaseException:
            sock.close(0)
            raise
        return sock

    def _keep_or_close(self, sock: zmq.asyncio.Socket) -> None:
        """Keep ``sock`` (done with its exchange) for the next request, and close the kept
        sockets that have been unused for :data:`IDLE_REQ_TTL` (``sock`` stays: one is always
        kept while the connection runs)."""
        if self._stop.is_set():
            sock.close(0)
            return
        now = time.monotonic()
        while self._idle_reqs and now - self._idle_reqs[0][1] > IDLE_REQ_TTL:
            self._idle_reqs.pop(0)[0].close(0)
        if len(self._idle_reqs) >= MAX_PARALLEL_REQUESTS:
            sock.close(0)
        else:
            self._idle_reqs.append((sock, now))
            self._req_back.set()

    async def _take_req(self, wait: float) -> zmq.asyncio.Socket:
        """A kept REQ socket, else (after waiting up to ``wait`` seconds for a busy one to come
        back, see :data:`REQ_REUSE_WAIT`) a new one."""
        if not self._idle_reqs and self._reqs_busy and wait > 0:
            self._req_back.clear()
            try:
                await asyncio.wait_for(self._req_back.wait(), wait)
            except TimeoutError:
                pass
        return self._idle_reqs.pop()[0] if self._idle_reqs else self._new_req()

    def _close_sockets(self) -> None:
        # The request socket is left to request(): closing it under an in-flight request
        # would cancel that request's future instead of failing it over to another master.
        for attr in ("_sub",):
            sock = getattr(self, attr)
            if sock is not None:
                sock.close(0)
                setattr(self, attr, None)

    # -- one request/reply -------------------------------------------------------------------------

    async def _roundtrip(self, frame: bytes, timeout: float, sock: zmq.asyncio.Socket | None = None,
                         connect_wait: float | None = None) -> bytes:
        """Send one frame on a REQ socket and wait for the reply; a fresh socket if none given.

        ``timeout`` bounds the whole exchange, ``connect_wait`` (if shorter) the send. Raises
        :class:`Unreachable` when the frame could not be sent (no connection: REQ sockets here
        are ``IMMEDIATE``), :class:`TimeoutError` when the reply did not come in time.

        The reply is awaited in one piece: slicing the wait (the old 0.5 s re-check) made the
        slice's timer race pyzmq's reader callback whenever the event loop ran late (a swarm
        doing RSA work, a loaded machine): both became due in the same loop iteration, the timer
        ran first, and a reply that had just arrived was reported "waiting unread (missed
        event-loop wake-up)" although no wake-up was missed. At the deadline the socket is still
        read once without waiting, so a reply that arrived during a late iteration is not lost.
        """
        own = sock is None
        s = sock or self._new_req()
        deadline = time.monotonic() + timeout
        try:
            try:
                await asyncio.wait_for(s.send(frame), timeout=min(timeout, connect_wait or timeout))
            except TimeoutError:
                raise Unreachable(f"no connection to {self.name}") from None
            try:
                return await asyncio.wait_for(s.recv(),
                                              timeout=max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                if s.get(zmq.EVENTS) & zmq.POLLIN:
                    log.debug("%s: reply from %s read at its deadline (event loop running late)",
                              self.ident.minion_id, self.name)
                    return s.recv(zmq.NOBLOCK).result()
                raise
        finally:
            if own:
                s.close(0)

    async def _pooled_roundtrip(self, frame: bytes, what: str, timeout: float | None = None,
                                connect_wait: float | None = None) -> bytes:
        """One exchange on a pooled REQ socket (kept for the next request when it got its reply).

        Raises :class:`RequestFailed` for timeouts and socket errors (EMFILE included)."""
        async with self._req_slots:
            # The reuse wait is part of the connect wait of a caller that must fail fast.
            start = time.monotonic()
            reuse_wait = REQ_REUSE_WAIT if connect_wait is None else min(REQ_REUSE_WAIT,
                                                                         connect_wait / 2)
            try:
                sock = await self._take_req(reuse_wait)
            except zmq.ZMQError as exc:  # e.g. EMFILE: fail over like any other failure
                raise RequestFailed(f"{what} to {self.name}: {exc}") from None
            if connect_wait is not None:
                connect_wait = max(connect_wait - (time.monotonic() - start), 0.05)
            self._reqs_busy += 1
            try:
                reply = await self._roundtrip(frame,
                                              timeout or self.request_timeout, sock, connect_wait)
            except BaseException as exc:
                self._reqs_busy -= 1
                sock.close(0)  # a REQ socket that missed its reply cannot be reused
                task = asyncio.current_task()
                if (isinstance(exc, asyncio.CancelledError) and task is not None
                        and task.cancelling()):
                    raise  # we are being cancelled, not the socket
                if not isinstance(exc, TimeoutError | zmq.ZMQError | asyncio.CancelledError):
                    raise
                raise RequestFailed(f"{what} to {self.name} failed: {exc or 'timeout'}") from None
            self._reqs_busy -= 1
            self._keep_or_close(sock)
            return reply

    async def request(self, load: dict, timeout: float | None = None, retry_auth: bool = True,
                      connect_wait: float | None = None) -> Any:
        """Send an aes request and return the decrypted reply; re-authenticates on ``bad load``.

        ``connect_wait``: fail at once when the frame cannot be sent within that many seconds
        (no connection to this master), rather than after the whole timeout."""
        for attempt in (0, 1):
            if self.session is None:
                raise RequestFailed(f"not authenticated with {self.name}")
            session = self.session
            generation = self.auth_generation
            nonce = messages.new_nonce()
            body = messages.stamp_load(dict(load), self.ident.minion_id, self.ident.tok, nonce)
            frame = messages.aes_request(self.ident.minion_id, session, body)
            reply = await self._pooled_roundtrip(frame, str(load.get("cmd")), timeout, connect_wait)
            try:
                result = messages.parse_aes_reply(reply, session, nonce)
            except messages.BadLoadReply as exc:
                if attempt == 0 and retry_auth:
                    log.info("%s: master %s answered %s; re-authenticating",
                             self.ident.minion_id, self.name, exc)
                    await self.reauthenticate(generation)
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
        frame = messages.aes_request(self.ident.minion_id, self.session, body)
        reply = await self._pooled_roundtrip(frame, "_pillar")
        return messages.parse_pillar_reply(
            reply, minion_priv=self.ident.priv, master_pub=self.master_pub, nonce=nonce
        )

    # -- auth --------------------------------------------------------------------------------------

    async def _auth_once(self) -> messages.AuthResult:
        pinned = self.ident.pinned_master_pub()
        pinned_key = crypto.load_public_key(pinned) if pinned else None
        nonce = messages.new_nonce()
        frame, token = messages.auth_request(self.ident.minion_id,
                                             self.ident.pub_text, nonce, pinned_key)
        assert self._reauth_lock.locked(), "an _auth is only sent holding the auth lock"
        sock = self._new_req()
        try:
            reply = await self._roundtrip(frame, float(self.opts.get("auth_timeout", 5)), sock)
        except BaseException:
            sock.close(0)
            raise
        self._keep_or_close(sock)  # a REQ socket that got its reply: reused for requests
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

    async def reauthenticate(self, seen_generation: int | None = None) -> bool:
        """Authenticate again now (rotated publish key or lost session); True on success.

        Callers pass the :attr:`auth_generation` their failed request was made under: when an
        auth has succeeded since (another request, the heartbeat or a publication asked first),
        nothing is sent. So N requests that all find the session gone cost one ``_auth``.
        """
        async with self._reauth_lock:
            if seen_generation is not None and self.auth_generation != seen_generation:
                return self.state == "connected"
            try:
                result = await self._auth_once()
            except (TimeoutError, zmq.ZMQError, messages.AuthReplyError, crypto.CryptoError) as exc:
                log.warning("%s: re-authentication with %s failed: %s",
                            self.ident.minion_id, self.name, exc)
                return False
            if result.status != "accepted":
                log.warning("%s: master %s now says our key is %s", self.ident.minion_id,
                            self.name, result.status)
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
        self.auth_generation += 1

    def _acceptance_waits(self) -> Any:
        """Salt's ``acceptance_wait_time`` schedule: the wait between auth tries, growing by
        ``acceptance_wait_time`` per try up to ``acceptance_wait_time_max`` when that is set."""
        step = float(self.opts.get("acceptance_wait_time", 10))
        cap = float(self.opts.get("acceptance_wait_time_max", 0) or 0)
        wait = step
        while True:
            yield wait
            if cap and wait < cap:
                wait = min(wait + step, cap)

    async def _authenticate(self) -> bool:
        """Authenticate; between tries wait as Salt's minion does, with jitter.

        - key pending, or the master is connected but does not answer in ``auth_timeout`` (it is
          busy: shedding auths in a storm): ``acceptance_wait_time`` (growing up to
          ``acceptance_wait_time_max``), drawn between half and all of it so a fleet spreads out;
        - no connection at all (master down): a short jittered back-off capped at
          ``master_retry_max``, since a down master costs nothing to retry and must be used again
          within seconds of coming back;
        - refused answer (not the pinned key…): doubling up to a minute.
        """
        waits = self._acceptance_waits()
        logged: str | None = None
        backoff = 0.5
        refused_wait = 0.0
        while not self._stop.is_set():
            try:
                async with self._reauth_lock:
                    result = await self._auth_once()
            except messages.AuthReplyError as exc:
                msg = f"refusing master {self.name}: {exc}"
                if isinstance(exc, messages.MasterKeyMismatch):
                    msg += (
                        f"; the trusted master key is pinned in {self.ident.pinned_path} (if the "
                        "master key was replaced on purpose, remove that file and "
                        "restart the minion)"
                    )
                if logged != msg:
                    log.error("%s: %s", self.ident.minion_id, msg)
                    logged = msg
                # Nothing changes until an operator acts: retry ever more slowly (up to a
                # minute), so a fleet with a stale pinned key does not flood the master with
                # RSA work it can only refuse.
                wait = float(self.opts.get("acceptance_wait_time", 10))
                refused_wait = min(max(refused_wait * 2, wait, 1.0), REFUSED_RETRY_MAX)
                await self._sleep(refused_wait * (0.5 + random.random() / 2))
                continue
            except Unreachable as exc:
                if logged != "down":
                    log.warning("%s: master %s unreachable (%s); retrying",
                                self.ident.minion_id, self.name, exc)
                    logged = "down"
                await self._sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.retry_max)
                continue
            except (TimeoutError, zmq.ZMQError, crypto.CryptoError) as exc:
                if logged != "busy":
                    log.warning("%s: master %s not answering auth (%s); retrying after "
                                "acceptance_wait_time", self.ident.minion_id, self.name,
                                exc or "timeout")
                    logged = "busy"
                await self._sleep(next(waits) * (0.5 + random.random() / 2))
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
            await self._sleep(next(waits))
        return False

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # -- publications ------------------------------------------------------------------------------

    def _connect_sub(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 10000)
        self._set_connect_options(sub)
        if self.opts.get("zmq_filtering"):
            sub.setsockopt(zmq.SUBSCRIBE, b"broadcast")
            sub.setsockopt(zmq.SUBSCRIBE,
                           hashlib.sha1(self.ident.minion_id.encode()).hexdigest().encode())
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
            generation = self.auth_generation
            if not self._reauth_lock.locked():
                # The publish key changed (rotation, master restart): Salt's random_reauth_delay
                # spreads the fleet's re-auths instead of all of them hitting the master at once.
                delay = random.uniform(0, float(self.opts.get("random_reauth_delay", 10) or 0))
                if delay > 0:
                    log.info("%s: publication from %s does not decrypt; re-authenticating in "
                             "%.1f s (random_reauth_delay)", self.ident.minion_id, self.name, delay)
                    await self._sleep(delay)
            if not await self.reauthenticate(generation):
                return
            try:
                load = self._open(frame)
            except (CrypticleError, messages.PublicationError) as exc:
                log.debug("%s: dropping publication from %s: %s",
                          self.ident.minion_id, self.name, exc)
                return
        except messages.PublicationError as exc:
            log.warning("%s: dropping publication from %s: %s",
                        self.ident.minion_id, self.name, exc)
            return
        assert self.aes is not None
        if not self.serials.accept(self.aes.key_string, load.get("serial"),
                                   ignore_floor=after_reauth):
            log.warning("%s: dropping replayed publication (serial %r) from %s",
                        self.ident.minion_id, load.get("serial"), self.name)
            return
        if self._saved_marks is not None:
            self._saved_marks.record(self.aes.key_string, load["serial"])
        self.last_ok = time.monotonic()
        self.on_publication(self, load)

    # -- heartbeat ---------------------------------------------------------------------------------

    def _ping_load(self) -> dict:
        if self.is_hamaster:
            return {"cmd": "_hamaster_ping", "id": self.ident.minion_id}
        return {"cmd": "_file_envs", "id": self.ident.minion_id}

    async def _heartbeat_loop(self) -> None:
        """Ping the master; return when it has not answered for ``master_dead_after`` seconds.

        The ping shares the request sockets (one REQ socket per master while requests come one
        at a time); a ``bad load`` answer re-authenticates through :meth:`request`.
        """
        while not self._stop.is_set():
            # jitter: a fleet that connected together does not heartbeat in step
            await self._sleep(self.heartbeat_every * random.uniform(0.9, 1.1))
            if self._stop.is_set() or self.session is None:
                return
            dead_window = self.dead_window
            try:
                info = await asyncio.wait_for(
                    self.request(self._ping_load(), timeout=dead_window), dead_window + 1)
            except (RequestFailed, TimeoutError):
                if time.monotonic() - self.last_ok >= self.dead_window:
                    return
                continue
            if isinstance(info, dict):
                self._take_heartbeat_hint(info.get("heartbeat_interval"))
            if isinstance(info, dict) and "master_id" in info:
                new_id = info["master_id"]
                if self.master_id is not None and new_id != self.master_id:
                    log.info("%s: master at %s is now %s", self.ident.minion_id, self.name, new_id)
                self.master_id = new_id

    def _take_heartbeat_hint(self, hint: Any) -> None:
        """Adopt the master's ``heartbeat_interval`` hint (a number of seconds, capped at
        :data:`HEARTBEAT_HINT_MAX`); anything else, or none, means our own interval."""
        before = self.heartbeat_every
        if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0:
            self.hb_hint = min(float(hint), HEARTBEAT_HINT_MAX)
        else:
            self.hb_hint = 0.0
        if abs(self.heartbeat_every - before) >= 1.0:
            log.info("%s: heartbeat to master %s every %.0f s now (its hint), dead after %.0f s",
                     self.ident.minion_id, self.name, self.heartbeat_every, self.dead_window)

    async def _resume(self) -> bool:
        """After the heartbeat gave up: True when the master still knows our session (it was
        frozen, partitioned or too busy, not restarted), so no new ``_auth`` is needed. A
        restarted master answers ``bad load``; then the caller authenticates."""
        if self.session is None:
            return False
        try:
            await self.request(self._ping_load(), retry_auth=False)
        except RequestFailed:
            return False
        self.state = "connected"
        return True

    # -- main loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            resumed = await self._resume()
            if not resumed and not await self._authenticate():
                return
            if resumed:
                log.info("%s: master %s answers again (session kept)",
                         self.ident.minion_id, self.name)
            self.dead.clear()
            self._connect_sub()
            self.connected_event.set()
            if self.on_connected is not None and not resumed:
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
                    log.error("%s: connection task for %s failed: %r", self.ident.minion_id,
                              self.name, t.exception())
            self.connected_event.clear()
            self._close_sockets()
            if self._stop.is_set():
                return
            self.state = "disconnected"
            self.dead.set()
            log.warning(
                "%s: master %s stopped answering (no reply for %.0f s); reconnecting",
                self.ident.minion_id, self.name, self.dead_window,
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
