"""The wire: Salt's ZeroMQ request protocol v3, as sans-io code over bytes.

- :mod:`.codec` — Salt's msgpack serialisation;
- :mod:`.crypticle` — the session cipher (AES-192-CBC + HMAC-SHA256, nonce and serial guards);
- :mod:`.messages` — the v3 messages both ways: ``_auth``, AES requests and replies, pillar
  replies, publications;
- :mod:`.replay` — the replay guard of authenticated requests (time window and nonce memory).

Nothing here touches a socket: the ZeroMQ sockets belong to the master daemon
(``master/daemon.py``) and the minion's connection (``minion/connection.py``). Imports only
``hamaster.crypto``.
"""
