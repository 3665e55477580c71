"""The REST API with real clients: salt-pepper, urllib, a round-robin balancer, two masters.

One module-wide cluster (two masters sharing an fs ``ha_dir``, each serving the API; minions
web1 and db1 connected to both) keeps the file fast. The balancer test kills master1 and so
runs last.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import BIN, Cluster
from tests.kit import free_port, wait_until

ALL_CLIENTS = ["local", "local_async", "runner", "wheel"]
PEPPER = BIN / "pepper"
needs_pepper = pytest.mark.skipif(not PEPPER.exists(),
                                  reason="salt-pepper is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def api() -> Iterator[dict[str, Any]]:
    """Two HA masters with the API on, minions web1 and db1, users in a text file."""
    c = Cluster.create()
    try:
        users = c.base / "api-users"
        users.write_text("alice:secret\nbob:bobpw\ncarol:carolpw\nerin:erinpw\n")
        shared = c.base / "shared"
        shared.mkdir()
        ext = {"file": {"^filename": str(users),
                        "alice": [".*", "@runner", "@wheel"],
                        "bob": [{"web*": ["test.*", "cmd.run"]}],
                        "carol": ["test.ping", "test.echo"],
                        "erin": ["test.ping"]}}
        ports = []
        metrics = free_port()
        for i in range(2):
            port = free_port()
            ports.append(port)
            extra = {"ha_dir": str(shared), "auto_accept": True, "external_auth": ext,
                     "netapi_enable_clients": ALL_CLIENTS,
                     "rest_cherrypy": {"port": port, "host": "127.0.0.1", "disable_ssl": True,
                                       "login_max_failures": 3}}
            if i == 0:
                extra["metrics_port"] = metrics
            c.add_master(extra)
        for port in ports:
            wait_api(port)
        c.add_minion("web1")
        c.add_minion("db1")
        c.wait_all_answer(["web1", "db1"], master=0)
        c.wait_all_answer(["web1", "db1"], master=1)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        yield {"cluster": c, "urls": urls, "metrics": metrics, "base": c.base}
    finally:
        c.close()


def wait_api(port: int) -> None:
    """Wait until the API accepts connections (it binds just after the CLI socket)."""
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(up, 20, what=f"API on port {port}")


def call(url: str, path: str, data: Any = None, token: str | None = None,
         ctype: str = "application/json", method: str | None = None,
         raw: bytes | None = None, timeout: float = 30) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON body or text)."""
    body = raw if raw is not None else (json.dumps(data).encode() if data is not None else None)
    req = urllib.request.Request(url + path, body, {"Content-Type": ctype,
                                                    "Accept": "application/json"},
                                 method=method)
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def login(url: str, user: str = "alice", password: str = "secret") -> str:
    status, out = call(url, "/login", {"username": user, "password": password, "eauth": "file"})
    assert status == 200, out
    return out["return"][0]["token"]


