"""External authentication (``external_auth``) and its ACLs, in Salt's configuration format.

.. code-block:: yaml

    external_auth:
      file:
        ^filename: /etc/hamaster/api-users      # text: "user:password" lines
        ^filetype: text                          # or htpasswd (bcrypt, $6$/$5$ sha-crypt, {SHA})
        ^hashtype: sha256                        # text only: plaintext or any hashlib name
        alice: ['.*', '@runner', '@wheel']
        bob:
          - 'web*': ['test.*', 'cmd.run']
        ops%: ['test.ping']                      # members of the Unix group "ops"
      pam:
        '*': ['test.*']

Authentication (:func:`authenticate`) says whether a username/password pair is good for an
eauth backend; :func:`permissions` collects the user's ACL entries (the user's own, ``*``'s and
those of the user's groups); :class:`Acl` decides whether a call is allowed.
"""

from __future__ import annotations

import base64
import fnmatch
import grp
import hashlib
import hmac
import logging
import os
import pwd
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hamaster.api import shacrypt

log = logging.getLogger(__name__)

#: Keys of an ``external_auth`` backend block that are options, not users.
OPTION_PREFIX = "^"
MAX_PASSWORD = 4096


class EauthConfigError(Exception):
    """An ``external_auth`` block cannot be used; the message names the option."""


def eauth_options(block: dict) -> dict[str, Any]:
    """The ``^option`` entries of a backend block, without the caret."""
    return {k[1:]: v for k, v in block.items() if isinstance(k, str) and k.startswith("^")}


def acl_entries(block: dict) -> dict[str, Any]:
    """The user/group entries of a backend block."""
    return {k: v for k, v in block.items() if isinstance(k, str) and not k.startswith("^")}


# ----------------------------------------------------------------------------- authentication


def _check_hash(password: str, stored: str, hashtype: str) -> bool:
    if hashtype == "plaintext":
        return hmac.compare_digest(password.encode(), stored.encode())
    try:
        digest = hashlib.new(hashtype, password.encode()).hexdigest()
    except (ValueError, TypeError):
        raise EauthConfigError(f"external_auth file: ^hashtype {hashtype!r} is not known") from None
    return hmac.compare_digest(digest, stored.strip().lower())


def check_htpasswd_hash(password: str, stored: str) -> bool:
    """Check ``password`` against one htpasswd hash (bcrypt, ``$6$``/``$5$``, ``{SHA}``)."""
    pw = password.encode()
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        import bcrypt

        # bcrypt uses at most 72 bytes; the library refuses longer input
        try:
            return bcrypt.checkpw(pw[:72], stored.replace("$2y$", "$2b$", 1).encode())
        except ValueError:
            return False
    if stored.startswith(("$5$", "$6$")):
        return shacrypt.verify(pw, stored)
    if stored.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(pw).digest()).decode()
        return hmac.compare_digest(digest, stored[5:])
    log.warning("external_auth file: htpasswd hash format %r is not supported (use bcrypt, "
                "$6$ or $5$)", stored[:6])
    return False


