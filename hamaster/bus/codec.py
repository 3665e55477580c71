"""Salt's msgpack serialisation: what goes on the wire and how it comes back.

Encoding uses the old raw type for both str and bytes (``use_bin_type=False``), exactly as Salt
does, so re-encoding a decoded frame gives the same bytes. Decoding reads raw strings and turns
every value that is valid UTF-8 back into ``str``; ciphertext and signatures stay ``bytes``.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame we decode (bytes); anything bigger is refused before parsing."""


class DecodeError(ValueError):
    """A frame that is not valid msgpack, or too large."""


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` the way Salt does (raw str type, no bin type)."""
    return msgpack.packb(obj, use_bin_type=False, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _decode_tree(obj: Any) -> Any:
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj
    if isinstance(obj, list):
        return [_decode_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {_decode_tree(k): _decode_tree(v) for k, v in obj.items()}
    return obj


def loads(data: bytes, *, max_size: int = MAX_FRAME) -> Any:
    """Deserialise a Salt frame; raises :class:`DecodeError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"frame of {len(data)} bytes exceeds the {max_size} byte limit")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=True,
            strict_map_key=False,
            use_list=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"malformed msgpack: {exc.__class__.__name__}: {exc}") from None
    try:
        return _decode_tree(obj)
    except TypeError as exc:  # e.g. an unhashable map key after decoding
        raise DecodeError(f"malformed msgpack: {exc}") from None
    except RecursionError:  # msgpack allows ~1000 levels; _decode_tree recurses per level
        raise DecodeError("malformed msgpack: nested too deeply") from None


def to_bytes(value: Any) -> bytes:
    """Normalise a binary field that may have been decoded to ``str`` back to bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise DecodeError(f"expected a binary field, got {type(value).__name__}")
