"""Fuzz the master's request path for a few seconds: whatever the bytes, ``handle`` never raises
and always answers with a frame (or a Deferred that gives one).

Hypothesis drives arbitrary bytes, hostile but well-formed msgpack envelopes, and hostile loads
encrypted with a real session key (so the code after the HMAC check is reached too); a short
coverage-guided mutation run starts from valid frames. ``bench/bench_fuzz.py`` runs the same
targets for longer and prints figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hamaster.bus import codec, messages
from tests.unit.request_fuzz import MINION_ID, Rig, check, fuzz, make_rig

FAST = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (st.none() | st.booleans() | ints
           | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=80))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=10) | ints, inner, max_size=6),
                      max_leaves=30)
FIELDS = ["cmd", "id", "jid", "nonce", "ts", "tok", "return", "fun", "fun_args", "path", "saltenv",
          "grains", "pillar_override", "tag", "data", "pub", "token", "enc_algo", "sig_algo"]
CMDS = ["_return", "_minion_event", "_hamaster_ping", "_file_envs", "_serve_file", "_boom",
        "_pillar", "_auth", "publish", "_no_such"]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = make_rig()
    try:
        yield r
    finally:
        r.close()


@FAST
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(rig: Rig, data: bytes) -> None:
    check(rig, data)


@FAST
@given(env=st.fixed_dictionaries(
    {"enc": st.sampled_from(["aes", "clear", "pub", ""]) | values, "load": values},
    optional={"version": st.sampled_from([3, 2, 4, "3", True, None]) | values,
              "id": st.sampled_from([MINION_ID, "", "x" * 300]) | values,
              "enc_algo": values, "sig_algo": values}))
def test_hostile_envelopes(rig: Rig, env: dict) -> None:
    check(rig, msgpack.packb(env, use_bin_type=False))
    check(rig, msgpack.packb(env, use_bin_type=True), allow_defer=False)


@FAST
@given(load=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8),
       cmd=st.sampled_from(CMDS) | values, stamp=st.booleans(), good_tok=st.booleans())
def test_hostile_clear_loads(rig: Rig, load: dict, cmd: object,
                             stamp: bool, good_tok: bool) -> None:
    load["cmd"] = cmd
    if stamp:
        load.setdefault("id", MINION_ID)
        load.setdefault("pub", rig.minion_pub_text)
    check(rig, messages.clear_request(load))


@FAST
@given(load=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8),
       cmd=st.sampled_from(CMDS) | values, stamp=st.booleans(), good_tok=st.booleans())
def test_hostile_loads_under_a_real_session(rig: Rig, load: dict, cmd: object, stamp: bool,
                                            good_tok: bool) -> None:
    load["cmd"] = cmd
    if stamp:
        load.update({"id": MINION_ID, "nonce": messages.new_nonce(), "ts": int(time.time())})
    if good_tok:
        load["tok"] = rig.tok
    frame = codec.dumps({"enc": "aes", "load": rig.session.dumps(load),
                         "version": 3, "id": MINION_ID})
    check(rig, frame)


def test_coverage_guided_mutation(rig: Rig) -> None:
    report = fuzz(rig, seconds=1.5, seed=18)
    assert report.execs > 50
    assert report.kinds.get("refused", 0) > 0
    assert report.lines > 100  # the run reaches the codec, the envelope checks and the handler


@FAST
@given(obj=values, bin_type=st.booleans())
def test_shape_walk_agrees_with_msgpack(obj: object, bin_type: bool) -> None:
    """``check_shape`` accepts what msgpack produces, ``map_spans`` slices a map into exactly
    the entries msgpack decodes, and a truncated frame is always refused."""
    data = msgpack.packb(obj, use_bin_type=bin_type)
    codec.check_shape(data, max_objects=10**6, max_depth=64)
    spans = codec.map_spans(data, max_objects=10**6, max_depth=64)
    if isinstance(obj, dict):
        assert spans is not None
        decoded = msgpack.unpackb(data, raw=True, strict_map_key=False)
        got = [(msgpack.unpackb(data[ks:ke], raw=True, strict_map_key=False),
                msgpack.unpackb(data[vs:ve], raw=True, strict_map_key=False))
               for (ks, ke), (vs, ve) in spans]
        assert repr(dict(got)) == repr(decoded)  # repr: NaN is not equal to itself
        for (_, _), span in spans:
            view = codec.raw_span(data, span)
            value = msgpack.unpackb(data[span[0]:span[1]], raw=True, strict_map_key=False)
            assert (view is not None) == isinstance(value, bytes)
            if view is not None:
                assert bytes(view) == value
    else:
        assert spans is None
    if len(data) > 1:
        with pytest.raises(codec.DecodeError):
            codec.check_shape(data[:-1], max_objects=10**6, max_depth=64)
