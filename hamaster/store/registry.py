"""Every store backend by its ``ha_backend`` name: name → class (its options, its capabilities).

The master (:func:`open_backend`), ``hamaster-cluster`` (:func:`names`), the drills and the
blob service look backends up here and ask the class (:class:`~hamaster.store.base.Store`'s
``OPTIONS``, ``LEASES``, ``PEER_BLOBS``, ``AGREES_MASTER_KEY``, ``SHARED_DIR``), never a name.
Adding a backend: its module (a ``Store`` subclass with ``NAME``, ``OPTIONS`` and
``from_opts``), one line in :data:`BACKENDS`, and its fixture in the store contract suite
(``tests/integration/test_store_contract.py``). Classes are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from hamaster.options import Option
from hamaster.store.base import Store, StoreError

#: ``ha_backend`` name → ``module:Class``.
BACKENDS: dict[str, str] = {
    "fs": "hamaster.store.fs:FsStore",
    "etcd": "hamaster.store.etcd:EtcdStore",
    "rsync": "hamaster.store.rsync:RsyncStore",
}
#: The backend of a master without ``ha_backend`` (with no ``ha_dir`` either: a lone master).
DEFAULT_BACKEND = "fs"


def names() -> tuple[str, ...]:
    """The backend names, in registry order."""
    return tuple(BACKENDS)


def backend_class(name: str) -> type[Store]:
    """The class of backend ``name``; :class:`StoreError` naming the known ones otherwise."""
    target = BACKENDS.get(name) if isinstance(name, str) else None
    if target is None:
        raise StoreError(f"ha_backend {name!r} is not known (supported: {', '.join(BACKENDS)})")
    module, _, cls_name = target.partition(":")
    cls: type[Store] = getattr(importlib.import_module(module), cls_name)
    return cls


def backend_of(opts: Mapping[str, Any]) -> type[Store]:
    """The class of the backend ``opts`` names (``ha_backend``)."""
    return backend_class(opts.get("ha_backend", DEFAULT_BACKEND))


def open_backend(opts: Mapping[str, Any]) -> Store:
    """The shared store ``opts`` describe (``ha_backend`` and that backend's options)."""
    return backend_of(opts).from_opts(opts)


def backend_options() -> tuple[Option, ...]:
    """Every backend's options, merged (an option two backends share is declared alike)."""
    seen: dict[str, Option] = {}
    for name in BACKENDS:
        for o in backend_class(name).OPTIONS:
            if seen.setdefault(o.name, o) != o:
                raise ValueError(f"backend option {o.name!r} is declared differently by two "
                                 "backends")
    return tuple(seen.values())


def lease_backends() -> tuple[str, ...]:
    """The backends whose lease gives mutual exclusion (named when a feature needs one)."""
    return tuple(name for name in BACKENDS if backend_class(name).LEASES)
