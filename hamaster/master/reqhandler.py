"""The master's request logic: one request frame in, one reply frame out, no sockets.

Every frame from the network goes through :meth:`RequestHandler.handle`, which never raises:
bad input is answered the way Salt answers it (``"bad load"``, a signed refusal…), logged once
per peer and reason, and counted in ``hamaster_requests_rejected_total``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster import __version__, crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, generate_key_string
from hamaster.master.pubkey import PublishKey
from hamaster.master.ratelog import RateLimitedLog
from hamaster.metrics import MasterMetrics
from hamaster.pki_sync.keys import AuthDecision, KeyRegistry

log = logging.getLogger(__name__)

EXC_HANDLING_REPLY = "Some exception handling minion payload"
NONCE_CACHE_PER_MINION = 512


@dataclass
class MinionSession:
    """What this master knows about one authenticated minion."""

    session: Crypticle
    pub_text: str
    pub: rsa.RSAPublicKey
    verified_tok: bytes | None = None
    last_seen: float = 0.0
    created: float = field(default_factory=time.time)  # first accepted _auth of this key
    nonces: OrderedDict[str, None] = field(default_factory=OrderedDict)
    hamaster: bool = False


class Deferred:
    """A request whose answer needs the shared store: run :meth:`run` off the event loop.

    Returned by :meth:`RequestHandler.handle` when ``allow_defer`` is set and the request is an
    ``_auth`` that memory cannot decide (a new, pending, rejected or changed key), or a verified
    request for one of ``store_commands`` (the file server over the shared store): answering it
    reads and may write the store, which on etcd or NFS can take up to a store timeout, and the
    loop must keep answering every other minion meanwhile.
    """

    def __init__(self, work: Callable[[], bytes]) -> None:
        self._work = work

    def run(self) -> bytes:
        """The reply frame (never raises)."""
        return self._work()


class _NeedsStore(Exception):
    """Internal: the request must be decided off the event loop (by ``work`` when given)."""

    def __init__(self, work: Callable[[], bytes] | None = None) -> None:
        super().__init__()
        self.work = work


class RequestHandler:
    """Decides the reply to every request that reaches the master's ROUTER socket."""

    def __init__(
        self,
        opts: dict,
        keys: KeyRegistry,
        master_priv: rsa.RSAPrivateKey,
        master_pub_text: str,
        publish_key: PublishKey,
        metrics: MasterMetrics,
        commands: dict[str, Callable[[dict], Any]],
    ) -> None:
        self.opts = opts
        self.keys = keys
        self.master_priv = master_priv
        self.master_pub_text = master_pub_text
        self.publish_key = publish_key
        self.metrics = metrics
        self.commands = commands
        self.sessions: dict[str, MinionSession] = {}
        self.minimum_version = int(opts.get("minimum_auth_version", 3))
        self.request_ttl = float(opts.get("request_server_ttl") or 0)
        self.publish_port = int(opts["publish_port"])
        self.ratelog = RateLimitedLog(log)
        self.pillar_provider: Callable[[str, dict], dict] = lambda mid, load: {}
        #: Commands that read the shared store: with ``allow_defer`` they run off the event loop.
        self.store_commands: frozenset[str] = frozenset()
        #: ``on_auth(minion_id, act, result, pub)`` after each _auth decision (the ``salt/auth``
        #: event; hamaster/events/service.py). Must not block or raise.
        self.on_auth: Callable[[str, str, bool, str], None] | None = None

    # -- entry point ---------------------------------------------------------------------

    def handle(self, payload: bytes, peer: str = "?", allow_defer: bool = False) -> bytes | Deferred:
        """Return the reply frame for one request frame. Never raises.

        With ``allow_defer``, a request that needs the store (see :class:`Deferred`) is
        returned as a :class:`Deferred` for the caller to run in a worker thread.
        """
        try:
            req = messages.parse_request(payload, self.minimum_version)
        except messages.BadRequest as exc:
            return self._refuse(exc.reason, _claimed_id(payload) or peer, exc.detail)
        try:
            return self._dispatch(req, peer, allow_defer)
        except _NeedsStore as exc:
            return Deferred(exc.work or (lambda: self._guarded(req, peer)))

    def _guarded(self, req: messages.ClearRequest | messages.AesRequest, peer: str) -> bytes:
        reply = self._dispatch(req, peer, False)
        assert isinstance(reply, bytes)
        return reply

    def _dispatch(self, req: messages.ClearRequest | messages.AesRequest, peer: str, allow_defer: bool) -> bytes:
        try:
            if isinstance(req, messages.ClearRequest):
                return self._handle_clear(req, peer, allow_defer)
            return self._handle_aes(req, peer, allow_defer)
        except _NeedsStore:
            raise
        except messages.BadRequest as exc:
            mid = req.minion_id if isinstance(req, messages.AesRequest) else req.load.get("id")
            return self._refuse(exc.reason, f"{mid}@{peer}" if isinstance(mid, str) else peer, exc.detail)
        except Exception:  # a bug must not take the master down
            log.exception("internal error handling a request from %s", peer)
            self.metrics.reject("internal")
            return messages.plain_reply(messages.BAD_LOAD)

    def _refuse(self, reason: str, peer: str, detail: str) -> bytes:
        self.metrics.reject(reason)
        # Rate-limit per claimed minion id where there is one: a stock minion opens a new
        # connection (a new routing id) for every _auth.
        self.ratelog.warn(reason, peer.split("@", 1)[0], "refused request from %s: %s", peer, detail)
        return messages.plain_reply(messages.BAD_LOAD)

    # -- clear requests: _auth ------------------------------------------------------------

    def _handle_clear(self, req: messages.ClearRequest, peer: str, allow_defer: bool = False) -> bytes:
        cmd = req.load.get("cmd")
        if cmd != "_auth":
            raise messages.BadRequest("unknown_clear_cmd", f"clear command {cmd!r} is not served")
        areq = messages.parse_auth_load(req.load)
        who = f"{areq.minion_id}@{peer}"
        if areq.enc_algo not in crypto.ENC_ALGOS:
            self.metrics.auth("bad_algo")
            self.ratelog.warn("bad_algo", who, "_auth from %s with unsupported enc_algo %r", who, areq.enc_algo)
            if areq.token is not None:
                return messages.auth_unsigned_reply("bad enc algo")
            return messages.plain_reply(EXC_HANDLING_REPLY)
        if areq.sig_algo not in crypto.SIG_ALGOS:
            self.metrics.auth("bad_algo")
            self.ratelog.warn("bad_algo", who, "_auth from %s with unsupported sig_algo %r", who, areq.sig_algo)
            return messages.auth_unsigned_reply("bad sig algo")
        if allow_defer and not self.keys.accepted_in_memory(areq.minion_id, areq.pub):
            raise _NeedsStore
        decision = self.keys.authorize(areq.minion_id, areq.pub)
        if self.on_auth is not None:
            act = {AuthDecision.PENDING: "pend", AuthDecision.ACCEPTED: "accept",
                   AuthDecision.REJECTED: "reject"}.get(decision, "denied")
            self.on_auth(areq.minion_id, act, act in ("pend", "accept"), areq.pub)
        if decision is AuthDecision.PENDING:
            self.metrics.auth("pending")
            self.ratelog.warn(
                "pending", areq.minion_id, "minion key for %s is pending: run `hamaster-key -a %s`", who, areq.minion_id
            )
            return messages.auth_status_reply(self.master_priv, True, areq.nonce, areq.sig_algo)
        if decision is not AuthDecision.ACCEPTED:
            self.metrics.auth(decision.value)
            self.ratelog.warn(decision.value, areq.minion_id, "refused _auth from %s: key %s", who, decision.value)
            self.sessions.pop(areq.minion_id, None)
            return messages.auth_status_reply(self.master_priv, False, areq.nonce, areq.sig_algo)
        try:
            minion_pub = crypto.load_public_key(areq.pub)
        except crypto.CryptoError as exc:
            self.metrics.auth("bad_key")
            raise messages.BadRequest("bad_key", f"_auth from {who}: {exc}") from None
        token_plain = None
        if areq.token is not None:
            try:
                token_plain = crypto.oaep_decrypt(self.master_priv, areq.token, areq.enc_algo)
            except crypto.CryptoError:
                self.metrics.auth("bad_token")
                self.ratelog.warn("bad_token", who, "_auth from %s carries a token we cannot decrypt", who)
                return messages.auth_status_reply(self.master_priv, False, areq.nonce, areq.sig_algo)
        sess = self.sessions.get(areq.minion_id)
        norm = crypto.normalize_pem(areq.pub)
        if sess is None or sess.pub_text != norm:
            sess = MinionSession(session=Crypticle(generate_key_string()), pub_text=norm, pub=minion_pub)
            self.sessions[areq.minion_id] = sess
        sess.last_seen = time.time()
        self.metrics.auth("accepted")
        pk = self.publish_key
        return messages.auth_accepted_reply(
            self.master_priv,
            self.master_pub_text,
            minion_pub,
            aes_key=pk.key,
            session_key=sess.session.key_string,
            publish_port=self.publish_port,
            nonce=areq.nonce,
            token_plain=token_plain,
            enc_algo=areq.enc_algo,
            sig_algo=areq.sig_algo,
            aes_sig=pk.signature,
            extra={"hamaster": __version__},
        )

    # -- aes requests -----------------------------------------------------------------------

    def _handle_aes(self, req: messages.AesRequest, peer: str, allow_defer: bool = False) -> bytes:
        mid = req.minion_id
        sess = self.sessions.get(mid)
        accepted = self.keys.accepted_pub(mid)
        if accepted is None:
            self.sessions.pop(mid, None)
            raise messages.BadRequest("unknown_minion", f"{mid}@{peer} has no accepted key")
        if sess is None:
            raise messages.BadRequest("no_session", f"{mid}@{peer} has no session here (must re-auth)")
        if crypto.normalize_pem(accepted) != sess.pub_text:
            self.sessions.pop(mid, None)
            raise messages.BadRequest("unknown_minion", f"{mid}@{peer} session predates its current key")
        load, tok = messages.open_aes_request(
            req, sess.session, sess.pub, ttl=self.request_ttl, verified_tok=sess.verified_tok
        )
        sess.verified_tok = tok
        nonce = load.get("nonce")
        if isinstance(nonce, str):
            if nonce in sess.nonces:
                raise messages.BadRequest("replay", f"{mid}@{peer} replayed request nonce {nonce}")
            sess.nonces[nonce] = None
            if len(sess.nonces) > NONCE_CACHE_PER_MINION:
                sess.nonces.popitem(last=False)
        else:
            nonce = None
        sess.last_seen = time.time()
        cmd = load["cmd"]
        self.metrics.requests.labels(self.metrics.master_id, cmd if cmd in self.commands or cmd == "_pillar" else "other").inc()
        if cmd == "_pillar":
            pillar = self.pillar_provider(mid, load)
            return messages.pillar_reply(
                self.master_priv, sess.pub, pillar, nonce, enc_algo=req.enc_algo if req.enc_algo in crypto.ENC_ALGOS else crypto.DEFAULT_ENC_ALGO,
                sig_algo=req.sig_algo if req.sig_algo in crypto.SIG_ALGOS else crypto.DEFAULT_SIG_ALGO,
            )
        fn = self.commands.get(cmd)
        if fn is None:
            self.ratelog.warn("unknown_cmd", f"{mid}@{peer}", "%s@%s sent unknown command %r; answered {}", mid, peer, cmd)
            return messages.aes_reply(sess.session, {}, nonce)
        if allow_defer and cmd in self.store_commands:
            # Verified and its nonce recorded above; only the command itself runs elsewhere.
            session = sess.session
            raise _NeedsStore(lambda: self._run_command(fn, cmd, load, mid, peer, session, nonce))
        return self._run_command(fn, cmd, load, mid, peer, sess.session, nonce)

    def _run_command(self, fn: Callable[[dict], Any], cmd: str, load: dict, mid: str, peer: str,
                     session: Crypticle, nonce: str | None) -> bytes:
        """Run an allowed command and encrypt its answer (never raises)."""
        try:
            ret = fn(load)
        except messages.BadRequest as exc:
            return self._refuse(exc.reason, f"{mid}@{peer}", exc.detail)
        except Exception:
            log.exception("command %s from %s failed", cmd, mid)
            ret = {}
        try:
            return messages.aes_reply(session, ret, nonce)
        except Exception:
            log.exception("cannot encode the answer to %s from %s", cmd, mid)
            self.metrics.reject("internal")
            return messages.plain_reply(messages.BAD_LOAD)

    # -- key changes ----------------------------------------------------------------------------

    def forget(self, minion_id: str) -> None:
        """Drop a minion's session (its key was deleted, rejected or replaced)."""
        self.sessions.pop(minion_id, None)

    def connected(self, window: float) -> list[str]:
        """Minions that made a request within ``window`` seconds."""
        cutoff = time.time() - window
        return sorted(m for m, s in self.sessions.items() if s.last_seen >= cutoff)


def _claimed_id(payload: bytes) -> str | None:
    """The minion id a refused frame claims, for logging only (never trusted)."""
    try:
        env = codec.loads(payload, max_size=1 << 20)
    except codec.DecodeError:
        return None
    if not isinstance(env, dict):
        return None
    mid = env.get("id")
    if mid is None and isinstance(env.get("load"), dict):
        mid = env["load"].get("id")
    return f"{mid}" if isinstance(mid, str) and len(mid) < 256 else None
