"""salt-api's lowstate clients: ``local``, ``local_async``, ``runner`` and ``wheel``.

One lowstate chunk (``{"client", "tgt", "tgt_type", "fun", "arg", "kwarg", ...}``) is checked
against ``netapi_enable_clients`` (as Salt 3006+: a client not listed is refused) and against
the caller's ACL, then run. Answers have salt-api's shapes: ``local`` ``{minion: return}``
(``full_return``: ``{minion: {"ret", "retcode", "jid"}}``), ``local_async``
``{"jid", "minions"}``, ``runner`` the runner's return, ``wheel``
``{"tag", "data": {"fun", "jid", "tag", "user", "_stamp", "return", "success"}}``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from hamaster.api.bridge import MasterBridge, RunnerRefused, TargetRefused
from hamaster.api.eauth import Acl
from hamaster.cliargs import parse_cli_args, split_args
from hamaster.jobs.jid import gen_jid

log = logging.getLogger(__name__)

#: salt-api's client names (salt/netapi/__init__.py ``CLIENTS``).
SALT_CLIENTS = ("local", "local_async", "local_batch", "local_subset", "runner", "runner_async",
                "ssh", "wheel", "wheel_async")
SUPPORTED = ("local", "local_async", "runner", "wheel")
#: Lowstate keys that are never a runner/wheel keyword argument.
RESERVED = frozenset({"client", "fun", "arg", "kwarg", "token", "username", "password", "eauth",
                      "full_return", "timeout", "tgt", "tgt_type", "expr_form", "batch", "ret",
                      "print_event", "__current_eauth_groups", "__current_eauth_user"})
TGT_TYPES = frozenset({"glob", "pcre", "list", "grain", "grain_pcre", "compound", "ipcidr",
                       "nodegroup", "pillar", "pillar_pcre", "range", "data"})


class ApiError(Exception):
    """An HTTP error answer: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(time.time() * 1e6) % 1000000:06d}"


def _str_field(chunk: dict, name: str, default: str | None = None) -> str:
    value = chunk.get(name, default)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty string")
    return value


def _arg_list(chunk: dict) -> list[Any]:
    arg = chunk.get("arg", [])
    if arg is None:
        return []
    if not isinstance(arg, list):
        arg = [arg]
    return arg


def _kwarg(chunk: dict) -> dict[str, Any]:
    kwarg = chunk.get("kwarg") or {}
    if not isinstance(kwarg, dict) or not all(isinstance(k, str) for k in kwarg):
        raise ApiError(400, "'kwarg' must be a mapping of names to values")
    return kwarg


def _timeout(chunk: dict, default: float) -> float:
    value = chunk.get("timeout")
    if value is None or value == "":
        return default
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, "'timeout' must be a number") from None
    if not 0 < timeout <= 3600:
        raise ApiError(400, "'timeout' must be between 0 and 3600 seconds")
    return timeout


