"""A minimal ``jinja|yaml`` renderer for reactor sls files (Salt's default renderer pipe).

Deliberately small and self-contained so it can later be replaced by (or merged into) the pillar
renderer (``hamaster/pillar/``): Jinja2 in a sandbox (no access to Python internals), with the
variables the caller passes (the reactor passes ``tag`` and ``data``), ``StrictUndefined`` off as
in Salt, then YAML (``safe_load``). A ``#!`` shebang other than ``jinja|yaml`` / ``yaml`` is
refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import yaml


class RenderError(Exception):
    """The template or the YAML it produced is invalid."""


def render_jinja_yaml(text: str, context: dict[str, Any], name: str = "<sls>") -> Any:
    """Render ``text`` with Jinja2 (``context`` as variables), then parse the result as YAML."""
    from jinja2 import TemplateError
    from jinja2.sandbox import SandboxedEnvironment

    first, _, rest = text.partition("\n")
    pipe = "jinja|yaml"
    if first.startswith("#!"):
        pipe = first[2:].strip().replace(" ", "")
        text = rest
    if pipe not in ("jinja|yaml", "yaml", "yaml_jinja"):
        raise RenderError(f"{name}: renderer {pipe!r} not supported (jinja|yaml or yaml)")
    if pipe != "yaml":
        env = SandboxedEnvironment(keep_trailing_newline=True, autoescape=False)
        env.filters.setdefault("json", _json_filter)
        env.filters.setdefault("yaml", _yaml_filter)
        try:
            text = env.from_string(text).render(**context)
        except TemplateError as exc:
            raise RenderError(f"{name}: Jinja error: {exc}") from None
        except Exception as exc:  # a filter or a data access that raised
            raise RenderError(f"{name}: rendering failed: {type(exc).__name__}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RenderError(f"{name}: invalid YAML after rendering: {exc}") from None


def _json_filter(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


def _yaml_filter(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()
