"""The master's request logic: one request frame in, one reply frame out, no sockets.

Every frame from the network goes through :meth:`RequestHandler.handle`, which never raises:
bad input is answered the way Salt answers it (``"bad load"``, a signed refusal…), logged once
per peer and reason, and counted in ``hamaster_requests_rejected_total``.

The wire checks are :mod:`hamaster.bus.messages`' (``parse_request``, ``parse_auth_request``,
``open_aes_request``); this module holds the decisions: keys, sessions, replay, commands. Each
step returns ``bytes | Deferred``, so the checks run once, on the event loop, and a
:class:`Deferred` carries only what must wait on the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster import __version__, crypto, ids
from hamaster.bus import messages
from hamaster.bus.crypticle import Crypticle, generate_key_string
from hamaster.bus.replay import RequestReplayGuard
from hamaster.master.pubkey import PublishKey
from hamaster.metrics import MasterMetrics
from hamaster.pki_sync.keys import AuthDecision, KeyRegistry, key_hint
from hamaster.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

NONCE_CACHE_PER_MINION = 4096
#: Default ``request_server_ttl`` (seconds): a request's ``ts`` must be this close to our clock.
REQUEST_TTL_DEFAULT = 300
#: aes requests larger than this are decrypted and decoded in a worker thread (``Deferred``),
#: so a big return (or a big forgery that fails its HMAC) never holds the event loop.
INLINE_DECRYPT_MAX = 256 * 1024
_R = TypeVar("_R")


@dataclass
class MinionSession:
    """What this master knows about one authenticated minion."""

    session: Crypticle
    pub_text: str
    pub: rsa.RSAPublicKey
    verified_tok: bytes | None = None
    last_seen: float = 0.0
    created: float = field(default_factory=time.time)  # first accepted _auth of this key
    replay: RequestReplayGuard = field(
        default_factory=lambda: RequestReplayGuard(REQUEST_TTL_DEFAULT))
    hamaster: bool = False


class Deferred:
    """A request whose answer needs the shared store (or a long decryption): run :meth:`run`
    off the event loop, in a worker thread.

    Returned by :meth:`RequestHandler.handle` when ``allow_defer`` is set, once every wire
    check has passed on the loop, for: an ``_auth`` that memory cannot decide (a new, pending,
    rejected or changed key), a verified request for one of ``store_commands`` (the file
    server over the shared store), a ``_pillar`` compile, or a large aes request to decrypt.
    Only the store-bound decision runs in the thread: answering it reads and may write the
    store, which on etcd or NFS can take up to a store timeout, and the loop must keep
    answering every other minion meanwhile.
    """

    def __init__(self, work: Callable[[], Any],
                 finish: Callable[[Any], bytes | Deferred] | None = None,
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


class RequestHandler:
    """Decides the reply to every request that reaches the master's ROUTER socket.

    Every step returns ``bytes | Deferred``: the wire checks (:mod:`hamaster.bus.messages`)
    and whatever memory can decide run once, on the caller's thread; a :class:`Deferred` then
    carries only the store-bound rest (with ``allow_defer``; without it that rest runs at once).
    """

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
        #: With ``allow_defer``, ``_pillar`` (a compile that reads the pillar tree) runs off the
        #: loop.
        self.defer_pillar = False
        #: ``on_auth(minion_id, act, result, pub)`` after each _auth decision (the ``salt/auth``
        #: event; hamaster/master/events.py). Must not block or raise.
        self.on_auth: Callable[[str, str, bool, str], None] | None = None

    # -- entry point ---------------------------------------------------------------------

    def handle(self, payload: bytes, peer: str = "?",
               allow_defer: bool = False) -> bytes | Deferred:
        """Return the reply frame for one request frame. Never raises.

        With ``allow_defer``, a request that needs the store (see :class:`Deferred`) is
        returned as a :class:`Deferred` for the caller to run in a worker thread.
        """
        try:
            req = messages.parse_request(
                payload, self.minimum_version, max_size=self.max_request, max_clear=self.max_clear)
        except messages.BadRequest as exc:
            claimed = messages.claimed_id(payload) if exc.reason != "too_large" else None
            return self._refuse(exc.reason, claimed or peer, exc.detail)
        if isinstance(req, messages.ClearRequest):
            mid = req.load.get("id")
            who = f"{mid}@{peer}" if isinstance(mid, str) else peer
            return self._guarded(lambda: self._handle_clear(req, peer, allow_defer), who, peer)
        who = f"{req.minion_id}@{peer}"
        if allow_defer and len(req.payload) > INLINE_DECRYPT_MAX:
            return self._guarded(lambda: self._defer_decrypt(req, peer), who, peer)
        return self._guarded(lambda: self._handle_aes(req, peer, allow_defer), who, peer)

    def _guarded(self, step: Callable[[], _R], who: str, peer: str) -> _R | bytes:
        """``step()``, with a refusal (:class:`~messages.BadRequest`) answered ``"bad load"``
        and counted under its reason, and any other exception (a bug) logged, counted as
        ``internal`` and answered ``"bad load"``: a request never takes the master down."""
        try:
            return step()
        except messages.BadRequest as exc:
            return self._refuse(exc.reason, who, exc.detail)
        except Exception:  # a bug must not take the master down
            log.exception("internal error handling a request from %s", peer)
            self.metrics.reject("internal")
            return messages.plain_reply(messages.BAD_LOAD)

    def _defer(self, decide: Callable[[], bytes], who: str, peer: str,
               kind: str = "store") -> Deferred:
        """The store-bound rest of a checked request, for a worker thread (never raises there)."""
        return Deferred(lambda: self._guarded(decide, who, peer), kind=kind)

    def _defer_decrypt(self, req: messages.AesRequest, peer: str) -> Deferred:
        """A large aes request: the checks that need no crypto now, decryption in a thread,
        everything that touches session state back on the loop (``Deferred.finish``)."""
        sess = self._aes_session(req, peer)
        ttl, verified = self.request_ttl, sess.verified_tok
        who = f"{req.minion_id}@{peer}"

        def work() -> Any:
            try:
                return messages.open_aes_request(
                    req, sess.session, sess.pub, now=self.clock(), ttl=ttl, verified_tok=verified)
            except messages.BadRequest as exc:
                return exc
            except Exception as exc:  # never raise out of a worker
                return messages.BadRequest("internal", repr(exc))

        def opened(result: Any) -> bytes | Deferred:
            if isinstance(result, messages.BadRequest):
                raise result
            if self.sessions.get(req.minion_id) is not sess:
                raise messages.BadRequest("no_session", f"{who} session changed meanwhile")
            load, tok = result
            return self._aes_opened(req, peer, sess, load, tok, True)

        def finish(result: Any) -> bytes | Deferred:
            return self._guarded(lambda: opened(result), who, peer)

        return Deferred(work, finish, size=len(req.payload))

    def _refuse(self, reason: str, peer: str, detail: str) -> bytes:
        self.metrics.reject(reason)
        # Rate-limit per claimed minion id where there is one: a stock minion opens a new
        # connection (a new routing id) for every _auth.
        self.ratelog.warn(reason, peer.split("@", 1)[0], "refused request from %s: %s", peer,
                          detail)
        return messages.plain_reply(messages.BAD_LOAD)

    # -- clear requests: _auth ------------------------------------------------------------

    def _handle_clear(self, req: messages.ClearRequest, peer: str,
                      allow_defer: bool = False) -> bytes | Deferred:
        """A clear request: the wire checks (:func:`messages.parse_auth_request`), then
        :meth:`_auth`. Raises :class:`~messages.BadRequest` for a ``"bad load"`` refusal."""
        try:
            areq = messages.parse_auth_request(req)
        except messages.AuthRefused as exc:
            return self._auth_refused(exc, peer)
        return self._auth(areq, peer, allow_defer)

    def _auth_refused(self, exc: messages.AuthRefused, peer: str) -> bytes:
        """Answer an ``_auth`` the wire rules refused (invalid id, unsupported algorithm) as Salt
        does, before any store access; counted in ``hamaster_auth_requests_total``."""
        mid = exc.auth.minion_id
        who = f"{ids.shown(mid)}@{peer}"
        self.metrics.auth(exc.reason)
        self.ratelog.warn(exc.reason, mid if exc.reason == "invalid_id" else who,
                          "refused _auth from %s: %s", who, exc.detail)
        return exc.reply(self.master_priv)

    def _auth(self, areq: messages.AuthRequest, peer: str, allow_defer: bool) -> bytes | Deferred:
        """A well-formed ``_auth``: decided at once when memory holds exactly this accepted key
        (the common case; no store access), else by the key registry over the store, which with
        ``allow_defer`` happens in a worker thread (:class:`Deferred`)."""
        if allow_defer and not self.keys.accepted_in_memory(areq.minion_id, areq.pub):
            return self._defer(lambda: self._auth_decide(areq, peer), f"{areq.minion_id}@{peer}",
                               peer)
        return self._auth_decide(areq, peer)

    def _auth_decide(self, areq: messages.AuthRequest, peer: str) -> bytes:
        """The key decision for a checked ``_auth`` and its reply (may read and write the
        store). Raises :class:`~messages.BadRequest` for an unusable key."""
        who = f"{ids.shown(areq.minion_id)}@{peer}"
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
            self.ratelog.warn(decision.value, areq.minion_id, "refused _auth from %s: key %s",
                              who, decision.value)
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
                self.ratelog.warn("bad_token", who, "_auth from %s carries a token we cannot "
                                  "decrypt (it was encrypted for another master key: the minion "
                                  "pinned another key than this master's %s)", who,
                                  crypto.pem_fingerprint(self.master_pub_text))
        sess = self.sessions.get(areq.minion_id)
        norm = crypto.normalize_pem(areq.pub)
        if sess is None or sess.pub_text != norm:
            sess = MinionSession(session=Crypticle(generate_key_string()), pub_text=norm,
                                 pub=minion_pub,
                                 replay=RequestReplayGuard(self.request_ttl,
                                                           NONCE_CACHE_PER_MINION))
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
            raise messages.BadRequest("no_session",
                                      f"{mid}@{peer} has no session here (must re-auth)")
        if crypto.normalize_pem(accepted) != sess.pub_text:
            self.sessions.pop(mid, None)
            raise messages.BadRequest("unknown_minion",
                                      f"{mid}@{peer} session predates its current key")
        return sess

    def _handle_aes(self, req: messages.AesRequest, peer: str,
                    allow_defer: bool = False) -> bytes | Deferred:
        sess = self._aes_session(req, peer)
        load, tok = messages.open_aes_request(
            req, sess.session, sess.pub, now=self.clock(), ttl=self.request_ttl,
            verified_tok=sess.verified_tok)
        return self._aes_opened(req, peer, sess, load, tok, allow_defer)

    def _aes_opened(self, req: messages.AesRequest, peer: str, sess: MinionSession, load: dict,
                    tok: bytes, allow_defer: bool) -> bytes | Deferred:
        """A decrypted, authenticated aes request: replay check, then the command."""
        mid = req.minion_id
        who = f"{mid}@{peer}"
        sess.verified_tok = tok
        nonce = load["nonce"]  # a non-empty string: open_aes_request checked it
        ts = load.get("ts")
        ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None
        now = self.clock()
        why = sess.replay.admit(nonce, ts, now)
        if why is not None:
            raise messages.BadRequest("replay", f"{who} replayed request: {why}")
        sess.last_seen = now
        cmd = load["cmd"]
        label = cmd if cmd in self.commands or cmd == "_pillar" else "other"
        self.metrics.requests.labels(self.metrics.master_id, label).inc()
        if cmd == "_pillar":
            # The id is the authenticated session's (the envelope id, checked equal to the
            # load's above), never anything else from the request body.
            pub = sess.pub
            if allow_defer and self.defer_pillar:
                return self._defer(lambda: self._pillar_reply(mid, peer, load, pub, nonce, req),
                                   who, peer, "pillar")
            return self._pillar_reply(mid, peer, load, pub, nonce, req)
        fn = self.commands.get(cmd)
        if fn is None:
            self.ratelog.warn("unknown_cmd", who, "%s@%s sent unknown command %r; answered {}",
                              mid, peer, cmd)
            return messages.aes_reply(sess.session, {}, nonce)
        if allow_defer and cmd in self.store_commands:
            # Verified and its nonce recorded above; only the command itself runs elsewhere.
            session = sess.session
            return self._defer(lambda: self._run_command(fn, cmd, load, mid, peer, session, nonce),
                               who, peer)
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
            enc_algo = req.enc_algo if req.enc_algo in crypto.ENC_ALGOS else crypto.DEFAULT_ENC_ALGO
            sig_algo = req.sig_algo if req.sig_algo in crypto.SIG_ALGOS else crypto.DEFAULT_SIG_ALGO
            return messages.pillar_reply(self.master_priv, pub, pillar, nonce,
                                         enc_algo=enc_algo, sig_algo=sig_algo)
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

    def connected_count(self, window: float) -> int:
        """How many minions made a request within ``window`` seconds (no list, no sort)."""
        cutoff = time.time() - window
        return sum(1 for s in self.sessions.values() if s.last_seen >= cutoff)