class LowstateRunner:
    """Runs lowstate chunks for an authenticated session."""

    def __init__(self, bridge: MasterBridge, pool: Executor,
                 emit: Callable[[str, dict], None]) -> None:
        self.bridge = bridge
        self.pool = pool
        self.emit = emit

    @property
    def enabled_clients(self) -> list[str]:
        """``netapi_enable_clients`` (Salt 3006+: empty by default, every client disabled)."""
        value = self.bridge.opts.get("netapi_enable_clients") or []
        return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []

    def check_client(self, client: Any) -> str:
        """The client name, or the salt-api refusal (400) for an unknown or disabled client."""
        if not isinstance(client, str) or client not in SALT_CLIENTS:
            raise ApiError(400, f"Invalid client specified: '{client}'")
        if client not in self.enabled_clients:
            raise ApiError(400, f"Client disabled: '{client}'. Add to 'netapi_enable_clients' "
                                "master config option to enable.")
        if client not in SUPPORTED:
            raise ApiError(400, f"Client '{client}' is not supported by hamaster "
                                f"(supported: {', '.join(SUPPORTED)})")
        return client

    async def run(self, chunk: Any, session: dict) -> Any:
        """Run one chunk for ``session`` (a token record); raises :class:`ApiError`."""
        if not isinstance(chunk, dict):
            raise ApiError(400, "each lowstate chunk must be a mapping")
        client = self.check_client(chunk.get("client"))
        acl = Acl(list(session.get("perms") or []))
        user = str(session.get("user", ""))
        if client in ("local", "local_async"):
            return await self.local(chunk, acl, user, wait=client == "local")
        if client == "runner":
            return await self.runner(chunk, acl, user)
        return await self.wheel(chunk, acl, user)

    # -- local ---------------------------------------------------------------------------------

    async def local(self, chunk: dict, acl: Acl, user: str, wait: bool) -> Any:
        """``local`` (wait for the returns) and ``local_async`` (publish, answer the jid)."""
        tgt = chunk.get("tgt")
        if isinstance(tgt, list):
            if not all(isinstance(t, str) for t in tgt):
                raise ApiError(400, "'tgt' must be a string or a list of strings")
        elif not isinstance(tgt, str) or not tgt:
            raise ApiError(400, "'tgt' must be a non-empty string")
        fun = _str_field(chunk, "fun")
        tgt_type = chunk.get("tgt_type") or chunk.get("expr_form") or "glob"
        if tgt_type not in TGT_TYPES:
            raise ApiError(400, f"'tgt_type' {tgt_type!r} is not known")
        kwarg = _kwarg(chunk)
        words = _arg_list(chunk)
        arg = parse_cli_args(words)  # "k=v" words become keyword arguments, as Salt's
        if kwarg:
            arg.append({"__kwarg__": True, **kwarg})
        args, kwargs = split_args(arg)
        opts = self.bridge.opts
        timeout = _timeout(chunk, float(opts.get("timeout", 5)))
        gather = float(opts.get("gather_job_timeout", 10))
        ret = chunk.get("ret") or ""
        if not isinstance(ret, str):
            raise ApiError(400, "'ret' must be a string")
        full = bool(chunk.get("full_return"))
        jid_box: dict[str, str] = {}

        def check(targeted: list[str], matches: Callable[[str], set[str]]) -> bool:
            return acl.allows_local(fun, args, kwargs, targeted, matches)

        def on_return(mid: str, data: dict) -> None:
            self.emit(f"salt/job/{data.get('jid') or jid_box.get('jid', '')}/ret/{mid}",
                      {**data, "id": mid})

        try:
            pub, rets = await self.bridge.run_job(
                tgt, tgt_type, fun, arg, user=user, check=check, wait=wait, timeout=timeout,
                gather_job_timeout=gather, ret=ret, on_return=on_return)
        except TargetRefused:
            log.warning("API: user %s refused %s on %r (%s): not allowed by external_auth",
                        user, fun, tgt, tgt_type)
            self.emit("hamaster/api/acl/refused", {"user": user, "fun": fun, "tgt": tgt,
                                                   "tgt_type": tgt_type})
            raise ApiError(403, f"user {user} may not run {fun} on {tgt!r}") from None
        except ValueError as exc:
            raise ApiError(400, f"invalid target: {exc}") from None
        if not pub.get("jid"):
            return {}
        jid_box["jid"] = pub["jid"]
        self.emit(f"salt/job/{pub['jid']}/new",
                  {"jid": pub["jid"], "tgt": tgt, "tgt_type": tgt_type, "fun": fun, "arg": arg,
                   "minions": pub["minions"], "user": user, "_stamp": _stamp()})
        if not wait:
            return {"jid": pub["jid"], "minions": pub["minions"]}
        out: dict[str, Any] = {}
        for mid, data in sorted(rets.items()):
            if full:
                item = {"ret": data.get("return"), "retcode": data.get("retcode", 0),
                        "jid": pub["jid"]}
                if "out" in data:
                    item["out"] = data["out"]
                out[mid] = item
            else:
                out[mid] = data.get("return")
        return out

    # -- runner --------------------------------------------------------------------------------

    @staticmethod
    def _call_args(chunk: dict) -> tuple[list[Any], dict[str, Any]]:
        args, kwargs = split_args(parse_cli_args(_arg_list(chunk)))
        kwargs.update(_kwarg(chunk))
        for key, value in chunk.items():
            if isinstance(key, str) and key not in RESERVED and not key.startswith("__"):
                kwargs[key] = value
        return args, kwargs

    async def runner(self, chunk: dict, acl: Acl, user: str) -> Any:
        """A master runner, synchronously; ``full_return`` wraps it as Salt's event data."""
        fun = _str_field(chunk, "fun")
        args, kwargs = self._call_args(chunk)
        if not acl.allows_class("runner", fun, args, kwargs):
            log.warning("API: user %s refused runner %s: not allowed by external_auth", user, fun)
            self.emit("hamaster/api/acl/refused", {"user": user, "fun": f"runner.{fun}"})
            raise ApiError(403, f"user {user} may not run runner {fun}")
        jid = gen_jid()
        try:
            result = await self.bridge.runner(fun, args, kwargs)
            success = True
        except RunnerRefused as exc:
            result, success = str(exc), False
        if chunk.get("full_return"):
            return {"fun": f"runner.{fun}", "fun_args": [*args, *([kwargs] if kwargs else [])],
                    "jid": jid, "return": result, "success": success, "user": user,
                    "_stamp": _stamp()}
        return result

    # -- wheel ---------------------------------------------------------------------------------

    async def wheel(self, chunk: dict, acl: Acl, user: str) -> dict:
        """A wheel function (``key.*``), run in a worker thread (it reads the store)."""
        fun = _str_field(chunk, "fun")
        args, kwargs = self._call_args(chunk)
        if not acl.allows_class("wheel", fun, args, kwargs):
            log.warning("API: user %s refused wheel %s: not allowed by external_auth", user, fun)
            self.emit("hamaster/api/acl/refused", {"user": user, "fun": f"wheel.{fun}"})
            raise ApiError(403, f"user {user} may not run wheel {fun}")
        jid = gen_jid()
        tag = f"salt/wheel/{jid}"
        impl = WHEEL.get(fun)
        if impl is None:
            result: Any = (f"'{fun}' is not available. Available wheel functions: "
                           f"{', '.join(sorted(WHEEL))}")
            success = False
        else:
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(
                    self.pool, lambda: impl(self.bridge, *args, **kwargs))
                success = True
            except TypeError as exc:
                result, success = f"Passed invalid arguments to {fun}: {exc}", False
            except ValueError as exc:
                result, success = str(exc), False
        data = {"fun": f"wheel.{fun}", "jid": jid, "tag": tag, "user": user, "_stamp": _stamp(),
                "return": result, "success": success}
        return {"tag": tag, "data": data}


