"""A scripted minion built from the sans-io wire code, for tests that need to hold raw keys.

It authenticates like a real minion, keeps the publish key it was given, and reads raw
publications, so a test can prove what a removed minion can and cannot decrypt.
"""

from __future__ import annotations

import time

import zmq

from hamaster import crypto
from hamaster.bus import messages
from hamaster.bus.crypticle import Crypticle


class SpyMinion:
    """A minimal synchronous minion speaking protocol v3."""

    def __init__(self, host: str, ret_port: int, minion_id: str, keysize: int = 2048) -> None:
        self.host = host
        self.ret_port = ret_port
        self.minion_id = minion_id
        priv, pub = crypto.generate_keypair(keysize)
        self.priv = crypto.load_private_key(priv)
        self.pub_text = crypto.normalize_pem(pub)
        self.tok = crypto.x931_sign(self.priv, b"salt")
        self.ctx = zmq.Context()
        self.result: messages.AuthResult | None = None
        self.master_pub_text: str | None = None
        self.sub: zmq.Socket | None = None

    def roundtrip(self, frame: bytes, timeout: float = 5.0) -> bytes:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        sock.connect(f"tcp://{self.host}:{self.ret_port}")
        try:
            sock.send(frame)
            return sock.recv()
        finally:
            sock.close(0)

    def auth(self) -> messages.AuthResult:
        nonce = messages.new_nonce()
        pinned = crypto.load_public_key(self.master_pub_text) if self.master_pub_text else None
        frame, token = messages.auth_request(self.minion_id, self.pub_text, nonce, pinned)
        reply = self.roundtrip(frame)
        res = messages.parse_auth_reply(
            reply, minion_priv=self.priv, nonce=nonce, token_plain=token,
            pinned_master_pub=self.master_pub_text
        )
        if res.status == "accepted":
            self.result = res
            self.master_pub_text = res.master_pub_text
        return res

    def request(self, load: dict) -> object:
        assert self.result is not None and self.result.session_key
        session = Crypticle(self.result.session_key)
        nonce = messages.new_nonce()
        body = messages.stamp_load(dict(load), self.minion_id, self.tok, nonce)
        reply = self.roundtrip(messages.aes_request(self.minion_id, session, body))
        return messages.parse_aes_reply(reply, session, nonce)

    def subscribe(self, pub_port: int) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"tcp://{self.host}:{pub_port}")

    def next_publication(self, timeout: float = 10.0) -> bytes | None:
        assert self.sub is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sub.poll(100):
                return self.sub.recv_multipart()[-1]
        return None

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close(0)
        self.ctx.term()
