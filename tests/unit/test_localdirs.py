"""A daemon's local directories must be private (hamaster.localdirs), checked with lstat."""

from __future__ import annotations

import os
import stat

import pytest

from hamaster.localdirs import UnsafeDirectory, ensure_private_dir

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_missing_directory_is_created_0700(tmp_path):
    target = tmp_path / "a" / "b" / "sock"
    old = os.umask(0)
    try:
        assert ensure_private_dir(target, "sock_dir") == target
    finally:
        os.umask(old)
    assert _mode(target) == 0o700
    ensure_private_dir(target, "sock_dir")  # idempotent


def test_existing_private_directory_is_accepted(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ensure_private_dir(d, "cachedir")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_group_or_other_writable_is_refused(tmp_path, mode):
    d = tmp_path / "pki"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeDirectory) as info:
        ensure_private_dir(d, "pki_dir")
    msg = str(info.value)
    assert str(d) in msg and "pki_dir" in msg and f"chmod go-w {d}" in msg


def test_a_file_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        ensure_private_dir(f, "cachedir")


@needs_root
def test_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "sock"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match=f"sock_dir {d} is owned by"):
        ensure_private_dir(d, "sock_dir")


@needs_root
def test_symlinks(tmp_path):
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(good)
    ensure_private_dir(link, "sock_dir")  # our link to our private directory
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    link2 = tmp_path / "link2"
    link2.symlink_to(theirs)
    with pytest.raises(UnsafeDirectory, match="is owned by"):
        ensure_private_dir(link2, "sock_dir")
    planted = tmp_path / "planted"
    planted.symlink_to(good)
    os.lchown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match="symlink owned by"):
        ensure_private_dir(planted, "sock_dir")
    home = tmp_path / "home-of-nobody"
    (home / "d").mkdir(parents=True, mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    via = tmp_path / "via"
    via.symlink_to(home / "d")  # our link, our directory, but nobody can rename it away
    with pytest.raises(UnsafeDirectory, match="home-of-nobody above it is owned by"):
        ensure_private_dir(via, "sock_dir")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafeDirectory, match="dangling"):
        ensure_private_dir(dangling, "sock_dir")


@needs_root
def test_a_parent_another_user_controls_is_refused(tmp_path):
    parent = tmp_path / "home-of-nobody"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match="above it is owned by"):
        ensure_private_dir(parent / "cache", "cachedir")
    assert not (parent / "cache").exists()


def test_a_writable_parent_needs_the_sticky_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeDirectory, match="not sticky"):
        ensure_private_dir(shared / "sock", "sock_dir")
    os.chmod(shared, 0o1777)  # like /tmp: others cannot rename our entries
    ensure_private_dir(shared / "sock", "sock_dir")
    assert _mode(shared / "sock") == 0o700


def test_cluster_directory_is_created_private(tmp_path, capsys):
    from hamaster.cli.cluster import main

    base = tmp_path / "demo"
    assert main(["status", "--dir", str(base)]) != 0  # no cluster there yet
    assert _mode(base) == 0o700
    os.chmod(base, 0o755)  # ours but readable by others: made private again
    main(["status", "--dir", str(base)])
    assert _mode(base) == 0o700


@needs_root
def test_cluster_directory_of_another_user_is_refused(tmp_path, capsys):
    """Another user pre-creates the cluster directory (or a symlink to theirs) to plant a
    master.d file with auto_accept: hamaster-cluster refuses to use it."""
    from hamaster.cli.cluster import main

    base = tmp_path / "demo"
    (base / "master1" / "conf" / "master.d").mkdir(parents=True)
    (base / "master1" / "conf" / "master.d" / "evil.conf").write_text("auto_accept: true\n")
    os.chown(base, NOBODY, NOBODY)
    os.chmod(base, 0o755)
    assert main(["up", "--dir", str(base), "--masters", "1", "--minions", "0"]) == 2
    err = capsys.readouterr().err
    assert f"cluster directory {base} is owned by nobody" in err
    assert not (base / "cluster.json").exists()
    link = tmp_path / "link"
    link.symlink_to(base)
    assert main(["up", "--dir", str(link), "--masters", "1", "--minions", "0"]) == 2
    assert "is owned by nobody" in capsys.readouterr().err
