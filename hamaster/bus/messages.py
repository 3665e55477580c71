"""Salt request-protocol v3 messages, both directions, as pure functions over bytes.

Master side: :func:`parse_request` → :class:`ClearRequest` / :class:`AesRequest`,
:func:`parse_auth_request` (every wire check of an ``_auth``; :class:`AuthRefused` carries
Salt's answer), :func:`open_aes_request`, :func:`aes_reply`, :func:`auth_*_reply`,
:func:`pillar_reply`, :func:`wrap_publication`. Minion side: :func:`auth_request`,
:func:`parse_auth_reply`, :func:`aes_request`, :func:`parse_aes_reply`, :func:`parse_pillar_reply`,
:func:`open_publication`. No sockets, no clocks except where a caller passes them in.
Map key orders follow what real Salt 3008.5 puts on the wire.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster import crypto, ids
from hamaster.bus import codec
from hamaster.bus.crypticle import Crypticle, CrypticleError, generate_key_string

ENVELOPE_VERSION = 3
CLEAR_REQUEST_MAX = 64 * 1024
"""Default cap on a clear (``_auth``) request frame; a real one is about 1 KiB."""
REQUEST_MAX = 32 * 1024 * 1024
"""Default cap on any request frame (an aes request carrying a large return)."""
BAD_LOAD = "bad load"
EXC_HANDLING_REPLY = "Some exception handling minion payload"
"""Salt's bare-string answer to an ``_auth`` with an unsupported ``enc_algo`` and no token."""
PUBLISH_SERIAL_FIELD = "hamaster_serial"
"""Extra field of a hamaster master's accepted auth reply: the publish key's current serial
(signed with the reply; stock minions ignore it)."""
TOKEN_MESSAGE = b"salt"


class BadRequest(ValueError):
    """A request the master refuses. ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AuthReplyError(Exception):
    """A master's ``_auth`` reply that our minion must not trust."""


class MasterKeyMismatch(AuthReplyError):
    """The master does not hold the master key this minion pinned (``minion_master.pub``)."""


class BadLoadReply(Exception):
    """The master answered ``"bad load"``: re-authenticate and retry."""