# -- wheel key functions (salt/wheel/key.py's names and answers) -------------------------------


def _ids(bridge: MasterBridge, match: Any, states: tuple[str, ...]) -> dict[str, list[str]]:
    """Ids per state matching ``match`` (a glob, or a list of ids)."""
    keys = {s.value: ids for s, ids in bridge.keys.list_keys().items()}
    if isinstance(match, list):
        wanted = {str(m) for m in match}

        def hit(mid: str) -> bool:
            return mid in wanted
    elif isinstance(match, str):
        def hit(mid: str) -> bool:
            return mid == match or fnmatch.fnmatchcase(mid, match)
    else:
        raise ValueError("'match' must be a glob or a list of minion ids")
    return {s: [m for m in keys.get(s, []) if hit(m)] for s in states}


_ALL = ("minions", "minions_pre", "minions_rejected", "minions_denied")
_LIST_STATES = {
    "pre": "minions_pre", "un": "minions_pre", "unaccepted": "minions_pre",
    "acc": "minions", "accepted": "minions", "rej": "minions_rejected",
    "rejected": "minions_rejected", "den": "minions_denied", "denied": "minions_denied",
}


def key_list_all(bridge: MasterBridge) -> dict:
    """``key.list_all``: every key by state, with the master's own key files under ``local``."""
    keys = {s.value: ids for s, ids in bridge.keys.list_keys().items()}
    return {"local": ["master.pem", "master.pub"], **{s: keys.get(s, []) for s in _ALL}}


def key_list(bridge: MasterBridge, match: str = "all") -> dict:
    """``key.list``: keys in one state (``pre``/``acc``/``rej``/``den``/``all``)."""
    if match == "all":
        return key_list_all(bridge)
    state = _LIST_STATES.get(str(match))
    if state is None:
        raise ValueError(f"unknown key state {match!r} (pre, acc, rej, den, all)")
    keys = {s.value: ids for s, ids in bridge.keys.list_keys().items()}
    return {state: keys.get(state, [])}