def pepper(api: dict, *args: str, url: int = 0, password: str = "secret",
           cache: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real salt-pepper CLI (PyPI) against master ``url``."""
    env = {**os.environ, "HOME": str(api["base"]), "PEPPERRC": str(api["base"] / "nopepperrc")}
    argv = [str(PEPPER), "-u", api["urls"][url], "-a", "file", "--username", "alice",
            "--password", password]
    if cache is not None:
        argv += ["-T", "-x", str(cache)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env)


# -- pepper --------------------------------------------------------------------------------------


@needs_pepper
def test_pepper_login_ping_runner_wheel_and_token_reused_on_the_other_master(api: dict) -> None:
    cache = api["base"] / "peppercache"
    res = pepper(api, "*", "test.ping", cache=cache)
    assert res.returncode == 0, res.stderr
    ret = json.loads(res.stdout)["return"][0]
    assert {m: r["ret"] for m, r in ret.items()} == {"web1": True, "db1": True}
    jid = ret["web1"]["jid"]
    token = json.loads(cache.read_text())["token"]

    res = pepper(api, "--client", "runner", "jobs.lookup_jid", f"jid={jid}", cache=cache)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["return"][0]["return"] == {"web1": True, "db1": True}

    res = pepper(api, "--client", "wheel", "key.list_all", cache=cache)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)["return"][0]["data"]
    assert data["success"] and set(data["return"]["minions"]) == {"web1", "db1"}

    # pepper pointed at master1 with the cached token and a wrong password: it does not log in
    # again (that would fail), the token issued by master0 works there
    res = pepper(api, "-L", "web1", "test.ping", url=1, password="wrong", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["return"][0]["web1"]["ret"] is True
    assert json.loads(cache.read_text())["token"] == token
    # and plain urllib with the header on master1
    status, out = call(api["urls"][1], "/keys", token=token)
    assert status == 200 and set(out["return"]["minions"]) >= {"web1", "db1"}


@needs_pepper
def test_pepper_wrong_password_is_refused(api: dict) -> None:
    res = pepper(api, "*", "test.ping", password="nope")
    assert res.returncode != 0
    assert "Authentication denied" in res.stdout + res.stderr


# -- the salt-api shapes -------------------------------------------------------------------------


def test_login_shape_cookie_and_form_body(api: dict) -> None:
    url = api["urls"][0]
    form = b"username=alice&password=secret&eauth=file"
    req = urllib.request.Request(url + "/login", form,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req) as resp:
        out = json.loads(resp.read())
        cookie = resp.headers["Set-Cookie"]
        header = resp.headers["X-Auth-Token"]
    rec = out["return"][0]
    assert set(rec) == {"token", "expire", "start", "user", "eauth", "perms"}
    assert rec["user"] == "alice" and rec["eauth"] == "file"
    assert rec["perms"] == [".*", "@runner", "@wheel"]
    assert abs(rec["expire"] - rec["start"] - 43200) < 1
    assert header == rec["token"] and f"session_id={rec['token']}" in cookie
    # the session cookie alone authenticates
    req = urllib.request.Request(url + "/", json.dumps(
        {"client": "local", "tgt": "web1", "fun": "test.echo", "arg": ["hi"]}).encode(),
        {"Content-Type": "application/json", "Cookie": f"session_id={rec['token']}"})
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read()) == {"return": [{"web1": "hi"}]}


def test_lowstate_clients_minions_jobs_and_keys(api: dict) -> None:
    url = api["urls"][0]
    tok = login(url)
    status, out = call(url, "/", [{"client": "local", "tgt": "web1,db1", "tgt_type": "list",
                                   "fun": "test.arg", "arg": ["a", "k=v"],
                                   "kwarg": {"x": 1}}], tok)
    assert status == 200
    assert out["return"][0]["web1"]["args"] == ["a"]
    assert out["return"][0]["web1"]["kwargs"]["k"] == "v"
    assert out["return"][0]["web1"]["kwargs"]["x"] == 1
    status, out = call(url, "/minions", [{"tgt": "*", "fun": "test.ping"}], tok)
    assert status == 202
    jid = out["return"][0]["jid"]
    assert sorted(out["return"][0]["minions"]) == ["db1", "web1"]
    assert out["_links"]["jobs"] == [{"href": f"/jobs/{jid}"}]

    def job_done() -> Any:
        s, o = call(api["urls"][1], f"/jobs/{jid}", token=tok)  # the other master's view
        return o if s == 200 and o["return"][0] == {"web1": True, "db1": True} else None

    job = wait_until(job_done, 20, interval=0.1, what="job returns on master1")
    assert job["info"][0]["Function"] == "test.ping"
    assert sorted(job["info"][0]["Minions"]) == ["db1", "web1"]
    status, out = call(url, "/jobs", token=tok)
    assert status == 200 and jid in out["return"][0]
    status, out = call(url, "/minions/web1", token=tok)
    assert status == 200 and out["return"][0]["web1"]["id"] == "web1"
    status, out = call(url, "/keys/web1", token=tok)
    assert status == 200 and ":" in out["return"]["minions"]["web1"]
    status, out = call(url, "/", [{"client": "runner", "fun": "no.such"}], tok)
    assert status == 200 and "not available" in out["return"][0]
    status, out = call(url, "/", [{"client": "local", "tgt": "nomatch*", "fun": "test.ping"}],
                       tok)
    assert (status, out) == (200, {"return": [{}]})
    status, out = call(url, "/", {"client": "local", "tgt": "*", "fun": "test.ping"},
                       tok, ctype="application/x-yaml", raw=b"client: local\ntgt: web1\n"
                       b"fun: test.ping\n")
    assert (status, out) == (200, {"return": [{"web1": True}]})


def test_run_takes_credentials_or_a_token_per_chunk(api: dict) -> None:
    url = api["urls"][1]
    tok = login(api["urls"][0])
    ping = {"client": "local", "tgt": "web1", "fun": "test.ping"}
    assert call(url, "/run", [{**ping, "token": tok}]) == (200, {"return": [{"web1": True}]})
    creds = {"username": "alice", "password": "secret", "eauth": "file"}
    assert call(url, "/run", [{**ping, **creds}]) == (200, {"return": [{"web1": True}]})
    assert call(url, "/run", [{**ping, "token": "ab" * 20}])[0] == 401
    assert call(url, "/run", [{**ping, **creds, "password": "bad"}])[0] == 401


def test_post_keys_returns_an_accepted_keypair_as_tar(api: dict) -> None:
    url = api["urls"][0]
    form = b"mid=kick1&username=alice&password=secret&eauth=file"
    req = urllib.request.Request(url + "/keys", form,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"] == "application/x-tar"
        blob = resp.read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = {m.name: m for m in tar.getmembers()}
        assert set(names) == {"minion.pub", "minion.pem"}
        pub = tar.extractfile(names["minion.pub"]).read().decode()
    assert "PUBLIC KEY" in pub
    tok = login(api["urls"][1])
    wait_until(lambda: call(api["urls"][1], "/keys/kick1", token=tok)[1]
               .get("return", {}).get("minions", {}).get("kick1"), 10, what="kick1 on master1")
    status, out = call(url, "/", [{"client": "wheel", "fun": "key.delete", "match": "kick1"}],
                       tok)
    assert status == 200 and out["return"][0]["data"]["success"]
    # bob may not use the wheel: 403
    req = urllib.request.Request(url + "/keys", b"mid=kick2&username=bob&password=bobpw&eauth=file",
                                 {"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 403


# -- ACLs, refusals, metrics ---------------------------------------------------------------------


def test_acl_refusals_are_403(api: dict) -> None:
    url = api["urls"][1]
    tok = login(url, "bob", "bobpw")
    assert call(url, "/", [{"client": "local", "tgt": "web1", "fun": "test.ping"}], tok) == (
        200, {"return": [{"web1": True}]})
    status, out = call(url, "/", [{"client": "local", "tgt": "web1", "fun": "cmd.run",
                                   "arg": ["echo ok"]}], tok)
    assert (status, out["return"][0]["web1"]) == (200, "ok")
    status, _ = call(url, "/", [{"client": "local", "tgt": "web1", "fun": "pkg.install",
                                 "arg": ["x"]}], tok)
    assert status == 403
    status, _ = call(url, "/", [{"client": "local", "tgt": "db1", "fun": "test.ping"}], tok)
    assert status == 403
    status, _ = call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping"}], tok)
    assert status == 403
    for chunk in ({"client": "runner", "fun": "jobs.list_jobs"},
                  {"client": "wheel", "fun": "key.list_all"}):
        assert call(url, "/", [chunk], tok)[0] == 403
    assert call(url, "/keys", token=tok)[0] == 403
    assert call(url, "/jobs", token=tok)[0] == 403
    log = api["cluster"].masters[1]["proc"].log_text()
    assert "API: user bob refused test.ping on 'db1' (glob): not allowed by external_auth" in log


def test_bad_input_answers_4xx_and_is_counted(api: dict) -> None:
    url = api["urls"][0]
    tok = login(url)
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping"}])[0] == 401
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping"}],
                "ab" * 20)[0] == 401
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping"}],
                "zz-not-hex")[0] == 401
    assert call(url, "/", raw=b"[{not json", token=tok)[0] == 400
    assert call(url, "/", raw=b"\xff\xfe", token=tok)[0] == 400
    assert call(url, "/", 42, tok)[0] == 400
    assert call(url, "/", [1, 2], tok)[0] == 400
    assert call(url, "/", [{"client": "local", "tgt": 5, "fun": "test.ping"}], tok)[0] == 400
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": ["x"]}], tok)[0] == 400
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping",
                            "timeout": "soon"}], tok)[0] == 400
    assert call(url, "/", [{"client": "local", "tgt": "*", "fun": "test.ping",
                            "kwarg": [1]}], tok)[0] == 400
    status, out = call(url, "/", [{"client": "ssh", "tgt": "*", "fun": "test.ping"}], tok)
    assert status == 400 and "Client disabled: 'ssh'" in out["return"]
    assert call(url, "/", [{"client": "nope"}], tok)[0] == 400
    assert call(url, "/", raw=b"x", token=tok, ctype="application/octet-stream")[0] == 406
    bomb = b"a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    assert call(url, "/", raw=bomb, token=tok, ctype="application/x-yaml")[0] == 400
    assert call(url, "/", raw=b"[" + b" " * (2 * 1024 * 1024) + b"]", token=tok)[0] == 413
    assert call(url, "/nowhere", token=tok)[0] == 404
    assert call(url, "/login", method="PUT", raw=b"")[0] == 405
    # wrong passwords: 401, then 429 for that user and source once the limit (3) is reached
    for _ in range(3):
        assert call(url, "/login", {"username": "erin", "password": "x", "eauth": "file"})[0] == 401
    assert call(url, "/login", {"username": "erin", "password": "erinpw",
                                "eauth": "file"})[0] == 429
    assert call(url, "/login", {"username": "erin", "password": "erinpw",
                                "eauth": "pam-not-configured"})[0] == 429
    assert call(api["urls"][1], "/login", {"username": "erin", "password": "erinpw",
                                           "eauth": "file"})[0] == 200
    assert call(url, "/login", {"username": "alice", "password": "secret",
                                "eauth": "nope"})[0] == 401
    assert call(url, "/login", {"username": 1, "password": "x", "eauth": "file"})[0] == 400
    with urllib.request.urlopen(f"http://127.0.0.1:{api['metrics']}/metrics") as resp:
        text = resp.read().decode()
    counts = {line.split('code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines()
              if line.startswith("hamaster_api_requests_total{")}
    for code in ("200", "400", "401", "404", "405", "406", "413", "429"):
        assert counts.get(code, 0) >= 1, (code, counts)


def test_logout_on_one_master_invalidates_the_token_on_the_other(api: dict) -> None:
    tok = login(api["urls"][0])
    assert call(api["urls"][1], "/keys", token=tok)[0] == 200
    status, out = call(api["urls"][0], "/logout", {}, tok)
    assert (status, out) == (200, {"return": "Your token has been cleared"})
    t0 = time.monotonic()
    wait_until(lambda: call(api["urls"][1], "/keys", token=tok)[0] == 401, 5, interval=0.05,
               what="token refused on master1")
    assert time.monotonic() - t0 < 1.5  # one poll interval (0.2 s) plus a request
    assert call(api["urls"][0], "/keys", token=tok)[0] == 401


def _read_event(resp: http.client.HTTPResponse, tag: str, timeout: float = 10) -> dict:
    """Read SSE records until one with ``tag``; returns ``{"id", "tag", "data"}``."""
    deadline = time.monotonic() + timeout
    last_id = None
    while time.monotonic() < deadline:
        line = resp.readline().decode()
        if line.startswith("id: "):
            last_id = line[4:].strip()
        if line.startswith("data: "):
            evt = json.loads(line[6:])
            if evt["tag"] == tag:
                return {**evt, "id": last_id}
    raise AssertionError(f"no event {tag} within {timeout}s")


def test_hook_event_reaches_the_event_stream_and_resumes(api: dict) -> None:
    url = api["urls"][0]
    tok = login(url)
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/events?token={tok}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.readline() == b"retry: 400\n"
    status, out = call(url, "/hook/ci/build/done", {"sha": "abc"}, tok)
    assert (status, out) == (200, {"success": True})
    seen = _read_event(resp, "salt/netapi/hook/ci/build/done")
    conn.close()
    assert seen["data"]["post"] == {"sha": "abc"}
    assert "X-Auth-Token" not in seen["data"]["headers"]
    # an event while nobody listens; a client resuming with Last-Event-ID gets it, also from
    # the OTHER master (the cluster event bus: one stream, positions valid on every master)
    assert call(url, "/hook/ci/build/next", {"n": 2}, tok)[0] == 200
    assert call(url, "/hook/ci/build/third", {"n": 3}, tok)[0] == 200
    other = api["urls"][1]
    conn = http.client.HTTPConnection("127.0.0.1", int(other.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/events", headers={"X-Auth-Token": tok, "Last-Event-ID": seen["id"]})
    resp = conn.getresponse()
    tags = []
    deadline = time.monotonic() + 20
    while "salt/netapi/hook/ci/build/third" not in tags and time.monotonic() < deadline:
        line = resp.readline().decode()
        if line.startswith("data: "):
            evt = json.loads(line[6:])
            if evt["tag"].startswith("salt/netapi/hook/"):
                tags.append(evt["tag"])
                if evt["tag"].endswith("/next"):
                    assert evt["data"]["post"] == {"n": 2}
    conn.close()
    # no loss, no repeat: exactly the two hooks fired after the one already seen, in order
    assert tags == ["salt/netapi/hook/ci/build/next", "salt/netapi/hook/ci/build/third"], tags
    assert call(url, "/hook/x", {"a": 1})[0] == 401  # webhooks need a token by default
    assert call(url, "/events")[0] == 401


def test_fuzzed_requests_never_get_a_server_error(api: dict) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url = api["urls"][0]
    port = int(url.rsplit(":", 1)[1])
    tok = login(url, "carol", "carolpw")
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20) | st.sampled_from(["*", "web1", "test.ping", "local", "runner",
                                                  "wheel", "glob", "list", "compound"]),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                  max_size=4),
        max_leaves=12)
    chunk = st.dictionaries(st.sampled_from(["client", "tgt", "fun", "arg", "kwarg", "tgt_type",
                                             "timeout", "full_return", "match", "ret"]),
                            values, max_size=6)
    bodies = (st.lists(chunk, max_size=3).map(lambda v: json.dumps(v).encode())
              | chunk.map(lambda v: json.dumps(v).encode())
              | st.binary(max_size=200))
    paths = st.sampled_from(["/", "/login", "/logout", "/minions", "/minions/web1", "/jobs",
                             "/jobs/123", "/keys", "/keys/web1", "/hook/x", "/stats", "/run",
                             "/jobs/%00", "/keys/..%2f..", "/minions/*"])
    ctypes = st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                              "application/x-yaml", "text/plain", "text/html", ""])

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["GET", "POST"]), path=paths, body=bodies, ctype=ctypes,
           auth=st.sampled_from([tok, "", "junk", "ab" * 20]))
    def one(method: str, path: str, body: bytes, ctype: str, auth: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": ctype} if ctype else {}
        if auth:
            headers["X-Auth-Token"] = auth
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status < 500, (method, path, body, resp.status)

    one()


# -- two masters behind a round-robin balancer; one dies ------------------------------------------


class RoundRobinProxy:
    """A TCP balancer on loopback: each connection goes to the next backend that accepts it."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.next = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        for _ in range(len(self.backends)):
            addr = self.backends[self.next % len(self.backends)]
            self.next += 1
            try:
                upstream = socket.create_connection(addr, timeout=2)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return
        pair = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(pair), [], [], 30)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_one_token_through_a_balancer_survives_a_master_kill(api: dict) -> None:
    """100 mixed requests with one token, 4 at a time, through a round-robin balancer; master1
    is killed after 30 have been answered (others are in flight then): every request is
    answered, retried by the client when its connection broke."""
    from concurrent.futures import ThreadPoolExecutor

    c: Cluster = api["cluster"]
    ports = [int(u.rsplit(":", 1)[1]) for u in api["urls"]]
    proxy = RoundRobinProxy([("127.0.0.1", p) for p in ports])
    url = f"http://127.0.0.1:{proxy.port}"
    try:
        tok = login(url)
        _, out = call(url, "/", [{"client": "local_async", "tgt": "*", "fun": "test.ping"}], tok)
        jid = out["return"][0]["jid"]
        mixed = [
            ("/", [{"client": "local", "tgt": "*", "fun": "test.ping"}]),
            ("/keys", None),
            ("/", [{"client": "runner", "fun": "jobs.lookup_jid", "jid": jid}]),
            ("/", [{"client": "wheel", "fun": "key.list_all"}]),
            (f"/jobs/{jid}", None),
            ("/minions/web1", None),
            ("/stats", None),  # 7 kinds: /stats goes through both backends in turn
        ]
        done = threading.Semaphore(0)
        lock = threading.Lock()
        answered_by: list[tuple[float, str]] = []
        retries = [0]
        killed_at = [0.0]

        def one(i: int) -> Any:
            path, data = mixed[i % len(mixed)]
            try:
                for _attempt in range(5):
                    try:
                        status, out = call(url, path, data, tok, timeout=20)
                    except (OSError, http.client.HTTPException):
                        with lock:
                            retries[0] += 1
                        continue
                    if status in (502, 503):
                        with lock:
                            retries[0] += 1
                        continue
                    if status != 200:
                        return (i, path, status, out)
                    if path == "/stats":
                        with lock:
                            answered_by.append((time.monotonic(), out["hamaster_api"]["master_id"]))
                    if path == "/" and data[0]["client"] == "local" and out["return"][0] != {
                            "web1": True, "db1": True}:
                        return (i, path, out)
                    return None
                return (i, path, "no answer after 5 tries")
            finally:
                done.release()

        def killer() -> None:
            for _ in range(30):
                done.acquire()
            killed_at[0] = time.monotonic()
            c.masters[1]["proc"].kill()

        k = threading.Thread(target=killer)
        k.start()
        with ThreadPoolExecutor(4) as pool:
            failures = [f for f in pool.map(one, range(100)) if f is not None]
        k.join()
        assert failures == []
        assert not c.masters[1]["proc"].running()
        before = {m for t, m in answered_by if t < killed_at[0]}
        after = {m for t, m in answered_by if t > killed_at[0]}
        assert before == {"master0", "master1"}, answered_by
        assert after == {"master0"}, answered_by
        # master1 back: the token (in the shared store) works there with no new login
        c.masters[1]["proc"].start()
        c.wait_master_ready(c.masters[1])

        def stats_on_master1() -> Any:
            try:
                status, out = call(api["urls"][1], "/stats", token=tok)
            except OSError:
                return None
            return out if status == 200 else None

        out = wait_until(stats_on_master1, 20, what="master1's API back")
        assert out["hamaster_api"]["master_id"] == "master1"
    finally:
        proxy.close()


