"""Rendering of reactor sls files, through the one renderer pillar and states use.

A reactor sls is rendered like any sls (:mod:`hamaster.pillar.render`: Salt's ``jinja|yaml`` pipe,
``#!`` shebangs, Jinja2 in a sandbox) with the event's ``tag`` and ``data`` as variables. It has no
tree to import from, no grains and no pillar: what it may use is what the event carries.
"""

from __future__ import annotations

from typing import Any

from hamaster.pillar.render import RenderContext, Renderer
from hamaster.pillar.render import RenderError as _SlsRenderError

_RENDERER = Renderer("jinja|yaml")


class RenderError(Exception):
    """The template or the YAML it produced is invalid (the message names the sls)."""


def render_jinja_yaml(text: str, context: dict[str, Any], name: str = "<sls>") -> Any:
    """Render ``text`` (``#!`` shebang or ``jinja|yaml``) with ``context`` as variables."""
    ctx = RenderContext(saltenv="base", sls=name, path=name, grains={}, opts={}, pillar={},
                        minion_id="", extra=dict(context))
    try:
        return _RENDERER.render(text.encode("utf-8"), ctx, _RENDERER.environment(lambda _p: None))
    except _SlsRenderError as exc:
        raise RenderError(f"{name}: {exc}") from None