def new_nonce() -> str:
    """A fresh 32-character hex nonce (uuid4), as Salt uses."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------
# Master side: requests in
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearRequest:
    """An ``enc: clear`` request (``_auth``, or a Salt CLI ``publish``)."""

    load: dict
    version: int


@dataclass(frozen=True)
class AesRequest:
    """An ``enc: aes`` request, still encrypted with the sender's session key. ``payload`` is a
    view into the received frame (no copy of a large request is made before its HMAC check)."""

    minion_id: str
    payload: bytes | memoryview
    version: int
    enc_algo: str
    sig_algo: str


def _envelope(frame: bytes, max_size: int = codec.MAX_FRAME) -> Any:
    """Decode an unauthenticated envelope with the shape limits (raises ``DecodeError``)."""
    return codec.loads(frame, max_size=max_size, max_objects=codec.ENVELOPE_MAX_OBJECTS)


_FIELD_MAX = 1024
"""Envelope keys and small values (enc, version, id, algorithms) longer than this are refused."""
_TOO_BIG = object()


def parse_request(
    frame: bytes,
    minimum_version: int = ENVELOPE_VERSION,
    *,
    max_size: int = REQUEST_MAX,
    max_clear: int = CLEAR_REQUEST_MAX,
) -> ClearRequest | AesRequest:
    """Decode one request frame; raises :class:`BadRequest` for anything malformed or too old.

    Before anything is decoded: a frame over ``max_size`` bytes is refused (``too_large``), and
    the frame's shape is checked (at most :data:`codec.ENVELOPE_MAX_OBJECTS` objects, nesting
    at most :data:`codec.ENVELOPE_MAX_DEPTH`), so no frame costs more than about a millisecond.
    A clear request over ``max_clear`` bytes is refused too.
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise BadRequest("malformed", f"expected bytes, got {type(frame).__name__}")
    if len(frame) > max_size:
        raise BadRequest("too_large", f"request of {len(frame)} bytes exceeds {max_size}")
    data = frame if isinstance(frame, bytes) else bytes(frame)
    try:
        spans = codec.map_spans(data)
        if spans is None:
            raise BadRequest("malformed", "not a request envelope (no enc/load)")
        fields: dict[str, codec.Span] = {}
        for (ks, ke), value in spans:
            if ke - ks <= _FIELD_MAX:
                key = codec.loads(data[ks:ke])
                if isinstance(key, str):
                    fields[key] = value
        if "enc" not in fields or "load" not in fields:
            raise BadRequest("malformed", "not a request envelope (no enc/load)")

        def small(name: str, default: Any = None) -> Any:
            span = fields.get(name)
            if span is None:
                return default
            if span[1] - span[0] > _FIELD_MAX:
                return _TOO_BIG
            return codec.loads(data[span[0]:span[1]])

        version = small("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadRequest("malformed", "envelope version is not an integer")
        if version < minimum_version:
            raise BadRequest("version", f"envelope version {version} < minimum {minimum_version}")
        enc = small("enc")
        if enc == "clear":
            if len(data) > max_clear:
                raise BadRequest("too_large",
                                 f"clear request of {len(data)} bytes exceeds {max_clear}")
            ls, le = fields["load"]
            load = codec.loads(data[ls:le])
            if not isinstance(load, dict):
                raise BadRequest("malformed", "clear load is not a map")
            return ClearRequest(load=load, version=version)
        if enc == "aes":
            mid = small("id")
            if not isinstance(mid, str) or not mid:
                raise BadRequest("malformed", "aes envelope without an id")
            payload = codec.raw_span(data, fields["load"])
            if payload is None:
                raise BadRequest("malformed", "aes load is not a string or binary")
            enc_algo = small("enc_algo", crypto.DEFAULT_ENC_ALGO)
            sig_algo = small("sig_algo", crypto.DEFAULT_SIG_ALGO)
            return AesRequest(
                minion_id=mid,
                payload=payload,
                version=version,
                enc_algo=str(enc_algo) if enc_algo is not _TOO_BIG else "?",
                sig_algo=str(sig_algo) if sig_algo is not _TOO_BIG else "?",
            )
    except codec.DecodeError as exc:
        raise BadRequest("malformed", str(exc)) from None
    raise BadRequest("malformed", f"unknown enc {enc!r}" if enc is not _TOO_BIG else "unknown enc")


def claimed_id(frame: bytes) -> str | None:
    """The minion id a refused frame claims (envelope ``id``, else the load's), for logging
    only: never trusted. None when the frame does not decode or names no short string id."""
    try:
        env = _envelope(frame, max_size=1 << 20)
    except codec.DecodeError:
        return None
    if not isinstance(env, dict):
        return None
    mid = env.get("id")
    if mid is None and isinstance(env.get("load"), dict):
        mid = env["load"].get("id")
    return f"{mid}" if isinstance(mid, str) and len(mid) < 256 else None


def open_aes_request(
    req: AesRequest,
    session: Crypticle,
    minion_pub: rsa.RSAPublicKey,
    *,
    now: float | None = None,
    ttl: float = 0,
    verified_tok: bytes | None = None,
) -> tuple[dict, bytes]:
    """Decrypt and authenticate an aes request; returns ``(load, tok)``.

    Checks the HMAC (session key), that ``id`` inside equals the envelope id, a ``cmd``, that
    ``tok`` recovers to ``b"salt"`` under the accepted key (skipped when it equals
    ``verified_tok``, a tok this minion already proved), ``ts`` against ``ttl`` when set, and a
    non-empty string ``nonce`` (``no_nonce``; whether it was seen before is the caller's
    session state: :class:`~hamaster.bus.replay.RequestReplayGuard`).
    """
    try:
        load = session.loads(req.payload)
    except CrypticleError as exc:
        raise BadRequest("decrypt", str(exc)) from None
    if not isinstance(load, dict):
        raise BadRequest("malformed", "decrypted load is not a map")
    if load.get("id") != req.minion_id:
        raise BadRequest("forged", "load id does not match envelope id")
    if not isinstance(load.get("cmd"), str):
        raise BadRequest("malformed", "load has no cmd")
    tok = load.get("tok")
    if tok is None:
        raise BadRequest("no_token", "request carries no tok")
    try:
        tok_b = codec.to_bytes(tok)
    except codec.DecodeError:
        raise BadRequest("malformed", "tok is not binary") from None
    if verified_tok is None or tok_b != verified_tok:
        if crypto.x931_recover(minion_pub, tok_b) != TOKEN_MESSAGE:
            raise BadRequest("bad_token", "tok does not verify with the accepted key")
    if ttl:
        ts = load.get("ts")
        if not isinstance(ts, (int, float)) or abs((now or time.time()) - ts) > ttl:
            raise BadRequest("replay", "request timestamp outside request_server_ttl")
    nonce = load.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        raise BadRequest("no_nonce", "request carries no nonce")
    return load, tok_b


def aes_reply(session: Crypticle, ret: Any, nonce: str | None) -> bytes:
    """Reply to an aes request: the msgpack string of Crypticle(session)(nonce + ret)."""
    return codec.dumps(session.dumps(ret, nonce=nonce))


def plain_reply(text: str = BAD_LOAD) -> bytes:
    """A bare msgpack string reply (``"bad load"``), as Salt sends for undecodable requests."""
    return codec.dumps(text)


@dataclass(frozen=True)
class AuthRequest:
    """A decoded ``_auth`` load."""

    minion_id: str
    pub: str
    nonce: str | None
    enc_algo: str
    sig_algo: str
    token: bytes | None
    autosign_grains: dict | None = None


def parse_auth_load(load: dict) -> AuthRequest:
    """Validate the field types of an ``_auth`` load; raises :class:`BadRequest`."""
    mid = load.get("id")
    pub = load.get("pub")
    if not isinstance(mid, str) or not mid:
        raise BadRequest("malformed", "_auth without an id")
    if not isinstance(pub, str) or "BEGIN" not in pub:
        raise BadRequest("malformed", f"_auth from {mid!r} without a public key")
    nonce = load.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        raise BadRequest("malformed", "_auth nonce is not a string")
    token = load.get("token")
    try:
        token_b = codec.to_bytes(token) if token is not None else None
    except codec.DecodeError:
        raise BadRequest("malformed", "_auth token is not binary") from None
    grains = load.get("autosign_grains")
    return AuthRequest(
        minion_id=mid,
        pub=pub,
        nonce=nonce,
        enc_algo=str(load.get("enc_algo", crypto.DEFAULT_ENC_ALGO)),
        sig_algo=str(load.get("sig_algo", crypto.DEFAULT_SIG_ALGO)),
        token=token_b,
        autosign_grains=grains if isinstance(grains, dict) else None,
    )


class AuthRefused(BadRequest):
    """An ``_auth`` refused by the wire rules before any key decision, answered the way Salt
    answers it (not with ``"bad load"``): see :meth:`reply`.

    ``reason`` is ``invalid_id`` (the id breaks :mod:`hamaster.ids`' rule) or ``bad_algo`` (an
    ``enc_algo``/``sig_algo`` outside :data:`crypto.ENC_ALGOS` / :data:`crypto.SIG_ALGOS`).
    """

    def __init__(self, reason: str, detail: str, auth: AuthRequest, answer: str) -> None:
        super().__init__(reason, detail)
        self.auth = auth
        #: ``"status"`` (signed ``{"ret": False}``), or the text of an unsigned ``ret``
        #: (``"bad enc algo"``/``"bad sig algo"``), or :data:`EXC_HANDLING_REPLY` (bare string).
        self.answer = answer

    def reply(self, master_priv: rsa.RSAPrivateKey) -> bytes:
        """Salt 3008's reply frame to this request."""
        if self.answer == EXC_HANDLING_REPLY:
            return plain_reply(EXC_HANDLING_REPLY)
        if self.answer != "status":
            return auth_unsigned_reply(self.answer)
        return auth_status_reply(master_priv, False, self.auth.nonce, self.auth.sig_algo)


def parse_auth_request(req: ClearRequest) -> AuthRequest:
    """The wire checks of a clear request, all before any key decision: the command must be
    ``_auth`` (else :class:`BadRequest` ``unknown_clear_cmd``), the load's fields well typed
    (:func:`parse_auth_load`), then, in Salt's order, a valid minion id and supported
    algorithms (else :class:`AuthRefused`, whose :meth:`~AuthRefused.reply` is Salt's answer:
    a signed ``{"ret": False}`` for an invalid id, ``"bad enc algo"`` / ``"bad sig algo"``
    unsigned, or :data:`EXC_HANDLING_REPLY` for a bad ``enc_algo`` sent without a token).
    """
    cmd = req.load.get("cmd")
    if cmd != "_auth":
        raise BadRequest("unknown_clear_cmd", f"clear command {ids.shown(cmd)} is not served")
    auth = parse_auth_load(req.load)
    problem = ids.minion_id_problem(auth.minion_id)
    if problem is not None:
        # Salt signs this refusal with the request's sig_algo and answers "bad sig algo" when
        # it cannot (salt/master.py ``_clear_signed``).
        answer = "status" if auth.sig_algo in crypto.SIG_ALGOS else "bad sig algo"
        raise AuthRefused("invalid_id", f"minion id {problem}", auth, answer)
    if auth.enc_algo not in crypto.ENC_ALGOS:
        raise AuthRefused("bad_algo", f"unsupported enc_algo {ids.shown(auth.enc_algo)}", auth,
                          "bad enc algo" if auth.token is not None else EXC_HANDLING_REPLY)
    if auth.sig_algo not in crypto.SIG_ALGOS:
        raise AuthRefused("bad_algo", f"unsupported sig_algo {ids.shown(auth.sig_algo)}", auth,
                          "bad sig algo")
    return auth


def _signed_clear(master_priv: rsa.RSAPrivateKey, inner: dict, sig_algo: str) -> bytes:
    body = codec.dumps(inner)
    return codec.dumps({"enc": "clear", "load": body,
                        "sig": crypto.sign(master_priv, body, sig_algo)})


def auth_status_reply(
    master_priv: rsa.RSAPrivateKey, ret: bool, nonce: str | None,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO
) -> bytes:
    """Signed ``{"ret": True|False, "nonce"}``: True = pending, False = rejected/denied."""
    inner: dict[str, Any] = {"ret": ret}
    if nonce is not None:
        inner["nonce"] = nonce
    return _signed_clear(master_priv, inner, sig_algo)


def auth_unsigned_reply(ret: str) -> bytes:
    """Unsigned ``{"enc": "clear", "load": {"ret": ret}}`` (bad algorithm names)."""
    return codec.dumps({"enc": "clear", "load": {"ret": ret}})


def auth_accepted_reply(
    master_priv: rsa.RSAPrivateKey,
    master_pub_text: str,
    minion_pub: rsa.RSAPublicKey,
    *,
    aes_key: str,
    session_key: str,
    publish_port: int,
    nonce: str | None,
    token_plain: bytes | None,
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
    aes_sig: bytes | None = None,
    extra: dict | None = None,
) -> bytes:
    """The signed accepted reply: publish key, session key, X9.31 ``sig``, token round trip.

    ``aes_sig`` lets the caller reuse the X9.31 signature of the current publish key (it only
    changes when the key rotates), saving one private-key operation per auth.
    """
    inner: dict[str, Any] = {
        "enc": "pub",
        "pub_key": master_pub_text,
        "publish_port": publish_port,
    }
    if token_plain is not None:
        inner["token"] = crypto.oaep_encrypt(minion_pub, token_plain, enc_algo)
    inner["aes"] = crypto.oaep_encrypt(minion_pub, aes_key.encode(), enc_algo)
    inner["session"] = crypto.oaep_encrypt(minion_pub, session_key.encode(), enc_algo)
    inner["sig"] = aes_sig if aes_sig is not None else aes_key_signature(master_priv, aes_key)
    if nonce is not None:
        inner["nonce"] = nonce
    if extra:
        inner.update(extra)
    return _signed_clear(master_priv, inner, sig_algo)


def aes_key_signature(master_priv: rsa.RSAPrivateKey, aes_key: str) -> bytes:
    """X9.31 signature of ``sha256(aes_key).hexdigest()``, the accepted reply's ``sig``."""
    return crypto.x931_sign(master_priv, hashlib.sha256(aes_key.encode()).hexdigest().encode())


def pillar_reply(
    master_priv: rsa.RSAPrivateKey,
    minion_pub: rsa.RSAPublicKey,
    pillar: dict,
    nonce: str | None,
    *,
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
    pillar_key: str | None = None,
) -> bytes:
    """The private ``_pillar`` reply: a fresh key K to the minion, signed data under K."""
    key_str = pillar_key or generate_key_string()
    enc_key = crypto.oaep_encrypt(minion_pub, key_str.encode(), enc_algo)
    data = codec.dumps({"key": enc_key, "pillar": pillar, "nonce": nonce})
    sealed = Crypticle(key_str).dumps({"data": data,
                                       "sig": crypto.sign(master_priv, data, sig_algo)})
    return codec.dumps({"key": enc_key, "pillar": sealed})


def wrap_publication(
    pub_cipher: Crypticle, master_priv: rsa.RSAPrivateKey, inner: dict,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO
) -> bytes:
    """A publication frame: encrypted load, signed over the ciphertext."""
    load = pub_cipher.dumps(inner)
    return codec.dumps(
        {"enc": "aes", "load": load, "sig_algo": sig_algo,
         "sig": crypto.sign(master_priv, load, sig_algo)}
    )


# --------------------------------------------------------------------------------------------
# Minion side
# --------------------------------------------------------------------------------------------


def clear_request(load: dict, version: int = ENVELOPE_VERSION) -> bytes:
    """A clear request envelope (key order ``enc, load, version``)."""
    return codec.dumps({"enc": "clear", "load": load, "version": version})


def auth_request(
    minion_id: str,
    minion_pub_text: str,
    nonce: str,
    master_pub: rsa.RSAPublicKey | None,
    *,
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
    token_plain: bytes | None = None,
) -> tuple[bytes, bytes | None]:
    """Build an ``_auth`` request; returns ``(frame, token plaintext or None)``.

    A token is sent only when the master key is already known (pinned), as Salt does.
    """
    load: dict[str, Any] = {
        "cmd": "_auth",
        "id": minion_id,
        "nonce": nonce,
        "enc_algo": enc_algo,
        "sig_algo": sig_algo,
    }
    token = None
    if master_pub is not None:
        token = token_plain or generate_key_string().encode()
        load["token"] = crypto.oaep_encrypt(master_pub, token, enc_algo)
    load["pub"] = minion_pub_text
    return clear_request(load), token


@dataclass(frozen=True)
class AuthResult:
    """What a master's ``_auth`` reply said."""

    status: str  # "accepted" | "pending" | "rejected"
    aes_key: str | None = None
    session_key: str | None = None
    publish_port: int | None = None
    master_pub_text: str | None = None
    #: The publish key's serial at auth time (hamaster masters only): the replay floor.
    publish_serial: int | None = None


def parse_auth_reply(
    frame: bytes,
    *,
    minion_priv: rsa.RSAPrivateKey,
    nonce: str,
    token_plain: bytes | None,
    pinned_master_pub: str | None,
    master_finger: str = "",
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
) -> AuthResult:
    """Check a master's ``_auth`` reply the way a careful minion must.

    The signature must verify with the pinned master key (or, on first contact, with the key
    the reply carries, which must then match ``master_finger`` when set); the nonce must echo
    ours; ``pub_key`` must equal the pinned key; the X9.31 ``sig`` must cover the publish key;
    the token must round-trip. Raises :class:`AuthReplyError` otherwise.
    """
    try:
        env = _envelope(frame)
    except codec.DecodeError as exc:
        raise AuthReplyError(f"undecodable auth reply: {exc}") from None
    if isinstance(env, str):
        raise AuthReplyError(f"master answered {env!r}")
    if not isinstance(env, dict) or "load" not in env:
        raise AuthReplyError("auth reply is not an envelope")
    if "sig" not in env:
        load = env["load"]
        ret = load.get("ret") if isinstance(load, dict) else None
        raise AuthReplyError(f"unsigned auth reply: {ret!r}")
    try:
        body = codec.to_bytes(env["load"])
        sig = codec.to_bytes(env["sig"])
        inner = _envelope(body)
    except codec.DecodeError as exc:
        raise AuthReplyError(f"undecodable signed auth load: {exc}") from None
    if not isinstance(inner, dict):
        raise AuthReplyError("signed auth load is not a map")
    offered = inner.get("pub_key")
    if pinned_master_pub is not None:
        verify_text = pinned_master_pub
    elif isinstance(offered, str):
        verify_text = offered
    elif "ret" in inner and "aes" not in inner:
        # First contact and not accepted: there is no key to check the signature with yet,
        # and a pending/rejected status grants nothing, so it is taken at face value.
        if inner.get("nonce") != nonce:
            raise AuthReplyError("auth reply nonce does not match ours (replayed reply?)")
        return AuthResult(status="pending" if inner["ret"] is True else "rejected")
    else:
        raise AuthReplyError("no master key to verify the auth reply with")
    if master_finger and crypto.pem_fingerprint(verify_text) != master_finger.lower():
        raise AuthReplyError("master key fingerprint does not match master_finger")
    try:
        master_pub = crypto.load_public_key(verify_text)
    except crypto.CryptoError as exc:
        raise AuthReplyError(f"master key unusable: {exc}") from None
    if not crypto.verify(master_pub, body, sig, sig_algo):
        if pinned_master_pub is not None:
            raise MasterKeyMismatch(
                "auth reply signature does not verify with the pinned master key "
                f"({crypto.pem_fingerprint(pinned_master_pub)}): this master's key is not the one "
                "this minion trusts"
            )
        raise AuthReplyError("auth reply signature does not verify with the master key")
    if inner.get("nonce") != nonce:
        raise AuthReplyError("auth reply nonce does not match ours (replayed reply?)")
    if "ret" in inner and "aes" not in inner:
        return AuthResult(status="pending" if inner["ret"] is True else "rejected")
    if pinned_master_pub is not None and (
        not isinstance(offered, str)
        or crypto.normalize_pem(offered) != crypto.normalize_pem(pinned_master_pub)
    ):
        raise MasterKeyMismatch("master presented a key that differs from the pinned master key")
    try:
        aes_key = crypto.oaep_decrypt(minion_priv, codec.to_bytes(inner["aes"]), enc_algo).decode()
        session_key = crypto.oaep_decrypt(minion_priv, codec.to_bytes(inner["session"]),
                                          enc_algo).decode()
    except (KeyError, crypto.CryptoError, codec.DecodeError, UnicodeDecodeError) as exc:
        raise AuthReplyError(f"cannot decrypt the keys in the auth reply: {exc}") from None
    aes_key = aes_key.split("_|-", 1)[0]
    try:
        x931 = crypto.x931_recover(master_pub, codec.to_bytes(inner.get("sig", b"")))
    except codec.DecodeError:
        x931 = None
    if x931 != hashlib.sha256(aes_key.encode()).hexdigest().encode():
        raise AuthReplyError("publish key signature (X9.31 sig) does not verify")
    if token_plain is not None:
        try:
            echoed = crypto.oaep_decrypt(minion_priv, codec.to_bytes(inner["token"]), enc_algo)
        except (KeyError, crypto.CryptoError, codec.DecodeError) as exc:
            raise AuthReplyError(f"token round trip failed: {exc}") from None
        if echoed != token_plain:
            raise AuthReplyError("token round trip failed: master did not prove its key")
    port = inner.get("publish_port")
    serial = inner.get(PUBLISH_SERIAL_FIELD)
    return AuthResult(
        status="accepted",
        aes_key=aes_key,
        session_key=session_key,
        publish_port=port if isinstance(port, int) else None,
        master_pub_text=crypto.normalize_pem(verify_text),
        publish_serial=serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
    )


def aes_request(
    minion_id: str,
    session: Crypticle,
    load: dict,
    *,
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
    version: int = ENVELOPE_VERSION,
) -> bytes:
    """An aes request envelope (key order ``enc, load, version, id, enc_algo, sig_algo``)."""
    return codec.dumps(
        {
            "enc": "aes",
            "load": session.dumps(load),
            "version": version,
            "id": minion_id,
            "enc_algo": enc_algo,
            "sig_algo": sig_algo,
        }
    )


def stamp_load(load: dict, minion_id: str, tok: bytes, nonce: str,
               now: float | None = None) -> dict:
    """Add the fields every v3 aes request carries: ``nonce``, ``ts``, ``tok`` (and ``id``)."""
    load.setdefault("id", minion_id)
    load["nonce"] = nonce
    load["ts"] = int(now if now is not None else time.time())
    load["tok"] = tok
    return load


def parse_aes_reply(frame: bytes, session: Crypticle, nonce: str) -> Any:
    """Decrypt a master's reply to an aes request; raises :class:`BadLoadReply` on
    ``"bad load"``."""
    try:
        obj = _envelope(frame)
    except codec.DecodeError as exc:
        raise BadLoadReply(f"undecodable reply: {exc}") from None
    if isinstance(obj, str):
        # A bare string such as "bad load" (ciphertext is never valid UTF-8 in practice).
        raise BadLoadReply(obj)
    if not isinstance(obj, bytes):
        raise BadLoadReply(f"unexpected {type(obj).__name__} reply")
    try:
        return session.loads(obj, nonce=nonce)
    except CrypticleError as exc:
        raise BadLoadReply(str(exc)) from None


def parse_pillar_reply(
    frame: bytes,
    *,
    minion_priv: rsa.RSAPrivateKey,
    master_pub: rsa.RSAPublicKey,
    nonce: str,
    enc_algo: str = crypto.DEFAULT_ENC_ALGO,
    sig_algo: str = crypto.DEFAULT_SIG_ALGO,
) -> dict:
    """Open a private ``_pillar`` reply; checks the signature and that our nonce is inside."""
    try:
        env = _envelope(frame)
    except codec.DecodeError as exc:
        raise AuthReplyError(f"undecodable pillar reply: {exc}") from None
    if isinstance(env, str):
        raise BadLoadReply(env)
    if not isinstance(env, dict) or "key" not in env or "pillar" not in env:
        raise AuthReplyError("pillar reply is not {key, pillar}")
    try:
        outer_key = codec.to_bytes(env["key"])
        key_str = crypto.oaep_decrypt(minion_priv, outer_key, enc_algo).decode()
        sealed = Crypticle(key_str).loads(codec.to_bytes(env["pillar"]))
    except (crypto.CryptoError, CrypticleError, codec.DecodeError, UnicodeDecodeError) as exc:
        raise AuthReplyError(f"cannot open pillar reply: {exc}") from None
    if not isinstance(sealed, dict) or "data" not in sealed or "sig" not in sealed:
        raise AuthReplyError("pillar payload lacks data/sig")
    try:
        data = codec.to_bytes(sealed["data"])
        pillar_sig = codec.to_bytes(sealed["sig"])
    except codec.DecodeError as exc:
        raise AuthReplyError(f"pillar payload malformed: {exc}") from None
    if not crypto.verify(master_pub, data, pillar_sig, sig_algo):
        raise AuthReplyError("pillar signature does not verify with the master key")
    inner = codec.loads(data)
    if not isinstance(inner, dict) or inner.get("nonce") != nonce:
        raise AuthReplyError("pillar nonce does not match our request")
    if codec.to_bytes(inner.get("key", b"")) != outer_key:
        raise AuthReplyError("pillar key binding mismatch")
    pillar = inner.get("pillar")
    return pillar if isinstance(pillar, dict) else {}


class PublicationError(ValueError):
    """A publication we must not act on (bad signature, undecryptable, malformed)."""


def open_publication(frame: bytes, pub_cipher: Crypticle, master_pub: rsa.RSAPublicKey) -> dict:
    """Verify the master's signature over the ciphertext, then decrypt the publication.

    Raises :class:`CrypticleError` when the load does not decrypt with our publish key (the
    caller re-authenticates once: the master may have rotated it) and
    :class:`PublicationError` for everything else.
    """
    try:
        env = _envelope(frame)
    except codec.DecodeError as exc:
        raise PublicationError(str(exc)) from None
    if not isinstance(env, dict) or env.get("enc") != "aes" or "load" not in env:
        raise PublicationError("not an aes publication")
    if "sig" not in env:
        raise PublicationError("unsigned publication")
    try:
        load = codec.to_bytes(env["load"])
        sig = codec.to_bytes(env["sig"])
    except codec.DecodeError as exc:
        raise PublicationError(str(exc)) from None
    if not crypto.verify(master_pub, load, sig, str(env.get("sig_algo", crypto.DEFAULT_SIG_ALGO))):
        raise PublicationError("publication signature does not verify with the master key")
    inner = pub_cipher.loads(load)
    if not isinstance(inner, dict):
        raise PublicationError("publication load is not a map")
    for field in ("tgt", "jid", "fun", "arg"):
        if field not in inner:
            raise PublicationError(f"publication lacks {field!r}")
    return inner