def key_accept(bridge: MasterBridge, match: Any, include_rejected: bool = False,
               include_denied: bool = False) -> dict:
    """``key.accept``: accept pending (optionally rejected/denied) keys matching ``match``."""
    states = ["minions_pre"]
    if include_rejected:
        states.append("minions_rejected")
    if include_denied:
        states.append("minions_denied")
    ids = sorted({m for lst in _ids(bridge, match, tuple(states)).values() for m in lst})
    done = [m for m in ids if bridge.keys.accept(m, include_rejected=bool(include_rejected),
                                                 include_denied=bool(include_denied))]
    return {"minions": done} if done else {}


def key_reject(bridge: MasterBridge, match: Any, include_accepted: bool = False,
               include_denied: bool = False) -> dict:
    """``key.reject``: reject pending (optionally accepted/denied) keys matching ``match``."""
    states = ["minions_pre"]
    if include_accepted:
        states.append("minions")
    if include_denied:
        states.append("minions_denied")
    ids = sorted({m for lst in _ids(bridge, match, tuple(states)).values() for m in lst})
    done = [m for m in ids if bridge.keys.reject(m, include_accepted=bool(include_accepted),
                                                 include_denied=bool(include_denied))]
    return {"minions_rejected": done} if done else {}


def key_delete(bridge: MasterBridge, match: Any) -> dict:
    """``key.delete``: delete every key matching ``match``; answers ``{}`` as Salt does."""
    ids = sorted({m for lst in _ids(bridge, match, _ALL).values() for m in lst})
    for mid in ids:
        bridge.keys.delete(mid)
    return {}


def key_finger(bridge: MasterBridge, match: Any, hash_type: str | None = None) -> dict:
    """``key.finger``: fingerprints of the keys matching ``match``, by state."""
    from hamaster.pki_sync.keys import KeyState

    out: dict[str, dict[str, str]] = {}
    for state, ids in _ids(bridge, match, _ALL).items():
        for mid in ids:
            try:
                out.setdefault(state, {})[mid] = bridge.keys.finger(mid, KeyState(state))
            except Exception:  # the key changed meanwhile
                continue
    return out


def key_print(bridge: MasterBridge, match: Any) -> dict:
    """``key.print``: the public keys matching ``match``, by state."""
    from hamaster.pki_sync.keys import KeyState

    out: dict[str, dict[str, str]] = {}
    for state, ids in _ids(bridge, match, _ALL).items():
        for mid in ids:
            pem = bridge.keys.get_pub(mid, KeyState(state))
            if pem is not None:
                out.setdefault(state, {})[mid] = pem
    return out


def key_gen_accept(bridge: MasterBridge, id_: str, keysize: int = 2048,
                   force: bool = False) -> dict:
    """``key.gen_accept``: make a keypair for ``id_``, accept its public half, return both."""
    from hamaster.pki_sync.keys import KeyState, generate_keypair, valid_minion_id

    if not isinstance(id_, str) or not valid_minion_id(id_):
        raise ValueError(f"invalid minion id {id_!r}")
    if not isinstance(keysize, int) or not 2048 <= keysize <= 8192:
        raise ValueError("keysize must be an integer between 2048 and 8192")
    reg = bridge.keys
    if reg.state_of(id_) is not None and not force:
        return {}
    priv, pub = generate_keypair(keysize)
    for state in KeyState:
        if state is not KeyState.ACCEPTED:
            reg.delete(id_, state)
    reg.store.put(f"{reg.prefix}{KeyState.ACCEPTED.value}/{id_}", pub)
    reg.refresh([id_])
    return {"pub": pub.decode(), "priv": priv.decode()}


def config_values(bridge: MasterBridge) -> dict:
    """``config.values``: only the ``saltgui_*`` options (SaltGUI reads its settings so); the
    rest of the master config (paths, backends, secrets of backends) is not handed out."""
    return {k: v for k, v in bridge.opts.items() if isinstance(k, str) and k.startswith("saltgui_")}


WHEEL: dict[str, Callable[..., Any]] = {
    "config.values": config_values,
    "key.list_all": key_list_all,
    "key.list": key_list,
    "key.accept": key_accept,
    "key.reject": key_reject,
    "key.delete": key_delete,
    "key.finger": key_finger,
    "key.print": key_print,
    "key.gen_accept": key_gen_accept,
}
