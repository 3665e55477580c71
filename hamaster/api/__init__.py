"""The REST API (salt-api's ``rest_cherrypy`` dialect) served by every master.

Owns: the aiohttp application and its thread (:mod:`.server`), eauth and ACLs (:mod:`.eauth`),
tokens in the shared store (:mod:`.tokens`), the lowstate clients (:mod:`.clients`) and the
narrow interface to the master's event loop (:mod:`.bridge`). Reaches the master's state only
through :mod:`.bridge`; otherwise imports from ``hamaster.master`` the runners' functions
(:mod:`.clients`, :mod:`.server`) and the daemon's type for hints. In ``hamaster.master`` the
daemon starts it and ``publisher_acl`` reuses :class:`.eauth.Acl` (:mod:`.eauth` imports nothing
of the master).
"""

from __future__ import annotations


def api_options(opts: dict) -> dict | None:
    """The master's ``rest_cherrypy`` (or ``rest_api``) block; None when the API is off."""
    for name in ("rest_cherrypy", "rest_api"):
        block = opts.get(name)
        if isinstance(block, dict):
            return block
    return None
