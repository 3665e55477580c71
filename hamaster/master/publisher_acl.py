"""``publisher_acl``: which non-root Unix users may use the local CLIs, and for what.

.. code-block:: yaml

    publisher_acl:
      fred: ['test.*', 'pkg.version']          # any target
      'web*': [{'web*': ['test.*']}]            # users named web*: test.* on web* minions
      ops%: ['.*', '@runner']                   # members of the Unix group ops (and hamaster-run)
    publisher_acl_blacklist:
      users: ['^(?!sudo_).*$']                  # regexes on the user name
      modules: ['cmd\\..*']                     # regexes on the function name

A caller is identified by the kernel (``SO_PEERCRED`` on the CLI's Unix socket), never by a
claim in the request. Root and the master's own user are unrestricted, as before. With a
non-empty ``publisher_acl`` the CLI socket becomes connectable by every local user (socket
0666 in a 0755 ``sock_dir``): everyone else is refused unless an entry allows the call. The
entries use the ACL syntax of ``external_auth`` (:class:`hamaster.api.eauth.Acl`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pwd
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hamaster.api.eauth import Acl, user_groups
from hamaster.cliargs import split_args

log = logging.getLogger(__name__)

REFUSED = "Authorization error occurred: {user} may not run {what} (publisher_acl)"


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a CLI connection."""

    uid: int
    name: str
    unrestricted: bool


def peer_caller(sock: socket.socket | None) -> Caller:
    """The caller of a connected Unix socket (``SO_PEERCRED``); unknown peers are restricted."""
    uid = -1
    if sock is not None:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", raw)
        except OSError:
            uid = -1
    try:
        name = pwd.getpwuid(uid).pw_name if uid >= 0 else ""
    except KeyError:
        name = ""
    return Caller(uid=uid, name=name, unrestricted=uid in (0, os.geteuid()))


class PublisherAcl:
    """The master's ``publisher_acl`` and ``publisher_acl_blacklist``."""

    def __init__(self, opts: dict) -> None:
        acl = opts.get("publisher_acl") or {}
        self.acl: dict[str, Any] = acl if isinstance(acl, dict) else {}
        black = opts.get("publisher_acl_blacklist") or {}
        black = black if isinstance(black, dict) else {}
        self.black_users = [p for p in black.get("users") or [] if isinstance(p, str)]
        self.black_modules = [p for p in black.get("modules") or [] if isinstance(p, str)]

    @property
    def enabled(self) -> bool:
        """True when non-root users may connect at all."""
        return bool(self.acl)

    @staticmethod
    def _matches_any(patterns: list[str], value: str) -> bool:
        for pat in patterns:
            try:
                if re.match(pat, value):
                    return True
            except re.error:
                log.error("publisher_acl_blacklist: invalid regular expression %r", pat)
        return False

    def perms(self, caller: Caller) -> list[Any]:
        """The caller's entries: keys that glob-match the name, and ``group%`` of its groups."""
        out: list[Any] = []
        groups = set(user_groups(caller.name)) if caller.name else set()
        for key, entries in self.acl.items():
            if not isinstance(key, str):
                continue
            if key.endswith("%"):
                hit = key[:-1] in groups
            elif key.startswith("%"):
                hit = key[1:] in groups
            else:
                hit = bool(caller.name) and fnmatch.fnmatchcase(caller.name, key)
            if hit:
                out.extend(entries if isinstance(entries, list) else [entries])
        return out

    def refuse_publish(self, caller: Caller, fun: str, arg: list,
                       targeted: list[str], matches: Callable[[str], set[str]]) -> str | None:
        """Why ``caller`` may not publish ``fun`` to ``targeted`` (None: allowed)."""
        if caller.unrestricted:
            return None
        what = f"{fun} on {', '.join(targeted) or 'no minion'}"
        who = caller.name or f"uid {caller.uid}"
        if not caller.name or self._matches_any(self.black_users, caller.name) \
                or self._matches_any(self.black_modules, fun):
            return REFUSED.format(user=who, what=what)
        args, kwargs = split_args(arg)
        if not Acl(self.perms(caller)).allows_local(fun, args, kwargs, targeted, matches):
            return REFUSED.format(user=who, what=what)
        return None

    def refuse_runner(self, caller: Caller, fun: str) -> str | None:
        """Why ``caller`` may not run runner ``fun`` (None: allowed)."""
        if caller.unrestricted:
            return None
        who = caller.name or f"uid {caller.uid}"
        if not caller.name or self._matches_any(self.black_users, caller.name) \
                or not Acl(self.perms(caller)).allows_class("runner", fun):
            return REFUSED.format(user=who, what=f"runner {fun}")
        return None
