"""The HTTP server: salt-api's ``rest_cherrypy`` URLs on aiohttp, in a thread of the master.

Configured by the master's ``rest_cherrypy:`` block (alias ``rest_api:``): ``port`` (8000),
``host`` (0.0.0.0), ``ssl_crt``/``ssl_key`` or ``disable_ssl: true``, ``debug``,
``max_request_body_size`` (1 MiB), ``webhook_url`` (``/hook``), ``webhook_disable_auth``,
``stats_disable_auth``, ``login_max_failures``/``login_failure_window`` (rate limit).

:class:`ApiService` runs the aiohttp application on its own thread with its own event loop
(see :mod:`hamaster.api.bridge` for how it reaches the master without blocking it). Every
answer, refusals included, is counted in ``hamaster_api_requests_total{code}``.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import os
import ssl
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import yaml
from aiohttp import web
from prometheus_client import Counter

from hamaster import ids
from hamaster.api import eauth
from hamaster.api.bridge import MasterBridge
from hamaster.api.clients import SALT_CLIENTS, ApiError, LowstateRunner
from hamaster.api.tokens import TokenStore
from hamaster.events.bus import decode_position
from hamaster.jobs.cache import job_summary
from hamaster.options import opt
from hamaster.store.base import StoreError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_BODY_LIMIT = 1024 * 1024
DEFAULT_TOKEN_EXPIRE = 43200.0
EVENT_BUFFER = 1000
#: How often ``GET /events`` looks for new events on the cluster bus (seconds).
BUS_POLL = 0.1
KNOWN_CODES = ("200", "202", "400", "401", "403", "404", "405", "406", "413", "429", "500", "503")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoginLimiter:
    """Failed logins per (user, source address) in a sliding window; thread-unsafe (API loop)."""

    def __init__(self, max_failures: int = 5, window: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._fails: dict[tuple[str, str], collections.deque] = {}

    def _recent(self, key: tuple[str, str]) -> collections.deque:
        q = self._fails.get(key)
        if q is None:
            return collections.deque()
        cutoff = time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            self._fails.pop(key, None)
        return q

    def blocked_for(self, user: str, source: str) -> float:
        """Seconds until ``user`` may try again from ``source`` (0: now)."""
        q = self._recent((user, source))
        if len(q) < self.max_failures:
            return 0.0
        return max(0.0, q[0] + self.window - time.monotonic())

    def failed(self, user: str, source: str) -> None:
        """Record a failed attempt."""
        if len(self._fails) > 100_000:
            self._fails.clear()
        self._fails.setdefault((user, source), collections.deque()).append(time.monotonic())

    def succeeded(self, user: str, source: str) -> None:
        """Forget the failures of a user who logged in."""
        self._fails.pop((user, source), None)


class EventLog:
    """The events this master's API knows (jobs it ran, logins, key changes, web hooks), kept in
    a ring buffer for ``GET /events``. ``post`` is thread-safe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = EVENT_BUFFER,
                 bus: Any = None, emit: Callable[[str, Any], None] | None = None) -> None:
        self.loop = loop
        self.buf: collections.deque[tuple[int, str, dict]] = collections.deque(maxlen=size)
        self.seq = 0
        self.cond = asyncio.Condition()
        #: The master's cluster event bus (hamaster/events/bus.py), when it has one: then the
        #: API's own events go onto it, and ``GET /events`` streams the cluster's stream.
        self.bus = bus
        self._emit = emit

    def post(self, tag: str, data: dict) -> None:
        """Add an event (from any thread)."""
        if self.bus is not None and self._emit is not None:
            self._emit(tag, data)
            return
        try:
            self.loop.call_soon_threadsafe(self._add, tag, data)
        except RuntimeError:  # loop closed at shutdown
            pass

    def _add(self, tag: str, data: dict) -> None:
        self.seq += 1
        self.buf.append((self.seq, tag, {**data, "_stamp": data.get("_stamp") or _stamp()}))

        async def wake() -> None:
            async with self.cond:
                self.cond.notify_all()

        self.loop.create_task(wake())

    def since(self, seq: int) -> list[tuple[int, str, dict]]:
        """Events after ``seq`` still in the buffer."""
        return [e for e in self.buf if e[0] > seq]


