"""TCP keepalive on the ZeroMQ sockets of masters and minions (Salt's ``tcp_keepalive*``)."""

from __future__ import annotations

import zmq

from hamaster.keepalive import apply_tcp_keepalive


def _applied(opts: dict) -> tuple[int, int, int, int]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        apply_tcp_keepalive(sock, opts)
        return (sock.getsockopt(zmq.TCP_KEEPALIVE), sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE),
                sock.getsockopt(zmq.TCP_KEEPALIVE_CNT), sock.getsockopt(zmq.TCP_KEEPALIVE_INTVL))
    finally:
        sock.close(0)
        ctx.term()


def test_defaults_are_salts() -> None:
    # on, first probe after 300 s of silence, count and interval left to the system (-1)
    assert _applied({}) == (1, 300, -1, -1)


def test_options_are_honoured_and_off_means_off() -> None:
    assert _applied({"tcp_keepalive_idle": 60, "tcp_keepalive_cnt": 4,
                     "tcp_keepalive_intvl": 10}) == (1, 60, 4, 10)
    assert _applied({"tcp_keepalive": False})[0] == 0
