"""The store registry: one table of backends, each class declaring its options and capabilities."""

from __future__ import annotations

from pathlib import Path

import pytest

from hamaster.config import load_master_config
from hamaster.store import registry
from hamaster.store.base import StoreError
from hamaster.store.etcd import EtcdStore
from hamaster.store.fs import FsStore
from hamaster.store.rsync import RsyncStore


def test_names_and_classes() -> None:
    from hamaster.cli.cluster import BACKENDS

    assert registry.names() == ("fs", "etcd", "rsync") == BACKENDS
    assert [registry.backend_class(n) for n in registry.names()] == [FsStore, EtcdStore,
                                                                     RsyncStore]
    assert all(registry.backend_class(n).NAME == n for n in registry.names())


def test_unknown_backend_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"ha_backend 'nope' is not known \(supported: fs, "
                                         r"etcd, rsync\)"):
        registry.open_backend({"ha_backend": "nope", "ha_dir": str(tmp_path)})


@pytest.mark.parametrize("backend, needs", [("fs", "ha_dir"), ("etcd", "ha_etcd_endpoints"),
                                            ("rsync", "ha_dir")])
def test_missing_required_option_is_named(backend: str, needs: str) -> None:
    with pytest.raises(StoreError, match=f"ha_backend {backend} needs {needs}"):
        registry.open_backend({"ha_backend": backend})


def test_fs_from_a_partial_mapping_and_from_a_loaded_config(tmp_path: Path) -> None:
    a = registry.open_backend({"ha_dir": str(tmp_path / "a")})   # ha_backend defaults to fs
    b = registry.open_backend(load_master_config(tmp_path, {"ha_dir": str(tmp_path / "b"),
                                                            "ha_poll_interval": 0.25}))
    try:
        assert isinstance(a, FsStore) and a.poll_interval == 0.5
        assert isinstance(b, FsStore) and b.poll_interval == 0.25
    finally:
        a.close()
        b.close()


def test_etcd_options_reach_the_store_without_connecting() -> None:
    s = registry.open_backend({"ha_backend": "etcd", "ha_etcd_endpoints": "127.0.0.1:1, h2:2",
                               "ha_etcd_timeout": 3})
    assert isinstance(s, EtcdStore)
    assert s.describe() == "127.0.0.1:1,h2:2" and s.base == "/hamaster/" and s.timeout == 3.0
    assert s.poll_interval == 0.5 and s.ca is None
    s = registry.open_backend({"ha_backend": "etcd", "ha_etcd_endpoints": ["h:1"],
                               "ha_etcd_prefix": "/x"})
    assert s.base == "/x/"


def test_rsync_options_reach_the_store(tmp_path: Path) -> None:
    opts = load_master_config(tmp_path, {"ha_backend": "rsync", "ha_dir": str(tmp_path / "t"),
                                         "ha_rsync_peers": [str(tmp_path / "peer")],
                                         "ha_rsync_debounce": 0.5, "master_id": "m1"})
    s = registry.open_backend(opts)
    try:
        assert isinstance(s, RsyncStore)
        assert (s.interval, s.debounce, s.max_backoff, s.tombstone_ttl) == (30.0, 0.5, 30.0,
                                                                           604800.0)
        assert s.member_id == "m1" and len(s.peers) == 1
    finally:
        s.close()
    with pytest.raises(StoreError, match="ha_rsync_peers entry"):
        registry.open_backend({"ha_backend": "rsync", "ha_dir": str(tmp_path / "u"),
                               "ha_rsync_peers": "not-a-peer"})


def test_capabilities_match_what_the_backends_do(tmp_path: Path) -> None:
    stores = [FsStore(tmp_path / "fs"), EtcdStore(["127.0.0.1:1"]),
              RsyncStore(tmp_path / "rs", [])]
    try:
        for s in stores:
            assert type(s).LEASES == (s.lease_unsupported() is None), type(s).__name__
    finally:
        for s in stores:
            s.close()
    assert registry.lease_backends() == ("fs", "etcd")
    caps = {n: (c.PEER_BLOBS, c.AGREES_MASTER_KEY, c.SHARED_DIR)
            for n in registry.names() for c in [registry.backend_class(n)]}
    assert caps == {"fs": (False, False, True), "etcd": (True, False, False),
                    "rsync": (False, True, False)}


def test_every_backend_option_is_a_master_option() -> None:
    from hamaster.config import master_options

    table = master_options()
    for name in registry.names():
        for o in registry.backend_class(name).OPTIONS:
            assert table[o.name] == o


def test_constructor_defaults_are_the_declared_defaults() -> None:
    """A store built directly (tests, tools) behaves as one built from default options."""
    import inspect

    from hamaster.options import default

    params = {
        EtcdStore: {"ha_etcd_prefix": "prefix", "ha_etcd_ca": "ca", "ha_etcd_cert": "cert",
                    "ha_etcd_key": "key", "ha_etcd_timeout": "timeout"},
        RsyncStore: {"ha_rsync_password_file": "password_file",
                     "ha_rsync_interval": "interval", "ha_rsync_debounce": "debounce",
                     "ha_rsync_max_backoff": "max_backoff",
                     "ha_rsync_tombstone_ttl": "tombstone_ttl", "ha_rsync_ssh": "ssh"},
    }
    for cls, mapping in params.items():
        sig = inspect.signature(cls.__init__).parameters
        declared = {o.name: o.default for o in cls.OPTIONS}
        for option, param in mapping.items():
            assert sig[param].default == declared[option], (cls.__name__, option)
    for cls in (FsStore, EtcdStore, RsyncStore):
        sig = inspect.signature(cls.__init__).parameters
        assert sig["poll_interval"].default == default("ha_poll_interval")

