"""The file server: ``file_roots`` listed, hashed and served to minions, kept on a store.

- :mod:`.server` — :class:`FileServer` (the ``_file_*`` and ``_serve_file`` commands) over roots
  in a store or in local directories (:class:`ReadOnlyDirStore`);
- :mod:`.beneath` — opening a path beneath its root only, component by component;
- :mod:`.manifest` — file_roots by manifest in the shared store (``file_manifest/``), contents
  addressed by sha256 (``file_blobs/`` when small);
- :mod:`.blobs` — large contents moved between masters by sha256 (a TCP server, its client, the
  syncer).
"""

from hamaster.fileroots.server import FileServer, open_file_server

__all__ = ["FileServer", "open_file_server"]
