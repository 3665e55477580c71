"""Fuzzing support for the master's request path (the sans-io layer): a real
:class:`~hamaster.master.reqhandler.RequestHandler` over a real key registry on a temporary
``FsStore``, with an accepted minion that holds a real session, plus seed frames, a mutator and
a coverage-guided loop.

Used by ``tests/unit/test_request_fuzz.py`` (a few seconds, in the unit suite) and
``bench/bench_fuzz.py`` (as long as asked, with figures). The property every input must keep:
:meth:`RequestHandler.handle` never raises and always gives a reply frame (bytes Salt's minion can
decode) or a :class:`Deferred` that gives one.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle
from hamaster.master.pubkey import PublishKey
from hamaster.master.reqhandler import Deferred, RequestHandler
from hamaster.metrics import MasterMetrics
from hamaster.pki_sync.keys import KeyRegistry, KeyState, NewKeyThrottle
from hamaster.store.fs import FsStore

MINION_ID = "fz1"
_KEYS: dict[str, tuple[bytes, bytes]] = {}


def _keypair(name: str) -> tuple[bytes, bytes]:
    if name not in _KEYS:
        _KEYS[name] = crypto.generate_keypair(2048)
    return _KEYS[name]


def _boom(load: dict) -> Any:
    raise RuntimeError("a command that fails")


@dataclass
class Rig:
    """A handler, an accepted minion with a live session, and valid frames to start from."""

    handler: RequestHandler
    session: Crypticle
    tok: bytes
    minion_priv: Any
    minion_pub_text: str
    master_pub: Any
    tmp: tempfile.TemporaryDirectory
    seeds: list[bytes] = field(default_factory=list)

    def close(self) -> None:
        """Stop the store and remove the temporary directory."""
        self.handler.keys.store.close()
        self.tmp.cleanup()

    def aes_frame(self, load: dict, *, tok: bytes | None = None, mid: str = MINION_ID,
                  now: float | None = None) -> bytes:
        """An aes request from the accepted minion (``load`` stamped with nonce, ts, tok)."""
        body = messages.stamp_load(dict(load), mid, self.tok if tok is None else tok,
                                   messages.new_nonce(), now=now)
        return messages.aes_request(mid, self.session, body)

    def auth_frame(self, mid: str = MINION_ID, pub: str | None = None, token: bool = True) -> bytes:
        """An ``_auth`` request (the accepted key by default)."""
        frame, _ = messages.auth_request(mid, pub or self.minion_pub_text, messages.new_nonce(),
                                         self.master_pub if token else None)
        return frame


def make_rig() -> Rig:
    """Build the handler on a fresh temporary store and authenticate :data:`MINION_ID`."""
    tmp = tempfile.TemporaryDirectory(prefix="hm-fuzz-")
    store = FsStore(os.path.join(tmp.name, "pki"), poll_interval=3600)
    keys = KeyRegistry(store, "", throttle=NewKeyThrottle(0, 20))
    keys.load()
    m_priv_pem, m_pub_pem = _keypair("master")
    n_priv_pem, n_pub_pem = _keypair("minion")
    minion_pub_text = crypto.normalize_pem(n_pub_pem)
    store.put(f"{KeyState.ACCEPTED.value}/{MINION_ID}", (minion_pub_text + "\n").encode())
    keys.load()
    master_priv = crypto.load_private_key(m_priv_pem)
    commands: dict[str, Callable[[dict], Any]] = {
        "_return": lambda load: None,
        "_minion_event": lambda load: None,
        "_hamaster_ping": lambda load: {"master_id": "fuzz"},
        "_file_envs": lambda load: ["base"],
        "_serve_file": lambda load: {"data": "", "dest": load.get("path")},
        "_boom": _boom,
    }
    handler = RequestHandler(
        {"publish_port": 4505}, keys, master_priv, crypto.normalize_pem(m_pub_pem),
        PublishKey(master_priv), MasterMetrics("fuzz"), commands,
    )
    handler.store_commands = frozenset({"_serve_file"})
    minion_priv = crypto.load_private_key(n_priv_pem)
    master_pub = crypto.load_public_key(m_pub_pem.decode())
    nonce = messages.new_nonce()
    frame, token = messages.auth_request(MINION_ID, minion_pub_text, nonce, master_pub)
    result = messages.parse_auth_reply(
        resolve(handler.handle(frame)), minion_priv=minion_priv, nonce=nonce, token_plain=token,
        pinned_master_pub=crypto.normalize_pem(m_pub_pem))
    assert result.status == "accepted" and result.session_key
    rig = Rig(handler, Crypticle(result.session_key), crypto.x931_sign(minion_priv, b"salt"),
              minion_priv, minion_pub_text, master_pub, tmp)
    rig.seeds = list(seed_frames(rig))
    return rig


def seed_frames(rig: Rig) -> Iterable[bytes]:
    """Valid and nearly valid frames of every kind the handler serves."""
    yield rig.auth_frame()
    yield rig.auth_frame(token=False)
    yield rig.auth_frame(mid="fz-new")
    yield rig.auth_frame(pub=crypto.normalize_pem(_keypair("master")[1]))  # a foreign key
    for cmd in ("_return", "_minion_event", "_hamaster_ping", "_file_envs", "_serve_file", "_boom",
                "_pillar", "_no_such"):
        yield rig.aes_frame({"cmd": cmd, "jid": "20261206120000000000", "return": {"a": [1, 2]},
                             "path": "top.sls", "saltenv": "base", "grains": {"os": "x"}})
    yield rig.aes_frame({"cmd": "_return"}, now=1)  # outside the time window
    yield rig.aes_frame({"cmd": "_return"}, tok=b"x" * 256)
    yield rig.aes_frame({"cmd": "_return"}, mid="fz-unknown")
    yield messages.clear_request({"cmd": "publish", "fun": "test.ping"})
    yield codec.dumps({"enc": "aes", "load": b"\x00" * 64, "version": 3, "id": MINION_ID})


def resolve(reply: bytes | Deferred) -> bytes:
    """Run a Deferred the way the daemon does (work, then ``finish``) down to the reply bytes."""
    while isinstance(reply, Deferred):
        out = reply.run()
        reply = reply.finish(out) if reply.finish is not None else out
    return reply


def check(rig: Rig, frame: Any, allow_defer: bool = True) -> str:
    """Feed one frame; assert the property and return a label for the kind of reply."""
    reply = resolve(rig.handler.handle(frame, peer="fuzz", allow_defer=allow_defer))
    assert isinstance(reply, bytes), type(reply)
    obj = codec.loads(reply)
    if obj == messages.BAD_LOAD:
        return "refused"
    if isinstance(obj, str):
        return "text"
    if isinstance(obj, bytes):
        return "aes"
    if isinstance(obj, dict) and "sig" in obj:
        return "signed"
    return "other"


# --------------------------------------------------------------------------------------------
# Mutation and the coverage-guided loop
# --------------------------------------------------------------------------------------------

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xc0", b"\xc1", b"\xdc\xff\xff",
                b"\xdd\x7f\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                b"\x91" * 40, b"\x90", b"\xa3aes", b"\xa5clear", b"\xa7version"]


def mutate(data: bytes, rnd: random.Random, corpus: list[bytes]) -> bytes:
    """One to four random byte-level edits (flip, insert, delete, splice, msgpack tokens)."""
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(7)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        elif op == 2:
            buf[pos:pos] = rnd.choice(_INTERESTING)
        elif op == 3 and buf:
            del buf[pos:pos + rnd.randint(1, 16)]
        elif op == 4:
            other = rnd.choice(corpus)
            j = rnd.randrange(len(other) + 1)
            buf[pos:] = other[j:]
        elif op == 5:
            buf = buf[:pos]
        else:
            buf[pos:pos] = os.urandom(rnd.randint(1, 8))
    return bytes(buf)


class CoverageTracer:
    """Line coverage of the code under test (``hamaster/bus`` and the request handler)."""

    def __init__(self) -> None:
        import hamaster.bus
        import hamaster.master.reqhandler as rh

        self.prefixes = (os.path.dirname(hamaster.bus.__file__), rh.__file__)
        self.seen: set[tuple[str, int]] = set()
        self._new = 0

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        path = frame.f_code.co_filename
        if not path.startswith(self.prefixes):
            return None
        if event == "line":
            key = (path, frame.f_lineno)
            if key not in self.seen:
                self.seen.add(key)
                self._new += 1
        return self._trace

    def run(self, fn: Callable[[], Any]) -> int:
        """Call ``fn`` under the tracer; return how many new lines it reached."""
        self._new = 0
        sys.settrace(self._trace)
        try:
            fn()
        finally:
            sys.settrace(None)
        return self._new


@dataclass
class FuzzReport:
    """What a fuzzing run did."""

    execs: int = 0
    seconds: float = 0.0
    corpus: int = 0
    lines: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    slowest_s: float = 0.0


def fuzz(rig: Rig, seconds: float, seed: int = 0, guided: bool = True) -> FuzzReport:
    """Mutate the seeds for ``seconds``; inputs reaching new lines join the corpus (when
    ``guided``). Raises AssertionError (with the input) if the property is ever broken."""
    rnd = random.Random(seed)
    corpus = list(rig.seeds)
    tracer = CoverageTracer()
    report = FuzzReport()
    for frame in corpus:
        tracer.run(lambda f=frame: check(rig, f))
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        data = mutate(rnd.choice(corpus), rnd, corpus)
        t0 = time.perf_counter()
        kind: list[str] = []
        try:
            if guided:
                new = tracer.run(lambda k=kind, d=data: k.append(check(rig, d)))
            else:
                new = 0
                kind.append(check(rig, data))
        except Exception as exc:
            raise AssertionError(f"handler broke on {data!r}: {exc!r}") from exc
        report.slowest_s = max(report.slowest_s, time.perf_counter() - t0)
        report.execs += 1
        report.kinds[kind[0]] = report.kinds.get(kind[0], 0) + 1
        if new:
            corpus.append(data)
    report.seconds = time.monotonic() - start
    report.corpus = len(corpus)
    report.lines = len(tracer.seen)
    return report
