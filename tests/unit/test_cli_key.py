"""Tests for the ``hamaster-key`` command (salt-key compatible)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from hamaster.cli.key import main
from hamaster.pki_sync.keys import KeyState, generate_keypair, open_key_registry


@pytest.fixture(scope="module")
def pub() -> str:
    return generate_keypair(2048)[1].decode()


@pytest.fixture
def env(tmp_path, pub):
    confdir = tmp_path / "conf"
    confdir.mkdir()
    root = tmp_path / "root"
    (confdir / "master").write_text(f"root_dir: {root}\npki_dir: /pki\ncachedir: /cache\n")
    pki = root / "pki"
    reg = open_key_registry({"pki_dir": str(pki)})
    for mid in ("web1", "web2", "db1"):
        reg.authorize(mid, pub)
    reg.accept("db1")
    return confdir, pki


def run(argv, monkeypatch, capsys, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_all_text(env, monkeypatch, capsys):
    confdir, _ = env
    rc, out, _ = run(["-c", str(confdir), "-L"], monkeypatch, capsys)
    assert rc == 0
    assert out == ("Accepted Keys:\ndb1\nDenied Keys:\nUnaccepted Keys:\nweb1\nweb2\n"
                   "Rejected Keys:\n")
    rc2, out2, _ = run(["-c", str(confdir)], monkeypatch, capsys)
    assert (rc2, out2) == (rc, out)


def test_list_text_quotes_odd_ids_and_never_prints_raw_escapes(env, monkeypatch, capsys):
    """An id is chosen by the minion: the text output quotes one that is not plain, the JSON
    output carries it as data, and a file planted with control characters is not listed."""
    confdir, pki = env
    odd = "evil $(reboot) ünïcode"
    (pki / "minions_pre" / odd).write_text("x")
    (pki / "minions_pre" / "a\x1b]0;pwned\x07\nAccepted Keys:\nroot").write_text("x")
    (pki / "minions_pre" / "bidi\u202etxt.exe").write_text("x")
    rc, out, _ = run(["-c", str(confdir), "-L"], monkeypatch, capsys)
    assert rc == 0
    assert "\x1b" not in out and "\u202e" not in out and "pwned" not in out
    assert out.count("Accepted Keys:") == 1
    assert "'evil $(reboot) ünïcode'" in out.splitlines()
    rc, out, _ = run(["-c", str(confdir), "-L", "--out", "json"], monkeypatch, capsys)
    assert odd in json.loads(out)["minions_pre"]


def test_list_json_and_filter(env, monkeypatch, capsys):
    confdir, _ = env
    rc, out, _ = run(["-c", str(confdir), "-L", "--out", "json"], monkeypatch, capsys)
    assert rc == 0
    assert json.loads(out) == {"minions": ["db1"], "minions_pre": ["web1", "web2"],
                               "minions_rejected": [], "minions_denied": []}
    rc, out, _ = run(["-c", str(confdir), "-l", "un"], monkeypatch, capsys)
    assert out == "Unaccepted Keys:\nweb1\nweb2\n"


def test_accept_glob_with_yes(env, monkeypatch, capsys):
    confdir, pki = env
    rc, out, _ = run(["-c", str(confdir), "-a", "web*", "-y"], monkeypatch, capsys)
    assert rc == 0
    assert "Key for minion web1 accepted." in out and "Key for minion web2 accepted." in out
    assert (pki / "minions" / "web1").exists() and not (pki / "minions_pre" / "web1").exists()


def test_accept_asks_and_eof_means_no(env, monkeypatch, capsys):
    confdir, pki = env
    rc, out, _ = run(["-c", str(confdir), "-a", "web1"], monkeypatch, capsys, stdin="")
    assert rc != 0
    assert "Proceed? [n/Y]" in out
    assert (pki / "minions_pre" / "web1").exists()
    rc, out, _ = run(["-c", str(confdir), "-a", "web1"], monkeypatch, capsys, stdin="\n")
    assert rc == 0 and (pki / "minions" / "web1").exists()


def test_delete_defaults_to_no(env, monkeypatch, capsys):
    confdir, pki = env
    rc, out, _ = run(["-c", str(confdir), "-d", "db1"], monkeypatch, capsys, stdin="\n")
    assert rc != 0 and "[N/y]" in out and (pki / "minions" / "db1").exists()
    rc, out, _ = run(["-c", str(confdir), "-d", "db1"], monkeypatch, capsys, stdin="y\n")
    assert rc == 0 and not (pki / "minions" / "db1").exists()


def test_reject_and_include_flags(env, monkeypatch, capsys):
    confdir, pki = env
    rc, _, _ = run(["-c", str(confdir), "-R", "-y"], monkeypatch, capsys)
    assert rc == 0
    reg = open_key_registry({"pki_dir": str(pki)})
    assert reg.list_keys()[KeyState.REJECTED] == ["web1", "web2"]
    rc, _, err = run(["-c", str(confdir), "-a", "web1", "-y"], monkeypatch, capsys)
    assert rc != 0 and "does not match" in err
    rc, _, _ = run(["-c", str(confdir), "-a", "web1", "-y", "--include-rejected"],
                   monkeypatch, capsys)
    assert rc == 0 and (pki / "minions" / "web1").exists()
    rc, _, _ = run(["-c", str(confdir), "-D", "-y"], monkeypatch, capsys)
    assert rc == 0
    assert open_key_registry({"pki_dir": str(pki)}).list_keys() == {s: [] for s in KeyState}


def test_unknown_id_fails_clearly(env, monkeypatch, capsys):
    confdir, _ = env
    for flag in ("-a", "-r", "-d", "-f", "-p"):
        rc, _, err = run(["-c", str(confdir), flag, "nosuch", "-y"], monkeypatch, capsys)
        assert rc != 0, flag
        assert "nosuch" in err


def test_finger_and_print(env, monkeypatch, capsys, pub):
    confdir, _ = env
    rc, out, _ = run(["-c", str(confdir), "-f", "db1"], monkeypatch, capsys)
    assert rc == 0 and out.startswith("Accepted Keys:\ndb1:  ")
    assert len(out.split("db1:  ")[1].strip().split(":")) == 32
    rc, out, _ = run(["-c", str(confdir), "-F", "--out", "json"], monkeypatch, capsys)
    data = json.loads(out)
    assert set(data) == {"minions", "minions_pre"} and set(data["minions_pre"]) == {"web1", "web2"}
    rc, out, _ = run(["-c", str(confdir), "-p", "web1", "--out", "yaml"], monkeypatch, capsys)
    assert "BEGIN PUBLIC KEY" in out and "minions_pre" in out


def test_bad_config_exit_code(tmp_path, monkeypatch, capsys):
    (tmp_path / "master").write_text("publish_port: abc\n")
    rc, _, err = run(["-c", str(tmp_path), "-L"], monkeypatch, capsys)
    assert rc == 2 and "publish_port" in err


def test_gen_keys(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "keys"
    argv = ["-c", str(tmp_path), "--gen-keys", "minion1", "--gen-keys-dir", str(out_dir)]
    rc, _, _ = run(argv, monkeypatch, capsys)
    assert rc == 0
    pem = out_dir / "minion1.pem"
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert (out_dir / "minion1.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    rc, _, err = run(argv, monkeypatch, capsys)
    assert rc != 0 and "already exists" in err


def test_help_via_subprocess():
    exe = shutil.which("hamaster-key")
    cmd = [exe] if exe else [sys.executable, "-m", "hamaster.cli.key"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--accept" in proc.stdout and "examples:" in proc.stdout
    assert "hamaster-key -a web1" in proc.stdout
