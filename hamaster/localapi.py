"""The local CLI channel: length-prefixed msgpack frames over a Unix socket in ``sock_dir``.

Access is guarded by file permissions (the socket is 0600 in a 0700 directory), never by a
shared secret. This module holds the framing and a small blocking client used by the CLIs; it
imports nothing heavy so ``hamaster`` starts fast.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

SOCKET_NAME = "master.sock"
MAX_LOCAL_FRAME = 256 * 1024 * 1024
_HDR = struct.Struct(">I")


class LocalApiError(Exception):
    """The local master cannot be reached or answered with an error."""


def socket_path(sock_dir: str) -> str:
    """Path of the master's CLI socket inside ``sock_dir``."""
    return os.path.join(sock_dir, SOCKET_NAME)


def pack(obj: Any) -> bytes:
    """One frame: 4-byte big-endian length + msgpack body."""
    body = msgpack.packb(obj, use_bin_type=True, default=str)
    return _HDR.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """Decode a frame body."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


class LocalClient:
    """Blocking client for the master's CLI socket."""

    def __init__(self, sock_dir: str, timeout: float | None = None) -> None:
        self.path = socket_path(sock_dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except FileNotFoundError:
            self.sock.close()
            raise LocalApiError(
                f"no master socket at {self.path}: is hamaster-master running with this config?"
            ) from None
        except PermissionError:
            self.sock.close()
            raise LocalApiError(f"permission denied on {self.path}: "
                                "run as the master's user") from None
        except OSError as exc:
            self.sock.close()
            raise LocalApiError(f"cannot connect to {self.path}: {exc}") from None
        self._buf = b""

    def send(self, obj: Any) -> None:
        """Send one request frame."""
        self.sock.sendall(pack(obj))

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise LocalApiError("master closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> Any:
        """Receive one frame."""
        (size,) = _HDR.unpack(self._read_exact(4))
        if size > MAX_LOCAL_FRAME:
            raise LocalApiError("oversized frame from master")
        return unpack_body(self._read_exact(size))

    def poll(self, timeout: float) -> bool:
        """Whether a frame (or part of one) can be read within ``timeout`` seconds."""
        if self._buf:
            return True
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        return bool(readable)

    def stream(self) -> Iterator[Any]:
        """Yield frames until the master closes the stream (a frame with ``"done"``)."""
        while True:
            msg = self.recv()
            yield msg
            if isinstance(msg, dict) and msg.get("done"):
                return

    def call(self, obj: Any) -> Any:
        """Send one request and return its single reply."""
        self.send(obj)
        reply = self.recv()
        if isinstance(reply, dict) and reply.get("error"):
            raise LocalApiError(str(reply["error"]))
        return reply

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