# -- TLS -----------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = directory / "api.crt", directory / "api.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_tls_with_ssl_crt_and_key_and_a_clear_error_without(cluster: Cluster) -> None:
    import ssl

    crt, key = _self_signed(cluster.base)
    users = cluster.base / "users"
    users.write_text("alice:secret\n")
    port = free_port()
    cluster.add_master({"rest_cherrypy": {"port": port, "host": "127.0.0.1",
                                          "ssl_crt": str(crt), "ssl_key": str(key)},
                        "external_auth": {"file": {"^filename": str(users), "alice": [".*"]}}})
    wait_api(port)
    ctx = ssl.create_default_context(cafile=str(crt))
    req = urllib.request.Request(f"https://127.0.0.1:{port}/login", json.dumps(
        {"username": "alice", "password": "secret", "eauth": "file"}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx) as resp:
        assert resp.status == 200 and "Secure" in resp.headers["Set-Cookie"]
        token = resp.headers["X-Auth-Token"]
    # netapi_enable_clients not set: Salt 3006+'s default, every client disabled
    req = urllib.request.Request(f"https://127.0.0.1:{port}/", json.dumps(
        {"client": "local", "tgt": "*", "fun": "test.ping"}).encode(),
        {"Content-Type": "application/json", "X-Auth-Token": token})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=ctx)
    assert err.value.code == 400
    assert "Client disabled: 'local'" in err.value.read().decode()
    with pytest.raises(OSError):  # plain HTTP is not served (refused or disconnected)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
    # neither certificates nor disable_ssl: the master refuses to start and says why
    info = cluster.add_master({"rest_cherrypy": {"port": free_port(), "host": "127.0.0.1"}},
                              start=False)
    proc = info["proc"].start()
    assert proc.popen is not None
    assert proc.popen.wait(timeout=30) != 0
    assert "set ssl_crt and ssl_key" in proc.log_text()