def _file_auth(conf: dict[str, Any], username: str, password: str) -> bool:
    filename = conf.get("filename")
    if not isinstance(filename, str) or not filename:
        raise EauthConfigError("external_auth file: ^filename is required")
    filetype = str(conf.get("filetype", "text"))
    sep = str(conf.get("field_separator", ":"))
    ufield = int(conf.get("username_field", 1)) - 1
    pfield = int(conf.get("password_field", 2)) - 1
    hashtype = str(conf.get("hashtype", "plaintext"))
    if filetype not in ("text", "htpasswd"):
        raise EauthConfigError(f"external_auth file: ^filetype {filetype!r} is not supported "
                               "(text, htpasswd)")
    try:
        with open(filename, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log.error("external_auth file: cannot read %s: %s", filename, exc)
        return False
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if filetype == "htpasswd":
            user, _, stored = line.partition(":")
            if user == username:
                return check_htpasswd_hash(password, stored.strip())
            continue
        fields = line.split(sep)
        if len(fields) <= max(ufield, pfield) or fields[ufield] != username:
            continue
        return _check_hash(password, fields[pfield], hashtype)
    return False


def _pam_auth(conf: dict[str, Any], username: str, password: str) -> bool:
    try:
        import pam  # python-pam
    except ImportError:
        log.error("external_auth pam: the python-pam package is not installed")
        return False
    service = str(conf.get("service", "login"))
    return bool(pam.pam().authenticate(username, password, service=service))


BACKENDS: dict[str, Callable[[dict[str, Any], str, str], bool]] = {
    "file": _file_auth,
    "pam": _pam_auth,
}


def authenticate(external_auth: dict, eauth: str, username: str, password: str) -> bool:
    """Whether ``username``/``password`` is good for backend ``eauth`` of ``external_auth``.

    A backend that is not configured, or not known, never authenticates anyone.
    """
    block = external_auth.get(eauth)
    fn = BACKENDS.get(eauth)
    if not isinstance(block, dict) or fn is None:
        return False
    if not username or len(password) > MAX_PASSWORD or "\0" in username + password:
        return False
    return fn(eauth_options(block), username, password)


def user_groups(username: str) -> list[str]:
    """The Unix groups of ``username`` (none for a user unknown to the system)."""
    try:
        pw = pwd.getpwnam(username)
    except (KeyError, UnicodeError, ValueError):
        return []
    try:
        gids = os.getgrouplist(username, pw.pw_gid)
    except OSError:
        gids = [pw.pw_gid]
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return sorted(set(names))


def permissions(external_auth: dict, eauth: str, username: str,
                groups: Iterable[str]) -> list[Any] | None:
    """The ACL entries of ``username`` in ``eauth``: own, ``*``'s and groups' (``name%`` or
    ``%name``). None when the user has no entry at all (Salt refuses the login then)."""
    block = external_auth.get(eauth)
    if not isinstance(block, dict):
        return None
    entries = acl_entries(block)
    found = False
    perms: list[Any] = []
    for key in (username, "*"):
        if key in entries:
            found = True
            perms.extend(_as_list(entries[key]))
    for group in groups:
        for key in (f"{group}%", f"%{group}"):
            if key in entries:
                found = True
                perms.extend(_as_list(entries[key]))
    return perms if found else None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------- ACLs


def _fun_match(pattern: Any, fun: str) -> bool:
    """A function pattern is a regular expression that must match the whole name."""
    if not isinstance(pattern, str):
        return False
    try:
        return re.fullmatch(pattern, fun) is not None
    except re.error:
        log.error("external_auth: invalid regular expression %r", pattern)
        return False


def _args_match(spec: Any, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Salt's argument restrictions: ``{'args': [regex, ...], 'kwargs': {name: regex}}``.

    Positional patterns are matched in order (``null`` skips one); a call with more positional
    arguments than patterns is refused. Every named pattern must be present and match.
    """
    if spec is None:
        return True
    if not isinstance(spec, dict):
        return False
    pats = spec.get("args")
    if pats is not None:
        if not isinstance(pats, list) or len(args) > len(pats):
            return False
        for i, pat in enumerate(pats):
            if pat is None:
                continue
            if i >= len(args) or not _fun_match(pat, str(args[i])):
                return False
    kpats = spec.get("kwargs")
    if kpats is not None:
        if not isinstance(kpats, dict):
            return False
        for name, pat in kpats.items():
            if name not in kwargs or not _fun_match(pat, str(kwargs[name])):
                return False
    return True


def _funs_allow(funs: Any, fun: str, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a list of function entries (``'test.*'`` or ``{'cmd.run': {args...}}``) allows."""
    for item in _as_list(funs):
        if isinstance(item, str) and _fun_match(item, fun):
            return True
        if isinstance(item, dict):
            for pat, spec in item.items():
                if _fun_match(pat, fun) and _args_match(spec, args, kwargs):
                    return True
    return False


@dataclass
class Acl:
    """One user's ACL entries (as :func:`permissions` returns them) and the checks on them."""

    perms: list[Any]

    def allows_local(self, fun: str, args: list[Any], kwargs: dict[str, Any],
                     targeted: list[str], matches: Callable[[str], set[str]]) -> bool:
        """Whether ``fun`` may run on every minion in ``targeted``.

        A plain entry (``'test.*'``) allows any target; ``{'web*': [...]}`` allows the
        functions on the minions the key matches (``matches(key)``, a compound/glob target).
        Every targeted minion must be allowed; a target that matched no minion is allowed only
        by a plain entry.
        """
        left = set(targeted)
        for item in self.perms:
            if isinstance(item, str):
                if not item.startswith("@") and _fun_match(item, fun):
                    return True
                continue
            if not isinstance(item, dict):
                continue
            for key, funs in item.items():
                if not isinstance(key, str) or key.startswith("@"):
                    continue
                if not _funs_allow(funs, fun, args, kwargs):
                    continue
                left -= matches(key)
        return bool(targeted) and not left

    def allows_class(self, kind: str, fun: str, args: list[Any] | None = None,
                     kwargs: dict[str, Any] | None = None) -> bool:
        """Whether runner/wheel function ``fun`` is allowed (``kind``: ``runner`` or ``wheel``).

        ``'@runner'`` allows every runner; ``{'@runner': ['jobs.*']}`` some; ``'@jobs'`` the
        ``jobs.*`` runners.
        """
        args = args or []
        kwargs = kwargs or {}
        tag = f"@{kind}"
        for item in self.perms:
            if item == tag:
                return True
            if kind == "runner" and item == "@jobs" and fun.startswith("jobs."):
                return True
            if isinstance(item, dict) and tag in item and _funs_allow(item[tag], fun, args, kwargs):
                return True
        return False


def glob_matcher(ids: Iterable[str]) -> Callable[[str], set[str]]:
    """A ``matches(key)`` for :meth:`Acl.allows_local` that globs minion ids."""
    idlist = list(ids)
    return lambda key: {m for m in idlist if fnmatch.fnmatchcase(m, key)}