def _stamp() -> str:
    now = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
            + f".{int(now * 1e6) % 10**6:06d}")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, default=str)


class ApiApp:
    """The routes and their handlers (run on the API's event loop)."""

    def __init__(self, bridge: MasterBridge, apiopts: dict, tokens: TokenStore,
                 pool: ThreadPoolExecutor, events: EventLog) -> None:
        self.bridge = bridge
        self.apiopts = apiopts
        self.tokens = tokens
        self.pool = pool
        self.events = events
        self.lowstate = LowstateRunner(bridge, pool, events.post)
        self.limiter = LoginLimiter(int(apiopts.get("login_max_failures", 5)),
                                    float(apiopts.get("login_failure_window", 60.0)))
        self.started = time.time()
        self.codes: collections.Counter[str] = collections.Counter()
        self.counter = Counter("hamaster_api_requests_total",
                               "REST API answers, refusals included, by HTTP status code",
                               ["master_id", "code"], registry=bridge.metrics_registry)
        for code in KNOWN_CODES:
            self.counter.labels(bridge.master_id, code)
        self.debug = bool(apiopts.get("debug", False))

    # -- application ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application."""
        limit = int(self.apiopts.get("max_request_body_size", DEFAULT_BODY_LIMIT))
        app = web.Application(client_max_size=limit, middlewares=[self._middleware])
        hook = "/" + str(self.apiopts.get("webhook_url", "hook")).strip("/")
        r = app.router
        r.add_get("/", self.index)
        r.add_post("/", self.root_post)
        r.add_get("/login", self.login_get)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_post("/run", self.run)
        r.add_get("/minions", self.minions_get)
        r.add_get("/minions/{mid}", self.minions_get)
        r.add_post("/minions", self.minions_post)
        r.add_get("/jobs", self.jobs_get)
        r.add_get("/jobs/{jid}", self.jobs_get)
        r.add_get("/keys", self.keys_get)
        r.add_get("/keys/{mid}", self.keys_get)
        r.add_post("/keys", self.keys_post)
        r.add_get("/events", self.events_get)
        r.add_post(hook, self.hook)
        r.add_post(hook + "/{tag:.*}", self.hook)
        r.add_get("/stats", self.stats)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except ApiError as exc:
            resp = self._error(request, exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = self._error(request, exc.status, exc.reason)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("API: %s %s failed", request.method, request.path)
            resp = self._error(request, 500, "An unexpected error occurred")
        self._count(resp.status)
        return resp

    def _count(self, status: int) -> None:
        code = str(status)
        self.codes[code] += 1
        self.counter.labels(self.bridge.master_id, code).inc()

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        resp = self._reply(request, {"status": status, "return": message}, status=status)
        if status == 401:
            resp.headers["WWW-Authenticate"] = "Session"
        return resp

    @staticmethod
    def _wants_yaml(request: web.Request) -> bool:
        accept = request.headers.get("Accept", "")
        return "application/x-yaml" in accept or "text/yaml" in accept

    def _reply(self, request: web.Request, data: Any, status: int = 200) -> web.Response:
        if self._wants_yaml(request):
            text = yaml.safe_dump(json.loads(_dump_json(data)), default_flow_style=False)
            ctype = "application/x-yaml"
        else:
            text, ctype = _dump_json(data), "application/json"
        return web.Response(text=text, status=status, content_type=ctype)

    # -- request body and session --------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[Any, str]:
        """The parsed body (None when empty) and its raw text; salt-api's content types."""
        raw_bytes = await request.read()
        if not raw_bytes:
            return None, ""
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8") from None
        ctype = request.content_type
        if ctype == "application/json":
            try:
                return json.loads(raw), raw
            except (ValueError, RecursionError):
                raise ApiError(400, "Invalid JSON document") from None
        if ctype == "application/x-www-form-urlencoded":
            data: dict[str, Any] = {}
            for key, value in parse_qsl(raw, keep_blank_values=True):
                if key in data:
                    prev = data[key]
                    data[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
                else:
                    data[key] = value
            return data, raw
        if ctype in ("application/x-yaml", "text/yaml"):
            try:
                # no anchors/aliases: a few bytes of them expand to gigabytes once published
                if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(raw)):
                    raise ApiError(400, "YAML aliases are not accepted")
                return yaml.safe_load(raw), raw
            except (yaml.YAMLError, RecursionError, ValueError):
                raise ApiError(400, "Invalid YAML document") from None
        if ctype == "text/plain":
            try:
                return json.loads(raw), raw
            except (ValueError, RecursionError):
                return raw, raw
        raise ApiError(406, "Content type not supported")

    async def _lowstate(self, request: web.Request) -> list[dict]:
        data, _ = await self._body(request)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ApiError(400, "Lowstates must be a list")
        for chunk in data:
            if not isinstance(chunk, dict) or not all(isinstance(k, str) for k in chunk):
                raise ApiError(400, "each lowstate chunk must be a mapping")
            if "arg" in chunk and not isinstance(chunk["arg"], list):
                chunk["arg"] = [chunk["arg"]]
        if len(data) > 100:
            raise ApiError(400, "at most 100 lowstate chunks per request")
        return data

    @staticmethod
    def _token_of(request: web.Request, allow_query: bool = False) -> str | None:
        token = request.headers.get("X-Auth-Token")
        if not token:
            token = request.cookies.get("session_id")
        if not token and allow_query:
            token = request.query.get("token") or request.query.get("salt_token")
        return token or None

    async def _session(self, request: web.Request, allow_query: bool = False) -> dict:
        """The token record of the request, or 401."""
        token = self._token_of(request, allow_query)
        if token is None:
            raise ApiError(401, "No authentication token: log in at /login")
        rec = await self._token_record(token)
        return self._with_perms({**rec, "token": token})

    async def _token_record(self, token: str) -> dict:
        """The live record of ``token`` (read in the API's pool), else 401; 503 when the token
        store cannot be read."""
        loop = asyncio.get_running_loop()
        try:
            rec = await loop.run_in_executor(self.pool, self.tokens.get, token)
        except (StoreError, OSError) as exc:
            log.error("API: cannot read the token store: %s", exc)
            raise ApiError(503, "The token store is unreachable") from None
        if rec is None:
            raise ApiError(401, "Invalid or expired token")
        return rec

    def _with_perms(self, rec: dict) -> dict:
        """The record with the user's permissions from this master's ``external_auth`` now
        (as Salt, the ACL is read at each call, not frozen into the token); 401 if none."""
        ext = self.bridge.opts.get("external_auth") or {}
        perms = eauth.permissions(ext if isinstance(ext, dict) else {}, str(rec.get("eauth")),
                                  str(rec.get("user")), list(rec.get("groups") or []))
        if perms is None:
            raise ApiError(401, "The token's user has no external_auth entry on this master")
        return {**rec, "perms": perms}

    # -- authentication ------------------------------------------------------------------------

    def _source(self, request: web.Request) -> str:
        return request.remote or "unknown"

    async def _authenticate(self, request: web.Request, creds: Any) -> dict:
        """Check ``creds`` (username, password, eauth) and return the token record (no token)."""
        if not isinstance(creds, dict):
            raise ApiError(400, "Require \"username\", \"password\", and \"eauth\" params")
        username, password, eauth_name = (creds.get("username"), creds.get("password"),
                                          creds.get("eauth"))
        if not all(isinstance(v, str) for v in (username, password, eauth_name)):
            raise ApiError(400, "Require \"username\", \"password\", and \"eauth\" params")
        source = self._source(request)
        wait = self.limiter.blocked_for(username, source)
        if wait > 0:
            log.warning("API: login of %s from %s refused: too many failures", username, source)
            raise ApiError(429, f"Too many failed logins; try again in {int(wait) + 1} s")
        ext = self.bridge.opts.get("external_auth") or {}
        if not isinstance(ext, dict):
            ext = {}

        def check() -> tuple[bool, list[str], list | None]:
            try:
                ok = eauth.authenticate(ext, eauth_name, username, password)
            except eauth.EauthConfigError as exc:
                log.error("API: %s", exc)
                ok = False
            if not ok:
                return False, [], None
            groups = eauth.user_groups(username)
            return True, groups, eauth.permissions(ext, eauth_name, username, groups)

        loop = asyncio.get_running_loop()
        ok, groups, perms = await loop.run_in_executor(self.pool, check)
        if not ok or perms is None:
            self.limiter.failed(username, source)
            log.warning("API: authentication failed for user %s (eauth %s) from %s",
                        username, eauth_name, source)
            self.events.post("hamaster/api/auth", {"user": username, "eauth": eauth_name,
                                                   "success": False, "source": source})
            raise ApiError(401, "Could not authenticate using provided credentials")
        self.limiter.succeeded(username, source)
        self.events.post("hamaster/api/auth", {"user": username, "eauth": eauth_name,
                                               "success": True, "source": source})
        return {"user": username, "eauth": eauth_name, "perms": perms, "groups": groups}

    async def login_get(self, request: web.Request) -> web.Response:
        """``GET /login``: how to log in."""
        resp = self._reply(request, {"status": "200 OK", "return": "Please log in"})
        resp.headers["WWW-Authenticate"] = "Session"
        return resp

    async def login(self, request: web.Request) -> web.Response:
        """``POST /login``: eauth credentials → a token valid on every master."""
        data, _ = await self._body(request)
        creds = data[0] if isinstance(data, list) and data else data
        who = await self._authenticate(request, creds)
        lifetime = float(self.bridge.opts.get("token_expire", DEFAULT_TOKEN_EXPIRE))
        loop = asyncio.get_running_loop()
        try:
            rec = await loop.run_in_executor(
                self.pool, lambda: self.tokens.create(who["user"], who["eauth"], who["perms"],
                                                      who["groups"], lifetime))
        except (StoreError, OSError) as exc:
            log.error("API: cannot store a token: %s", exc)
            raise ApiError(503, "The token store is unreachable") from None
        body = {"return": [{"token": rec["token"], "expire": rec["expire"], "start": rec["start"],
                            "user": rec["user"], "eauth": rec["eauth"],
                            "perms": rec["perms"] or {}}]}
        resp = self._reply(request, body)
        resp.headers["X-Auth-Token"] = rec["token"]
        resp.set_cookie("session_id", rec["token"], max_age=int(lifetime), path="/",
                        httponly=True, samesite="Lax", secure=request.secure)
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        """``POST /logout``: the token stops working on every master."""
        sess = await self._session(request)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.pool, self.tokens.delete, sess["token"])
        except (StoreError, OSError) as exc:
            log.error("API: cannot delete a token: %s", exc)
            raise ApiError(503, "The token store is unreachable") from None
        resp = self._reply(request, {"return": "Your token has been cleared"})
        resp.del_cookie("session_id", path="/")
        return resp

    # -- lowstate ------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        """``GET /``: a greeting and the client names."""
        return self._reply(request, {"return": "Welcome", "clients": list(SALT_CLIENTS)})

    async def _exec(self, chunks: list[dict], sess: dict) -> list[Any]:
        return [await self.lowstate.run(chunk, sess) for chunk in chunks]

    async def root_post(self, request: web.Request) -> web.Response:
        """``POST /``: run lowstate chunks with the session's token."""
        sess = await self._session(request)
        chunks = await self._lowstate(request)
        return self._reply(request, {"return": await self._exec(chunks, sess)})

    async def run(self, request: web.Request) -> web.Response:
        """``POST /run``: lowstate with credentials or a ``token`` in each chunk (no session)."""
        chunks = await self._lowstate(request)
        out = []
        for chunk in chunks:
            token = chunk.get("token")
            if isinstance(token, str) and token:
                sess = self._with_perms(await self._token_record(token))
            else:
                sess = await self._authenticate(request, chunk)
            out.append(await self.lowstate.run(chunk, sess))
        return self._reply(request, {"return": out})

    async def minions_get(self, request: web.Request) -> web.Response:
        """``GET /minions[/<id>]``: ``grains.items`` of the minions (``local``)."""
        sess = await self._session(request)
        mid = request.match_info.get("mid") or "*"
        chunk = {"client": "local", "tgt": mid, "fun": "grains.items"}
        return self._reply(request, {"return": await self._exec([chunk], sess)})

    async def minions_post(self, request: web.Request) -> web.Response:
        """``POST /minions``: start jobs (``local_async``), answer their jids with 202."""
        sess = await self._session(request)
        chunks = await self._lowstate(request)
        for chunk in chunks:
            chunk["client"] = "local_async"
        jobs = await self._exec(chunks, sess)
        links = [{"href": f"/jobs/{j['jid']}"} for j in jobs if isinstance(j, dict) and j]
        return self._reply(request, {"return": jobs, "_links": {"jobs": links}}, status=202)

    async def jobs_get(self, request: web.Request) -> web.Response:
        """``GET /jobs``: the job list; ``GET /jobs/<jid>``: one job's info and returns."""
        sess = await self._session(request)
        jid = request.match_info.get("jid")
        if not jid:
            chunk = {"client": "runner", "fun": "jobs.list_jobs"}
            return self._reply(request, {"return": await self._exec([chunk], sess)})
        if not ids.valid_jid(jid):
            raise ApiError(400, "a jid is 20 digits YYYYMMDDhhmmssffffff that are a real time")
        self.lowstate.check_client("runner")
        if not eauth.Acl(list(sess.get("perms") or [])).allows_class("runner", "jobs.list_job"):
            raise ApiError(403, f"user {sess.get('user')} may not run runner jobs.list_job")
        load, rets = await self.bridge.job_info(jid)
        info: dict[str, Any] = {"jid": jid}
        if load:
            info.update(job_summary(load))
            info["Minions"] = list(load.get("minions") or [])
        info["Result"] = {mid: {"return": val} for mid, val in rets.items()}
        return self._reply(request, {"info": [info], "return": [rets]})

    async def keys_get(self, request: web.Request) -> web.Response:
        """``GET /keys``: every key by state; ``GET /keys/<id>``: one key's fingerprint."""
        sess = await self._session(request)
        mid = request.match_info.get("mid")
        chunk = ({"client": "wheel", "fun": "key.finger", "match": mid} if mid else
                 {"client": "wheel", "fun": "key.list_all"})
        res = await self.lowstate.run(chunk, sess)
        return self._reply(request, {"return": res.get("data", {}).get("return", {})})

    async def keys_post(self, request: web.Request) -> web.Response:
        """``POST /keys``: credentials + ``mid`` → a new accepted key, as a tar of
        ``minion.pub`` and ``minion.pem`` (salt-api's kickstart helper)."""
        data, _ = await self._body(request)
        creds = data[0] if isinstance(data, list) and data else data
        if not isinstance(creds, dict):
            raise ApiError(400, "Require \"username\", \"password\", \"eauth\" and \"mid\"")
        sess = await self._authenticate(request, creds)
        mid = creds.get("mid") or creds.get("id_")
        if not isinstance(mid, str) or not mid:
            raise ApiError(400, "Require \"mid\": the new minion's id")
        chunk: dict[str, Any] = {"client": "wheel", "fun": "key.gen_accept", "id_": mid}
        for field in ("keysize", "force"):
            if field in creds:
                chunk[field] = creds[field]
        if isinstance(chunk.get("keysize"), str) and chunk["keysize"].isdigit():
            chunk["keysize"] = int(chunk["keysize"])
        if isinstance(chunk.get("force"), str):
            chunk["force"] = chunk["force"].lower() in ("1", "true", "yes")
        res = await self.lowstate.run(chunk, sess)
        data_ = res.get("data", {})
        ret = data_.get("return")
        if not data_.get("success"):
            raise ApiError(400, str(ret))
        if not ret:
            raise ApiError(400, f"a key for {mid} exists already (force=true replaces it)")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, text, mode in (("minion.pub", ret["pub"], 0o644),
                                     ("minion.pem", ret["priv"], 0o600)):
                blob = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                info.mode = mode
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(blob))
        resp = web.Response(body=buf.getvalue(), content_type="application/x-tar")
        resp.headers["Content-Disposition"] = f'attachment; filename="saltkeys-{mid}.tar"'
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    # -- hooks, events, stats ------------------------------------------------------------------

    async def hook(self, request: web.Request) -> web.Response:
        """``POST /hook/<tag>``: an event ``salt/netapi/hook/<tag>`` with the request's data."""
        if not self.apiopts.get("webhook_disable_auth"):
            await self._session(request)
        data, raw = await self._body(request)
        sub = request.match_info.get("tag", "").strip("/")
        tag = "salt/netapi/hook" + (f"/{sub}" if sub else "")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("x-auth-token", "cookie", "authorization")}
        self.events.post(tag, {"body": raw, "post": data or {}, "headers": headers})
        return self._reply(request, {"success": True})

    async def events_get(self, request: web.Request) -> web.StreamResponse:
        """``GET /events``: Server-Sent Events of what this master's API knows (see docs)."""
        await self._session(request, allow_query=True)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"retry: 400\n\n")
        if self.events.bus is not None:
            return await self._stream_bus(request, resp)
        try:
            last = int(request.headers.get("Last-Event-ID", "") or self.events.seq)
        except ValueError:
            last = self.events.seq
        if not 0 <= last <= self.events.seq:  # another master's id (or garbage): from now on
            last = self.events.seq
        try:
            while True:
                for seq, tag, data in self.events.since(last):
                    last = seq
                    msg = _dump_json({"tag": tag, "data": data})
                    await resp.write(f"id: {seq}\ntag: {tag}\ndata: {msg}\n\n".encode())
                async with self.events.cond:
                    try:
                        await asyncio.wait_for(self.events.cond.wait(), timeout=15)
                    except TimeoutError:
                        await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    async def _stream_bus(self, request: web.Request,
                          resp: web.StreamResponse) -> web.StreamResponse:
        """``GET /events`` from the cluster bus: every event of every master, each ``id`` the
        stream position after it, so ``Last-Event-ID`` resumes on any master of the cluster
        (an unknown or malformed id starts from now)."""
        bus = self.events.bus
        try:
            pos = decode_position(request.headers.get("Last-Event-ID")) or bus.position()
        except ValueError:
            pos = bus.position()
        idle = 0.0
        try:
            while True:
                evs, pos = bus.read(pos, limit=500)
                for ev in evs:
                    msg = _dump_json({"tag": ev.tag, "data": ev.data})
                    await resp.write(f"id: {ev.cursor}\ntag: {ev.tag}\ndata: {msg}\n\n".encode())
                if evs:
                    idle = 0.0
                    continue
                await asyncio.sleep(BUS_POLL)
                idle += BUS_POLL
                if idle >= 15:
                    idle = 0.0
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /stats``: basic counters of this API server."""
        if not self.apiopts.get("stats_disable_auth"):
            await self._session(request)
        return self._reply(request, {"hamaster_api": {
            "master_id": self.bridge.master_id,
            "uptime_s": round(time.time() - self.started, 3),
            "requests_by_code": dict(sorted(self.codes.items())),
            "events_buffered": len(self.events.buf),
        }})


def _ssl_context(apiopts: dict) -> ssl.SSLContext | None:
    if apiopts.get("disable_ssl"):
        return None
    crt, key = apiopts.get("ssl_crt"), apiopts.get("ssl_key")
    if not crt or not key:
        raise OSError("rest_cherrypy: set ssl_crt and ssl_key (a certificate and its key), or "
                      "disable_ssl: true")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


class ApiService:
    """The API server's thread: its own event loop, aiohttp runner and worker pool."""

    def __init__(self, bridge: MasterBridge, apiopts: dict) -> None:
        """``bridge``: the master's door (its ``emit``/``event_bus`` feed ``GET /events``);
        ``apiopts``: the ``rest_cherrypy`` block (:func:`hamaster.api.api_options`)."""
        self.bridge = bridge
        self.apiopts = apiopts
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runner: web.AppRunner | None = None
        self.address = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.pool = ThreadPoolExecutor(max_workers=int(apiopts.get("thread_pool", 8)),
                                       thread_name_prefix="api-worker")

    def _token_store(self) -> TokenStore:
        store = self.bridge.store
        opts = self.bridge.opts
        if store is None:
            from hamaster.store.fs import FsStore

            path = os.path.join(opts["cachedir"], "api")
            os.makedirs(path, mode=0o700, exist_ok=True)
            store = FsStore(path)
        return TokenStore(store, cache_ttl=min(float(opt(opts, "ha_poll_interval")), 1.0))

    async def start(self) -> None:
        """Start the thread and wait until the port is bound (raises ``OSError`` if not)."""
        self.thread = threading.Thread(target=self._main, name="rest-api", daemon=True)
        self.thread.start()
        await asyncio.to_thread(self._ready.wait, 30)
        if self._error is not None:
            raise OSError(f"REST API failed to start: {self._error}") from self._error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() / logged
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("REST API stopped with an error")
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        bridge = self.bridge
        bus = bridge.event_bus
        events = EventLog(asyncio.get_running_loop(), bus=bus,
                          emit=bridge.emit if bus is not None else None)
        tokens = self._token_store()
        app = ApiApp(bridge, self.apiopts, tokens, self.pool, events)

        def key_event(mid: str, old: Any, new: Any) -> None:
            events.post(f"salt/key/{mid}", {"id": mid, "old": getattr(old, "value", None),
                                            "act": getattr(new, "value", "delete")})

        if bus is None:  # with a bus, the master's event services put salt/key events on it
            bridge.keys.on_change(key_event)
        debug = bool(self.apiopts.get("debug"))
        self.runner = web.AppRunner(app.make_app(), access_log=log if debug else None,
                                    handle_signals=False, shutdown_timeout=2.0)
        await self.runner.setup()
        host = str(self.apiopts.get("host", "0.0.0.0"))
        port = int(self.apiopts.get("port", DEFAULT_PORT))
        ctx = _ssl_context(self.apiopts)
        site = web.TCPSite(self.runner, host, port, ssl_context=ctx, reuse_address=True)
        await site.start()
        scheme = "https" if ctx else "http"
        self.address = f"{scheme}://{host}:{port}"
        log.info("REST API (rest_cherrypy) on %s", self.address)
        self._ready.set()
        purge = asyncio.create_task(self._purge(tokens))
        try:
            await self._stop.wait()
        finally:
            purge.cancel()
            await self.runner.cleanup()

    async def _purge(self, tokens: TokenStore) -> None:
        """Delete expired tokens from the store now and then (every master does; harmless)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(300)
            try:
                n = await loop.run_in_executor(self.pool, tokens.purge_expired)
                if n:
                    log.info("API: purged %d expired token(s)", n)
            except Exception as exc:
                log.debug("API: token purge failed: %s", exc)

    def close(self) -> None:
        """Stop serving and join the thread (blocking: call from a thread)."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
