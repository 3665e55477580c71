"""Pillar: per-minion data compiled on the master from ``pillar_roots`` and sent to the minion.

- :mod:`.merge` — Salt's merge strategies (``smart``/``recurse``/``overwrite``,
  ``pillar_merge_lists``).
- :mod:`.render` — the renderer pipeline (``#!jinja|yaml``, ``#!yaml``, ``#!json``, ``#!gpg``):
  sandboxed Jinja2 whose templates load only from the tree being compiled; shared with the
  state system and the reactor.
- :mod:`.gpg` — the ``gpg`` renderer (PGP blocks decrypted by the real ``gpg``).
- :mod:`.tree` — where the sls files come from: the shared store's ``pillar_roots/<saltenv>/``
  first, the local ``pillar_roots`` directories as a fallback (read through the file server's
  beneath-the-root opener).
- :mod:`.compiler` — ``top.sls`` matching, ``include:``, merging, ``_errors``, size limits.
- :mod:`.service` — the master's ``_pillar`` answers and the tree's hash.

May import ``hamaster.fileroots``, ``hamaster.targeting``, ``hamaster.store`` and
``hamaster.bus``.
"""
