"""The REST API's eauth (file text/htpasswd, SHA-crypt), ACLs, tokens and login rate limit."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import bcrypt
import pytest

from hamaster.api import eauth, shacrypt
from hamaster.api.eauth import Acl, glob_matcher
from hamaster.api.server import LoginLimiter
from hamaster.api.tokens import PREFIX, TokenStore, token_digest
from hamaster.store.fs import FsStore
from tests.kit import wait_until

# -- SHA-crypt --------------------------------------------------------------------------------


def test_sha512_crypt_matches_the_specification_vectors() -> None:
    # Drepper's SHA-crypt specification, test vectors 1 and 2 (SHA-512)
    assert shacrypt.sha_crypt(b"Hello world!", "$6$saltstring") == (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcb"
        "YEdFCoEOfaS35inz1")
    assert shacrypt.sha_crypt(b"Hello world!", "$6$rounds=10000$saltstringsaltstring") == (
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
        "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.")


def test_sha256_crypt_matches_the_specification_vector() -> None:
    assert shacrypt.sha_crypt(b"Hello world!", "$5$rounds=10000$saltstringsaltstring") == (
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA")


def test_sha_crypt_verify_refuses_a_wrong_password_and_garbage() -> None:
    hashed = shacrypt.sha_crypt(b"right", "$6$abcdefgh")
    assert shacrypt.verify(b"right", hashed)
    assert not shacrypt.verify(b"wrong", hashed)
    assert not shacrypt.verify(b"right", "$1$md5salt$whatever")
    assert not shacrypt.verify(b"right", "$6$rounds=x$salt$hash")


# -- eauth file -------------------------------------------------------------------------------


def _ext(path: Path, **opts: object) -> dict:
    return {"file": {"^filename": str(path), **{f"^{k}": v for k, v in opts.items()},
                     "alice": [".*"]}}


def test_text_file_plaintext_and_hashes(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# comment\nalice:secret\n")
    assert eauth.authenticate(_ext(users), "file", "alice", "secret")
    assert not eauth.authenticate(_ext(users), "file", "alice", "Secret")
    assert not eauth.authenticate(_ext(users), "file", "bob", "secret")
    for algo in ("sha256", "sha512"):
        users.write_text(f"alice:{hashlib.new(algo, b'pw').hexdigest()}\n")
        assert eauth.authenticate(_ext(users, hashtype=algo), "file", "alice", "pw")
        assert not eauth.authenticate(_ext(users, hashtype=algo), "file", "alice", "pw2")


def test_text_file_custom_fields(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("1|pw|alice\n")
    ext = _ext(users, field_separator="|", username_field=3, password_field=2)
    assert eauth.authenticate(ext, "file", "alice", "pw")


def test_htpasswd_bcrypt_sha512_crypt_and_sha1(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    b = bcrypt.hashpw(b"bpw", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    s = shacrypt.sha_crypt(b"spw", "$6$somesalt")
    users.write_text(f"bee:{b}\nsha:{s}\nold:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nmd5:$apr1$x$y\n")
    ext = {"file": {"^filename": str(users), "^filetype": "htpasswd"}}
    assert eauth.authenticate(ext, "file", "bee", "bpw")
    assert not eauth.authenticate(ext, "file", "bee", "nope")
    assert eauth.authenticate(ext, "file", "sha", "spw")
    assert not eauth.authenticate(ext, "file", "sha", "bpw")
    assert eauth.authenticate(ext, "file", "old", "password")
    assert not eauth.authenticate(ext, "file", "md5", "anything")  # unsupported format


def test_unconfigured_backend_missing_file_and_odd_input_never_authenticate(tmp_path: Path) -> None:
    assert not eauth.authenticate({}, "file", "alice", "secret")
    assert not eauth.authenticate({"ldap": {}}, "ldap", "alice", "secret")
    assert not eauth.authenticate(_ext(tmp_path / "absent"), "file", "alice", "x")
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    assert not eauth.authenticate(_ext(users), "file", "", "secret")
    assert not eauth.authenticate(_ext(users), "file", "alice", "secret\0")
    with pytest.raises(eauth.EauthConfigError):
        eauth.authenticate(_ext(users, hashtype="nohash"), "file", "alice", "secret")


# -- permissions and ACLs ---------------------------------------------------------------------


def test_permissions_gather_user_star_and_groups() -> None:
    ext = {"file": {"^filename": "x", "alice": ["test.*"], "*": ["grains.items"],
                    "ops%": ["@runner"], "%dba": ["@wheel"]}}
    assert eauth.permissions(ext, "file", "alice", []) == ["test.*", "grains.items"]
    assert eauth.permissions(ext, "file", "carol", ["ops", "dba"]) == [
        "grains.items", "@runner", "@wheel"]
    assert eauth.permissions({"file": {"alice": ["x"]}}, "file", "bob", []) is None
    assert eauth.permissions(ext, "pam", "alice", []) is None


def test_acl_plain_entries_allow_any_target_but_not_runners() -> None:
    acl = Acl([".*"])
    m = glob_matcher(["web1", "db1"])
    assert acl.allows_local("cmd.run", ["id"], {}, ["web1", "db1"], m)
    assert not acl.allows_class("runner", "jobs.list_jobs")
    assert not acl.allows_class("wheel", "key.list_all")
    assert acl.allows_local("test.ping", [], {}, [], m)  # a plain entry: any target, even none
    assert Acl(["test.*"]).allows_local("test.ping", [], {}, ["db1"], m)


def test_acl_target_entries_cover_every_targeted_minion() -> None:
    acl = Acl([{"web*": ["test.*", "cmd.run"]}])
    m = glob_matcher(["web1", "web2", "db1"])
    assert acl.allows_local("test.ping", [], {}, ["web1", "web2"], m)
    assert acl.allows_local("cmd.run", ["ls"], {}, ["web1"], m)
    assert not acl.allows_local("test.ping", [], {}, ["db1"], m)
    assert not acl.allows_local("test.ping", [], {}, ["web1", "db1"], m)
    assert not acl.allows_local("pkg.install", [], {}, ["web1"], m)
    assert not acl.allows_local("test.ping", [], {}, [], m)
    # two entries together cover a mixed target
    both = Acl([{"web*": ["test.*"]}, {"db*": ["test.ping"]}])
    assert both.allows_local("test.ping", [], {}, ["web1", "db1"], m)


def test_acl_function_patterns_are_whole_name_regexes() -> None:
    acl = Acl(["test.ping"])
    m = glob_matcher(["a"])
    assert acl.allows_local("test.ping", [], {}, ["a"], m)
    assert not acl.allows_local("test.pingx", [], {}, ["a"], m)
    assert not Acl(["(bad"]).allows_local("test.ping", [], {}, ["a"], m)


def test_acl_argument_restrictions() -> None:
    acl = Acl([{"*": [{"cmd.run": {"args": ["ls .*"], "kwargs": {"cwd": "/tmp"}}}]}])
    m = glob_matcher(["a"])
    assert acl.allows_local("cmd.run", ["ls -l"], {"cwd": "/tmp"}, ["a"], m)
    assert not acl.allows_local("cmd.run", ["rm -rf /"], {"cwd": "/tmp"}, ["a"], m)
    assert not acl.allows_local("cmd.run", ["ls"], {"cwd": "/"}, ["a"], m)
    assert not acl.allows_local("cmd.run", ["ls", "extra"], {"cwd": "/tmp"}, ["a"], m)
    assert not acl.allows_local("cmd.run", ["ls"], {}, ["a"], m)


def test_acl_runner_and_wheel_entries() -> None:
    assert Acl(["@runner"]).allows_class("runner", "manage.status")
    assert not Acl(["@runner"]).allows_class("wheel", "key.list_all")
    jobs_only = Acl([{"@runner": ["jobs.*"]}, "@jobs"])
    assert jobs_only.allows_class("runner", "jobs.lookup_jid")
    assert not jobs_only.allows_class("runner", "manage.status")
    assert Acl(["@jobs"]).allows_class("runner", "jobs.list_jobs")
    assert Acl([{"@wheel": ["key.list.*", "key.finger"]}]).allows_class("wheel", "key.list_all")
    assert not Acl([{"@wheel": ["key.list.*"]}]).allows_class("wheel", "key.delete")


# -- tokens -----------------------------------------------------------------------------------


def test_token_is_stored_hashed_and_works_through_another_store_view(tmp_path: Path) -> None:
    a = TokenStore(FsStore(str(tmp_path)), cache_ttl=0.2)
    b = TokenStore(FsStore(str(tmp_path)), cache_ttl=0.2)
    rec = a.create("alice", "file", [".*"], ["ops"], 60)
    token = rec["token"]
    assert len(token) == 40 and int(token, 16) >= 0
    stored = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert token_digest(token) in stored
    assert all(token.encode() not in v and token not in k for k, v in stored.items())
    assert json.loads(stored[token_digest(token)])["user"] == "alice"
    got = b.get(token)
    assert got is not None and got["perms"] == [".*"] and got["groups"] == ["ops"]
    # logout through a: b refuses within its cache time
    assert a.delete(token)
    wait_until(lambda: b.get(token) is None, 2, 0.05, "the logout seen by the other store view")
    assert not a.delete(token)


def test_token_expiry_malformed_and_unknown_tokens(tmp_path: Path) -> None:
    ts = TokenStore(FsStore(str(tmp_path)), cache_ttl=0)
    rec = ts.create("alice", "file", [], [], -1)  # already expired
    assert ts.get(rec["token"]) is None
    assert ts.purge_expired() == 1
    assert not list(FsStore(str(tmp_path)).list(PREFIX.rstrip("/")))
    for bad in ("", "not-hex", "ab" * 100, "../../etc", "a\0b"):
        assert ts.get(bad) is None
    assert ts.get("ab" * 20) is None


# -- login rate limit -------------------------------------------------------------------------


def test_login_limiter_per_user_and_source() -> None:
    lim = LoginLimiter(max_failures=3, window=60)
    for _ in range(3):
        assert lim.blocked_for("alice", "10.0.0.1") == 0
        lim.failed("alice", "10.0.0.1")
    assert lim.blocked_for("alice", "10.0.0.1") > 0
    assert lim.blocked_for("alice", "10.0.0.2") == 0
    assert lim.blocked_for("bob", "10.0.0.1") == 0
    lim2 = LoginLimiter(max_failures=2, window=0.05)
    lim2.failed("a", "s")
    lim2.failed("a", "s")
    assert lim2.blocked_for("a", "s") > 0
    time.sleep(0.06)
    assert lim2.blocked_for("a", "s") == 0


# -- publisher_acl (the local CLI) ------------------------------------------------------------


def test_publisher_acl_users_groups_blacklist_and_root() -> None:
    from hamaster.master.publisher_acl import Caller, PublisherAcl

    pacl = PublisherAcl({"publisher_acl": {"dev*": ["test.*"], "root%": ["@runner"]},
                         "publisher_acl_blacklist": {"users": ["^devil$"],
                                                     "modules": ["cmd\\..*"]}})
    assert pacl.enabled
    m = glob_matcher(["web1"])
    dev = Caller(1000, "devin", False)
    assert pacl.refuse_publish(dev, "test.ping", [], ["web1"], m) is None
    assert "may not run" in pacl.refuse_publish(dev, "pkg.install", [], ["web1"], m)
    assert pacl.refuse_runner(dev, "jobs.list_jobs") is not None
    assert pacl.refuse_publish(Caller(1001, "devil", False), "test.ping", [], ["web1"], m)
    # the module blacklist wins over an allowing entry
    allow_all = PublisherAcl({"publisher_acl": {"ann": [".*"]},
                              "publisher_acl_blacklist": {"modules": ["cmd\\..*"]}})
    ann = Caller(1002, "ann", False)
    assert allow_all.refuse_publish(ann, "test.ping", [], ["web1"], m) is None
    assert allow_all.refuse_publish(ann, "cmd.run", ["id"], ["web1"], m) is not None
    # an unknown uid is refused; root and the master's user are not checked at all
    assert allow_all.refuse_publish(Caller(4242, "", False), "test.ping", [], ["web1"], m)
    assert allow_all.refuse_publish(Caller(0, "root", True), "cmd.run", [], ["web1"], m) is None
    # a member of the group root (Salt's "name%") gets that group's entries
    assert pacl.perms(Caller(0, "root", True)) == ["@runner"]
    assert not PublisherAcl({}).enabled