def test_slow_password_checks_do_not_hold_up_the_master(cluster: Cluster) -> None:
    """Three bcrypt logins (cost 13, ~0.9 s of CPU each) at once: they run in the API's worker
    threads, so a CLI publication through the master loop keeps coming back in well under one
    bcrypt check (on a loaded 2-core machine the CPU is shared, hence 0.8 s, not 0.1)."""
    import bcrypt

    from hamaster.localapi import LocalClient

    users = cluster.base / "htpasswd"
    users.write_text("slow:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(13)).decode() + "\n")
    port = free_port()
    m = cluster.add_master({
        "auto_accept": True,
        "rest_cherrypy": {"port": port, "host": "127.0.0.1", "disable_ssl": True},
        "external_auth": {"file": {"^filename": str(users), "^filetype": "htpasswd",
                                   "slow": [".*"]}}})
    cluster.add_minion("p1")
    cluster.wait_all_answer(["p1"])
    wait_api(port)
    url = f"http://127.0.0.1:{port}"
    results: list[int] = []

    def slow_login() -> None:
        results.append(call(url, "/login", {"username": "slow", "password": "pw",
                                            "eauth": "file"})[0])

    threads = [threading.Thread(target=slow_login) for _ in range(3)]
    sock_dir = str(Path(m["conf"]["root_dir"]) / "var/run/hamaster/master")
    t0 = time.monotonic()
    for t in threads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in threads):
        start = time.monotonic()
        with LocalClient(sock_dir, timeout=10) as client:
            client.send({"cmd": "publish", "tgt": "p1", "fun": "test.ping", "arg": [],
                         "timeout": 5})
            frames = list(client.stream())
        latencies.append(time.monotonic() - start)
        assert {"p1": True} in [{k: v.get("return") for k, v in f["ret"].items()}
                                for f in frames if "ret" in f]
    for t in threads:
        t.join()
    assert results == [200] * 3
    assert time.monotonic() - t0 > 0.8  # the logins really took a while …
    assert len(latencies) >= 2 and max(latencies) < 0.8, latencies  # … the master did not
