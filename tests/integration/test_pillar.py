"""Pillar from the shared store, identical through every master (issue #13).

Two masters on the fs backend share ``ha_dir``; the pillar tree lives in
``ha_dir/pillar_roots/base/`` (top by grain and by glob, an include, a ``map.jinja`` import).
A hamaster minion and a stock salt-minion 3008.5 (when its venv is available) list both
masters. Every process is real and stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from hamaster.bus import messages
from hamaster.config import load_minion_config
from hamaster.minion.connection import MasterConnection
from hamaster.minion.identity import MinionIdentity
from tests.integration.harness import Cluster
from tests.integration.interop import saltenv
from tests.kit import free_port, wait_until

TREE = {
    "top.sls": (
        "base:\n"
        "  '*':\n    - common\n"
        "  'role:web':\n    - match: grain\n    - web\n"
        "  'db*':\n    - db\n"
    ),
    "common.sls": "common:\n  motd: hello {{ grains['id'] }}\n  tz: UTC\n",
    "map.jinja": (
        "{% set web = salt['grains.filter_by']({'web': {'port': 80}, 'default': {'port': 8080}},"
        " grain='role') %}\n"
    ),
    "web/init.sls": (
        "include:\n  - .users\n"
        "{% from 'map.jinja' import web with context %}\n"
        "web:\n  port: {{ web.port }}\n  vhosts: [a, b]\n"
    ),
    "web/users.sls": "web:\n  users: [alice]\n  port: 1\n",
    "db.sls": "db:\n  engine: postgres\n  secret: s3cr3t-{{ grains['id'] }}\n",
}

WEB1 = {"common": {"motd": "hello web1", "tz": "UTC"},
        "web": {"users": ["alice"], "port": 80, "vhosts": ["a", "b"]}}
DB1 = {"common": {"motd": "hello db1", "tz": "UTC"},
       "db": {"engine": "postgres", "secret": "s3cr3t-db1"}}
POLL = 0.2


def _write_tree(root: Path) -> None:
    for rel, text in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _pillar_items(c: Cluster, tgt: str, master: int) -> dict:
    res = c.run("hamaster", "--out", "json", "--static", "-t", "15", tgt, "pillar.items",
                master=master, timeout=60)
    try:
        return json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        return {}


def _stock_bin(version: str) -> Path | None:
    try:
        return saltenv.ensure_salt(version)
    except (RuntimeError, OSError):
        return None


@pytest.fixture
def pillar_cluster(cluster: Cluster) -> dict[str, Any]:
    shared = cluster.base / "ha"
    tree = shared / "pillar_roots" / "base"
    _write_tree(tree)
    pub = free_port()
    ret = free_port()
    for host in ("127.0.0.1", "127.0.0.2"):
        cluster.add_master({"ha_dir": str(shared), "auto_accept": True, "publish_port": pub,
                            "ret_port": ret, "ha_poll_interval": POLL,
                            "pillar_roots": {"base": [str(cluster.base / "no-local")]},
                            "nodegroups": {"webs": "I@web:port:80 or L@nobody",
                                           "all": "N@webs or G@role:db"}},
                           host=host)
    for mid, role, ip in (("web1", "web", "10.0.0.1"), ("db1", "db", "10.0.0.2")):
        cluster.add_minion(mid, extra={"grains": {"role": role}, "mine_functions": {
            "ip": [{"mine_function": "test.echo"}, ip]}})
    cluster.wait_all_answer(["web1", "db1"], master=0)
    cluster.wait_all_answer(["web1", "db1"], master=1)
    return {"shared": shared, "tree": tree, "pub": pub}


def test_pillar_items_equal_through_both_masters_and_live_edit(
        pillar_cluster: dict[str, Any], cluster: Cluster) -> None:
    for master in (0, 1):
        assert _pillar_items(cluster, "*", master) == {"web1": WEB1, "db1": DB1}
    res = cluster.run("hamaster", "--out", "json", "--static", "web1", "pillar.get", "web:port",
                      master=1, check=True)
    assert json.loads(res.stdout) == {"web1": 80}
    res = cluster.run("hamaster", "--out", "json", "--static", "web1", "pillar.get", "nope:x",
                      "default=dflt", master=0, check=True)
    assert json.loads(res.stdout) == {"web1": "dflt"}
    # edit the tree in place (the fs store is the shared directory): B serves it at once
    (pillar_cluster["tree"] / "common.sls").write_text("common:\n  motd: edited\n")
    t0 = time.monotonic()
    wait_until(lambda: _pillar_items(cluster, "web1", 1).get("web1", {}).get("common")
               == {"motd": "edited"}, 20, interval=0.05, what="edited pillar through B")
    took = time.monotonic() - t0
    assert took < 10, took  # one CLI round trip plus at most the snapshot ttl (POLL)
    # saltutil.refresh_pillar keeps the new pillar for pillar.get
    res = cluster.run("hamaster", "--out", "json", "--static", "web1", "saltutil.refresh_pillar",
                      master=0, check=True)
    assert json.loads(res.stdout) == {"web1": True}
    res = cluster.run("hamaster", "--out", "json", "--static", "web1", "pillar.get",
                      "common:motd", master=0, check=True)
    assert json.loads(res.stdout) == {"web1": "edited"}
    # a broken file: _errors for the minions that use it, the others are unaffected
    (pillar_cluster["tree"] / "db.sls").write_text("db: [unclosed\n")
    got = wait_until(lambda: (p := _pillar_items(cluster, "*", 0)) and "_errors" in p.get("db1", {})
                     and p, 20, what="_errors for db1")
    assert got["db1"]["_errors"] == [
        "Rendering SLS 'db' failed. Please see master log for details."]
    assert "_errors" not in got["web1"]
    status = json.loads(cluster.run("hamaster-run", "--out", "json", "cluster.status",
                                    master=1, check=True).stdout)
    hashes = {m["pillar_hash"] for m in status["masters"].values()}
    assert all(len(h) == 64 for h in hashes), status


async def _pillar_requests(opts: dict, mid: str, host: str, port: int) -> dict[str, Any]:
    """Authenticate as ``mid`` (its real key) and send ``_pillar`` three ways."""
    ident = MinionIdentity(opts, mid)
    ctx = zmq.asyncio.Context()
    conn = MasterConnection(ident, ctx, host, port, lambda c, load: None)
    out: dict[str, Any] = {}
    try:
        conn.start()
        await asyncio.wait_for(conn.connected_event.wait(), 20)
        out["own"] = await conn.request_pillar({"id": mid, "role": "db"})
        assert conn.session is not None
        for name, env_id in (("forged_load_id", mid), ("forged_envelope_id", "web1")):
            nonce = messages.new_nonce()
            load = {"id": "web1", "grains": {"id": "web1", "role": "web"}, "cmd": "_pillar",
                    "ver": "2", "pillar_override": {}, "pillarenv": None, "saltenv": None}
            body = messages.stamp_load(load, "web1", ident.tok, nonce)
            frame = messages.aes_request(env_id, conn.session, body)
            reply = await conn._roundtrip(frame, 10)
            try:
                out[name] = messages.parse_pillar_reply(
                    reply, minion_priv=ident.priv, master_pub=conn.master_pub, nonce=nonce)
            except Exception as exc:  # refused: a bare "bad load", never web1's pillar
                out[name] = f"refused: {type(exc).__name__}"
            out[name + "_raw"] = reply
    finally:
        await conn.stop()
        ctx.term()
    return out


def test_forged_id_cannot_get_another_minions_pillar(
        pillar_cluster: dict[str, Any], cluster: Cluster) -> None:
    opts = load_minion_config(cluster.base / "minion-db1" / "conf")
    m = cluster.masters[1]
    got = asyncio.run(_pillar_requests(opts, "db1", m["host"], m["conf"]["ret_port"]))
    assert got["own"] == DB1  # the same code path with db1's own id works
    for name in ("forged_load_id", "forged_envelope_id"):
        assert str(got[name]).startswith("refused"), got[name]
        assert b"hello web1" not in got[name + "_raw"]
    assert "load id does not match envelope id" in m["proc"].log_text()


@pytest.mark.parametrize("version", saltenv.SALT_VERSIONS)
def test_stock_minion_pillar_through_both_masters(
        pillar_cluster: dict[str, Any], cluster: Cluster, version: str) -> None:
    bin_dir = _stock_bin(version)
    if bin_dir is None:
        pytest.skip(f"no salt {version} venv")
    addrs = [f"{m['host']}:{m['conf']['ret_port']}" for m in cluster.masters]
    mn = saltenv.SaltMinionProc(bin_dir, cluster.base / "stock", "web-stock", addrs, extra={
        "publish_port": pillar_cluster["pub"], "grains": {"role": "web"},
        "pillar_mask_output": False})
    try:
        mn.start()
        want = {"common": {"motd": "hello web-stock", "tz": "UTC"}, "web": WEB1["web"]}
        for master in (0, 1):
            wait_until(lambda m=master: _pillar_items(cluster, "web-stock", m).get("web-stock")
                       == want, 90, interval=0.5, what=f"stock pillar via master{master}")
        # 3008.5's pillar.get masks string values (`**********`) unless unmask=True
        unmask = ["unmask=True"] if version.startswith("3008") else []
        res = cluster.run("hamaster", "--out", "json", "--static", "-t", "15", "web-stock",
                          "pillar.get", "web:users", *unmask, master=1, timeout=60)
        assert json.loads(res.stdout) == {"web-stock": ["alice"]}, res.stdout
        # a state whose file.managed template reads pillar, file from the shared file_roots
        states = pillar_cluster["shared"] / "file_roots" / "base" / "app"
        states.mkdir(parents=True)
        dest = cluster.base / "stock-app.conf"
        (states / "init.sls").write_text(
            f"app-conf:\n  file.managed:\n    - name: {dest}\n"
            "    - source: salt://app/app.conf.j2\n    - template: jinja\n")
        (states / "app.conf.j2").write_text(
            "port={{ pillar['web']['port'] }} users={{ salt['pillar.get']('web:users')|join(',') }}"
            " motd={{ pillar.common.motd }}\n")
        res = cluster.run("hamaster", "--out", "json", "--static", "-t", "60", "web-stock",
                          "state.apply", "app", master=1, timeout=120)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert dest.read_text() == "port=80 users=alice motd=hello web-stock\n"
        # mine: the stock minion reads the hamaster minions' mine, and sends its own
        assert _json(cluster, "web-stock", "mine.get", "*", "ip", master=0) == {
            "web-stock": {"web1": "10.0.0.1", "db1": "10.0.0.2"}}
        assert _json(cluster, "web-stock", "mine.send", "test.echo", "stock-mined",
                     master=0) == {"web-stock": True}
        wait_until(lambda: _json(cluster, "db1", "mine.get", "web-stock", "test.echo", master=1)
                   == {"db1": {"web-stock": "stock-mined"}}, 20, interval=0.2,
                   what="stock minion's mine through B")
        # master A killed: B still serves the same pillar
        cluster.masters[0]["proc"].kill()
        assert _pillar_items(cluster, "web-stock", 1).get("web-stock") == want
    finally:
        mn.stop()


def _json(c: Cluster, *args: str, master: int) -> Any:
    res = c.run("hamaster", "--out", "json", "--static", "-t", "15", *args, master=master,
                timeout=60)
    try:
        return json.loads(res.stdout) if res.stdout.strip() else None
    except json.JSONDecodeError:
        return None


def test_pillar_targeting_and_mine_from_any_master(
        pillar_cluster: dict[str, Any], cluster: Cluster) -> None:
    mine = {"web1": "10.0.0.1", "db1": "10.0.0.2"}
    for master in (0, 1):
        # -I is judged on the minion data cache, filled by whichever master compiled the pillar
        assert _json(cluster, "-I", "web:port:80", "test.ping", master=master) == {"web1": True}
        assert _json(cluster, "-C", "I@db:engine:postgres or L@nobody", "test.ping",
                     master=master) == {"db1": True}
        # the mine was sent once (mine.update at start) through one master, read through both
        wait_until(lambda m=master: _json(cluster, "db1", "mine.get", "*", "ip", master=m)
                   == {"db1": mine}, 20, interval=0.2, what=f"mine.get through master{master}")
    assert _json(cluster, "-N", "webs", "test.ping", master=1) == {"web1": True}
    assert _json(cluster, "-C", "N@all and not web*", "test.ping", master=0) == {"db1": True}
    assert _json(cluster, "web1", "mine.get", "G@role:db and I@db:engine:post*", "ip",
                 "tgt_type=compound",
                 master=1) == {"web1": {"db1": "10.0.0.2"}}
    # kill A: B still answers the same mine and pillar targeting
    cluster.masters[0]["proc"].kill()
    assert _json(cluster, "db1", "mine.get", "*", "ip", master=1) == {"db1": mine}
    assert _json(cluster, "-I", "web:port:80", "test.ping", master=1) == {"web1": True}
    assert _json(cluster, "web1", "mine.delete", "ip", master=1) == {"web1": True}
    wait_until(lambda: _json(cluster, "db1", "mine.get", "*", "ip", master=1)
               == {"db1": {"db1": "10.0.0.2"}}, 20, interval=0.2, what="mine.delete seen")
    # deleting a key clears the minion's cached data from the store (as salt-key -d does)
    record = pillar_cluster["shared"] / "minion_data" / "db1" / "pillar"
    assert record.exists()
    cluster.run("hamaster-key", "-d", "db1", "-y", master=1, check=True)
    wait_until(lambda: not record.exists(), 20, what="db1's cached data removed")


def test_pillar_on_etcd_push_and_mine(cluster: Cluster) -> None:
    """Two masters on etcd: pillar.push on A, pillar through B within a second; mine via B."""
    from tests.integration.services import etcd_server

    try:
        ctx = etcd_server()
        etcd = ctx.__enter__()
    except Exception as exc:  # no etcd binary
        pytest.skip(f"etcd unavailable: {exc}")
    try:
        # master0 has a local fallback file master1 lacks: not used by the top, but the trees
        # differ, and cluster.status says so
        local0 = cluster.base / "local0"
        local0.mkdir()
        (local0 / "extra.sls").write_text("extra: 1\n")
        # Same ports on two loopback addresses: a stock minion has one publish_port for all
        pub = free_port()
        ret = free_port()
        for local, host in ((local0, "127.0.0.1"), (cluster.base / "no-local", "127.0.0.2")):
            cluster.add_master({"ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                                "ha_etcd_prefix": "/hm-pillar", "auto_accept": True,
                                "publish_port": pub, "ret_port": ret,
                                "pillar_roots": {"base": [str(local)]}}, host=host)
        cluster.add_minion("web1", extra={"grains": {"role": "web"}, "mine_functions": {
            "ip": [{"mine_function": "test.echo"}, "10.0.0.1"]}})
        cluster.wait_all_answer(["web1"], master=0)
        cluster.wait_all_answer(["web1"], master=1)
        src = cluster.base / "src"
        _write_tree(src)
        res = cluster.run("hamaster-run", "--out", "json", "pillar.push", str(src),
                          "saltenv=base", master=0, check=True)
        assert json.loads(res.stdout)["files"] == len(TREE)
        assert _pillar_items(cluster, "web1", 1) == {"web1": WEB1}
        # a stock salt-minion 3008.5 listing both etcd masters: the same pillar through each
        bin_dir = _stock_bin("3008.5")
        if bin_dir is not None:
            stock = saltenv.SaltMinionProc(
                bin_dir, cluster.base / "stock", "web-stock",
                [f"{m['host']}:{ret}" for m in cluster.masters],
                extra={"publish_port": pub, "grains": {"role": "web"},
                       "pillar_mask_output": False})
            try:
                stock.start()
                want = {**WEB1, "common": {"motd": "hello web-stock", "tz": "UTC"}}
                for master in (0, 1):
                    wait_until(lambda m=master: _pillar_items(cluster, "web-stock", m).get(
                        "web-stock") == want, 90, interval=0.5,
                        what=f"stock pillar via etcd master{master}")
            finally:
                stock.stop()
            cluster.run("hamaster-key", "-d", "web-stock", "-y", master=0, check=True)
        # edit and push through A: B serves it within a second
        (src / "common.sls").write_text("common:\n  motd: pushed\n")
        cluster.run("hamaster-run", "pillar.push", str(src), master=0, check=True)
        t0 = time.monotonic()
        wait_until(lambda: _pillar_items(cluster, "web1", 1).get("web1", {}).get("common")
                   == {"motd": "pushed"}, 10, interval=0.05, what="pushed pillar through B")
        assert time.monotonic() - t0 < 1.0 + 2.0  # 1 s objective plus one CLI round trip
        assert _json(cluster, "web1", "mine.get", "*", "ip", master=1) == {
            "web1": {"web1": "10.0.0.1"}}
        assert _json(cluster, "-I", "web:port:80", "test.ping", master=0) == {"web1": True}

        def pillar_drift() -> bool:
            res = cluster.run("hamaster-run", "--out", "json", "cluster.status", master=1)
            return bool(res.stdout.strip()) and json.loads(res.stdout)["drift"]["pillar"]
        wait_until(pillar_drift, 30, interval=0.5, what="pillar drift flagged")
        res = cluster.run("hamaster-run", "--out", "json", "pillar.show_pillar", "web1",
                          master=1, check=True)
        assert json.loads(res.stdout) == {**WEB1, "common": {"motd": "pushed"}}
    finally:
        for m in cluster.masters:
            m["proc"].stop()
        ctx.__exit__(None, None, None)
