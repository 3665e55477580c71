"""The master's request logic: one request frame in, one reply frame out, no sockets.

Every frame from the network goes through :meth:`RequestHandler.handle`, which never raises:
bad input is answered the way Salt answers it (``"bad load"``, a signed refusal…), logged once
per peer and reason, and counted in ``hamaster_requests_rejected_total``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster import __version__, crypto, ids
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, generate_key_string
from hamaster.bus.replay import RequestReplayGuard
from hamaster.master.pubkey import PublishKey
from hamaster.master.ratelog import RateLimitedLog
from hamaster.metrics import MasterMetrics
from hamaster.pki_sync.keys import AuthDecision, KeyRegistry, key_hint

log = logging.getLogger(__name__)

EXC_HANDLING_REPLY = "Some exception handling minion payload"
NONCE_CACHE_PER_MINION = 4096
#: Default ``request_server_ttl`` (seconds): a request's ``ts`` must be this close to our clock.
REQUEST_TTL_DEFAULT = 300
#: aes requests larger than this are decrypted and decoded in a worker thread (``Deferred``),
#: so a big return (or a big forgery that fails its HMAC) never holds the event loop.
INLINE_DECRYPT_MAX = 256 * 1024


@dataclass
class MinionSession:
    """What this master knows about one authenticated minion."""

    session: Crypticle
    pub_text: str
    pub: rsa.RSAPublicKey
    verified_tok: bytes | None = None
    last_seen: float = 0.0
    created: float = field(default_factory=time.time)  # first accepted _auth of this key
    replay: RequestReplayGuard = field(default_factory=lambda: RequestReplayGuard(REQUEST_TTL_DEFAULT))
    hamaster: bool = False


class Deferred:
    """A request whose answer needs the shared store: run :meth:`run` off the event loop.

    Returned by :meth:`RequestHandler.handle` when ``allow_defer`` is set and the request is an
    ``_auth`` that memory cannot decide (a new, pending, rejected or changed key), or a verified
    request for one of ``store_commands`` (the file server over the shared store): answering it
    reads and may write the store, which on etcd or NFS can take up to a store timeout, and the
    loop must keep answering every other minion meanwhile.
    """

    def __init__(self, work: Callable[[], Any], finish: Callable[[Any], bytes | Deferred] | None = None,
                 size: int = 0, kind: str = "store") -> None:
        self._work = work
        #: Set for a large aes request: ``run`` only decrypts it (in a thread, ``size`` bytes);
        #: ``finish(result)`` must then run on the event loop and gives the reply (or, for a
        #: store command, another ``Deferred``).
        self.finish = finish
        self.size = size
        #: ``"store"``, or ``"pillar"`` for a pillar compile (CPU-bound: the daemon gives it a
        #: pool of its own so that compiles neither starve other store requests nor crowd the
        #: event loop out of the GIL).
        self.kind = kind

    def run(self) -> Any:
        """The reply frame, or with :attr:`finish` the intermediate result (never raises)."""
        return self._work()


class _NeedsStore(Exception):
    """Internal: the request must be decided off the event loop (by ``work`` when given)."""

    def __init__(self, work: Callable[[], bytes] | None = None, kind: str = "store") -> None:
        super().__init__()
        self.work = work
        self.kind = kind


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
        self.request_ttl = float(opts.get("request_server_ttl", REQUEST_TTL_DEFAULT) or 0)
        self.max_request = int(opts.get("max_request_size") or messages.REQUEST_MAX)
        self.max_clear = int(opts.get("max_clear_request_size") or messages.CLEAR_REQUEST_MAX)
        self.clock: Callable[[], float] = time.time
        self.publish_port = int(opts["publish_port"])
        self.ratelog = RateLimitedLog(log)
        self.pillar_provider: Callable[[str, dict], dict] = lambda mid, load: {}
        #: Commands that read the shared store: with ``allow_defer`` they run off the event loop.
        self.store_commands: frozenset[str] = frozenset()
        #: With ``allow_defer``, ``_pillar`` (a compile that reads the pillar tree) runs off the loop.
        self.defer_pillar = False
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
            req = messages.parse_request(
                payload, self.minimum_version, max_size=self.max_request, max_clear=self.max_clear)
        except messages.BadRequest as exc:
            claimed = _claimed_id(payload) if exc.reason != "too_large" else None
            return self._refuse(exc.reason, claimed or peer, exc.detail)
        if allow_defer and isinstance(req, messages.AesRequest) and len(req.payload) > INLINE_DECRYPT_MAX:
            return self._defer_decrypt(req, peer)
        try:
            return self._dispatch(req, peer, allow_defer)
        except _NeedsStore as exc:
            return Deferred(exc.work or (lambda: self._guarded(req, peer)), kind=exc.kind)

    def _defer_decrypt(self, req: messages.AesRequest, peer: str) -> bytes | Deferred:
        """A large aes request: the checks that need no crypto now, decryption in a thread,
        everything that touches session state back on the loop (``Deferred.finish``)."""
        try:
            sess = self._aes_session(req, peer)
        except messages.BadRequest as exc:
            return self._refuse(exc.reason, f"{req.minion_id}@{peer}", exc.detail)
        ttl, verified = self.request_ttl, sess.verified_tok

        def work() -> Any:
            try:
                return messages.open_aes_request(
                    req, sess.session, sess.pub, now=self.clock(), ttl=ttl, verified_tok=verified)
            except messages.BadRequest as exc:
                return exc
            except Exception as exc:  # never raise out of a worker
                return messages.BadRequest("internal", repr(exc))

        def finish(opened: Any) -> bytes | Deferred:
            try:
                if isinstance(opened, messages.BadRequest):
                    raise opened
                if self.sessions.get(req.minion_id) is not sess:
                    raise messages.BadRequest("no_session", f"{req.minion_id}@{peer} session changed meanwhile")
                load, tok = opened
                return self._aes_opened(req, peer, sess, load, tok, True)
            except _NeedsStore as exc:
                assert exc.work is not None
                return Deferred(exc.work, kind=exc.kind)
            except messages.BadRequest as exc:
                return self._refuse(exc.reason, f"{req.minion_id}@{peer}", exc.detail)
            except Exception:
                log.exception("internal error handling a request from %s", peer)
                self.metrics.reject("internal")
                return messages.plain_reply(messages.BAD_LOAD)

        return Deferred(work, finish, size=len(req.payload))

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
        who = f"{ids.shown(areq.minion_id)}@{peer}"
        problem = ids.minion_id_problem(areq.minion_id)
        if problem is not None:  # refused before any store access (Salt: "invalid id")
            self.metrics.auth("invalid_id")
            self.ratelog.warn("invalid_id", areq.minion_id, "refused _auth from %s: minion id %s",
                              who, problem)
            return messages.auth_status_reply(self.master_priv, False, areq.nonce, areq.sig_algo)
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
            self.ratelog.warn("pending", areq.minion_id, "minion key for %s is pending: accept "
                              "it with %s", who, key_hint("-a", areq.minion_id))
            return messages.auth_status_reply(self.master_priv, True, areq.nonce, areq.sig_algo)
        if decision is not AuthDecision.ACCEPTED:
            self.metrics.auth(decision.value)
            self.ratelog.warn(decision.value, areq.minion_id, "refused _auth from %s: key %s", who, decision.value)
            # The session of the accepted key stays: whoever knows an id can send this. A key
            # that really leaves the accepted state drops it through ``forget`` (key change).
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
                # The minion encrypted its token for another master key (it pinned another
                # one). Like salt-master, answer without the token echo: the minion then
                # refuses our key itself, clearly, and retries. A "rejected" reply instead makes
                # a stock salt-minion exit (rejected_retry is off by default).
                self.metrics.auth("bad_token")
                self.ratelog.warn("bad_token", who, "_auth from %s carries a token we cannot decrypt "
                                  "(it was encrypted for another master key: the minion pinned "
                                  "another key than this master's %s)", who,
                                  crypto.pem_fingerprint(self.master_pub_text))
        sess = self.sessions.get(areq.minion_id)
        norm = crypto.normalize_pem(areq.pub)
        if sess is None or sess.pub_text != norm:
            sess = MinionSession(session=Crypticle(generate_key_string()), pub_text=norm, pub=minion_pub,
                                 replay=RequestReplayGuard(self.request_ttl, NONCE_CACHE_PER_MINION))
            self.sessions[areq.minion_id] = sess
        sess.last_seen = time.time()
        if token_plain is not None or areq.token is None:
            self.metrics.auth("accepted")
        master_priv, master_pub_text = self.master_priv, self.master_pub_text  # one identity
        pub_key, pub_sig, serial = self.publish_key.snapshot(signer=master_priv)
        return messages.auth_accepted_reply(
            master_priv,
            master_pub_text,
            minion_pub,
            aes_key=pub_key,
            session_key=sess.session.key_string,
            publish_port=self.publish_port,
            nonce=areq.nonce,
            token_plain=token_plain,
            enc_algo=areq.enc_algo,
            sig_algo=areq.sig_algo,
            aes_sig=pub_sig,
            # The serial lets our minions refuse publications made before this auth (replays
            # of captured frames after a minion restart).
            extra={"hamaster": __version__, messages.PUBLISH_SERIAL_FIELD: serial},
        )

    # -- aes requests -----------------------------------------------------------------------

    def _aes_session(self, req: messages.AesRequest, peer: str) -> MinionSession:
        """The session an aes request must decrypt with (raises :class:`BadRequest`)."""
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
        return sess

    def _handle_aes(self, req: messages.AesRequest, peer: str, allow_defer: bool = False) -> bytes:
        sess = self._aes_session(req, peer)
        load, tok = messages.open_aes_request(
            req, sess.session, sess.pub, now=self.clock(), ttl=self.request_ttl, verified_tok=sess.verified_tok
        )
        return self._aes_opened(req, peer, sess, load, tok, allow_defer)

    def _aes_opened(self, req: messages.AesRequest, peer: str, sess: MinionSession, load: dict,
                    tok: bytes, allow_defer: bool) -> bytes:
        """A decrypted, authenticated aes request: replay check, then the command."""
        mid = req.minion_id
        sess.verified_tok = tok
        nonce = load.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise messages.BadRequest("no_nonce", f"{mid}@{peer} request carries no nonce")
        ts = load.get("ts")
        ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None
        now = self.clock()
        why = sess.replay.admit(nonce, ts, now)
        if why is not None:
            raise messages.BadRequest("replay", f"{mid}@{peer} replayed request: {why}")
        sess.last_seen = now
        cmd = load["cmd"]
        self.metrics.requests.labels(self.metrics.master_id, cmd if cmd in self.commands or cmd == "_pillar" else "other").inc()
        if cmd == "_pillar":
            # The id is the authenticated session's (the envelope id, checked equal to the
            # load's above), never anything else from the request body.
            pub = sess.pub
            if allow_defer and self.defer_pillar:
                raise _NeedsStore(lambda: self._pillar_reply(mid, peer, load, pub, nonce, req),
                                  "pillar")
            return self._pillar_reply(mid, peer, load, pub, nonce, req)
        fn = self.commands.get(cmd)
        if fn is None:
            self.ratelog.warn("unknown_cmd", f"{mid}@{peer}", "%s@%s sent unknown command %r; answered {}", mid, peer, cmd)
            return messages.aes_reply(sess.session, {}, nonce)
        if allow_defer and cmd in self.store_commands:
            # Verified and its nonce recorded above; only the command itself runs elsewhere.
            session = sess.session
            raise _NeedsStore(lambda: self._run_command(fn, cmd, load, mid, peer, session, nonce))
        return self._run_command(fn, cmd, load, mid, peer, sess.session, nonce)

    def _pillar_reply(self, mid: str, peer: str, load: dict, pub: rsa.RSAPublicKey,
                      nonce: str | None, req: messages.AesRequest) -> bytes:
        """Compile ``mid``'s pillar and seal it to the minion's key (never raises)."""
        try:
            pillar = self.pillar_provider(mid, load)
        except Exception:
            log.exception("pillar for %s@%s failed", mid, peer)
            pillar = {"_errors": ["Pillar compilation failed on the master (see its log)"]}
        try:
            return messages.pillar_reply(
                self.master_priv, pub, pillar, nonce,
                enc_algo=req.enc_algo if req.enc_algo in crypto.ENC_ALGOS else crypto.DEFAULT_ENC_ALGO,
                sig_algo=req.sig_algo if req.sig_algo in crypto.SIG_ALGOS else crypto.DEFAULT_SIG_ALGO,
            )
        except Exception:
            log.exception("cannot encode the pillar of %s", mid)
            self.metrics.reject("internal")
            return messages.plain_reply(messages.BAD_LOAD)

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
        env = codec.loads(payload, max_size=1 << 20, max_objects=codec.ENVELOPE_MAX_OBJECTS)
    except codec.DecodeError:
        return None
    if not isinstance(env, dict):
        return None
    mid = env.get("id")
    if mid is None and isinstance(env.get("load"), dict):
        mid = env["load"].get("id")
    return f"{mid}" if isinstance(mid, str) and len(mid) < 256 else None
