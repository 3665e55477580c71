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

ENVELOPE_MAX_OBJECTS = 4096
"""Most msgpack objects an unauthenticated envelope may hold (a real one holds about 20)."""
ENVELOPE_MAX_DEPTH = 32
"""Deepest container nesting an unauthenticated envelope may have (a real one: about 4)."""


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


# Bytes that follow a msgpack type byte before its payload length is known: (length-field
# size, extra fixed bytes) for str/bin/ext, and the fixed size of every scalar.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
          0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _walk(mv: bytes, pos: int, max_objects: int, max_depth: int) -> tuple[int, int]:
    """Walk one msgpack object starting at ``pos``; return (its end, objects it holds)."""
    end = len(mv)
    objects = 0
    stack: list[int] = []  # objects still expected by each open container
    expected = 1
    while True:
        if expected == 0:
            if not stack:
                break
            expected = stack.pop()
            continue
        expected -= 1
        objects += 1
        if objects > max_objects:
            raise DecodeError(f"malformed msgpack: more than {max_objects} objects")
        if pos >= end:
            raise DecodeError("malformed msgpack: truncated frame")
        b = mv[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0:
            continue
        if b <= 0x8F or 0x90 <= b <= 0x9F:
            n = (b & 0x0F) * (2 if b <= 0x8F else 1)
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
            continue
        elif b in _FIXED:
            pos += _FIXED[b]
            continue
        elif b in _SIZED:
            size, extra = _SIZED[b]
            if pos + size > end:
                raise DecodeError("malformed msgpack: truncated frame")
            pos += size + extra + int.from_bytes(mv[pos:pos + size], "big")
            continue
        elif b in _CONTAINERS:
            size, per = _CONTAINERS[b]
            if pos + size > end:
                raise DecodeError("malformed msgpack: truncated frame")
            n = int.from_bytes(mv[pos:pos + size], "big") * per
            pos += size
        else:
            raise DecodeError(f"malformed msgpack: reserved type byte 0x{b:02x}")
        if n > max_objects:
            raise DecodeError(f"malformed msgpack: a container of more than {max_objects} objects")
        if n:
            if len(stack) >= max_depth:
                raise DecodeError(f"malformed msgpack: nested deeper than {max_depth}")
            stack.append(expected)
            expected = n
    if pos > end:
        raise DecodeError("malformed msgpack: a length past the end of the frame")
    return pos, objects


def check_shape(data: bytes, max_objects: int = ENVELOPE_MAX_OBJECTS,
                max_depth: int = ENVELOPE_MAX_DEPTH) -> None:
    """Walk a msgpack frame's structure without building any object; raise :class:`DecodeError`
    when it holds more than ``max_objects`` objects, nests deeper than ``max_depth``, declares
    lengths beyond its end, or is not exactly one object.

    Strings and binaries are skipped by their declared length, so the cost is bounded by
    ``max_objects`` whatever the frame's size (about 1 µs per object): an 8 MiB frame of nested
    empty arrays is refused after ``max_depth`` bytes instead of becoming millions of lists.
    """
    mv = bytes(data) if not isinstance(data, bytes) else data
    pos, _ = _walk(mv, 0, max_objects, max_depth)
    if pos != len(mv):
        raise DecodeError("malformed msgpack: bytes after the object")


Span = tuple[int, int]


def map_spans(data: bytes, max_objects: int = ENVELOPE_MAX_OBJECTS,
              max_depth: int = ENVELOPE_MAX_DEPTH) -> list[tuple[Span, Span]] | None:
    """The (key, value) byte spans of a frame that is one msgpack map, after the same checks as
    :func:`check_shape`; None when the frame is one msgpack object but not a map.

    Nothing is decoded: the caller decodes the few small fields it needs and can hand a large
    string or binary value (a request's ciphertext) on as a slice, without copying it.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    end = len(data)
    if not end:
        raise DecodeError("malformed msgpack: empty frame")
    b = data[0]
    if 0x80 <= b <= 0x8F:
        n, pos = b & 0x0F, 1
    elif b in (0xDE, 0xDF):
        size = 2 if b == 0xDE else 4
        if 1 + size > end:
            raise DecodeError("malformed msgpack: truncated frame")
        n, pos = int.from_bytes(data[1:1 + size], "big"), 1 + size
    else:
        check_shape(data, max_objects, max_depth)
        return None
    if 2 * n > max_objects:
        raise DecodeError(f"malformed msgpack: a container of more than {max_objects} objects")
    budget = max_objects - 1
    spans: list[tuple[Span, Span]] = []
    for _ in range(n):
        pair = []
        for _ in range(2):
            start = pos
            pos, used = _walk(data, pos, budget, max_depth - 1)
            budget -= used
            pair.append((start, pos))
        spans.append((pair[0], pair[1]))
    if pos != end:
        raise DecodeError("malformed msgpack: bytes after the object")
    return spans


def raw_span(data: bytes, span: Span) -> memoryview | None:
    """The payload of the str/bin object at ``span`` as a zero-copy view (None if not one)."""
    start, end = span
    b = data[start]
    if 0xA0 <= b <= 0xBF:
        head = 1
    elif b in (0xC4, 0xD9):
        head = 2
    elif b in (0xC5, 0xDA):
        head = 3
    elif b in (0xC6, 0xDB):
        head = 5
    else:
        return None
    return memoryview(data)[start + head:end]


def loads(data: bytes, *, max_size: int = MAX_FRAME, max_objects: int | None = None,
          max_depth: int = ENVELOPE_MAX_DEPTH) -> Any:
    """Deserialise a Salt frame; raises :class:`DecodeError` on anything malformed.

    With ``max_objects`` (unauthenticated input: request envelopes, replies, publications) the
    frame's shape is checked first with :func:`check_shape`, so hostile nesting costs
    microseconds and no memory.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"frame of {len(data)} bytes exceeds the {max_size} byte limit")
    if max_objects is not None:
        check_shape(data, max_objects, max_depth)
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
