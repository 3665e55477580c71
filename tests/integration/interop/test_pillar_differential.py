"""Differential: the same pillar tree compiled by real Salt 3008.5 and by hamaster are equal.

Salt's side is ``salt-call --local pillar.items`` with ``file_client: local`` and the tree as
``pillar_roots``: that is Salt's own pillar compiler (``salt.pillar.Pillar``), the code a
salt-master runs for a minion. hamaster's side is :class:`~hamaster.pillar.compiler
.PillarCompiler` over the same directory with the grains Salt reports for that minion. The tree
exercises top matchers (glob, grain, list, pcre, compound, grain_pcre), ``order``, sls globs,
includes (plain, relative, with ``key``/``defaults``), ``map.jinja`` with ``grains.filter_by``,
``import_yaml``, ``pillar`` compiled so far, recursive merging and lists.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hamaster.pillar.compiler import PillarCompiler
from tests.integration.interop import saltenv

TREE = {
    "top.sls": """
base:
  '*':
    - common
  'role:web':
    - match: grain
    - web
  'web1,db9':
    - match: list
    - listed
  '^web\\d+$':
    - match: pcre
    - regex
  'G@role:web and web*':
    - compound
  'role:w.b':
    - match: grain_pcre
    - apps.*
  'nobody*':
    - never
  'early*':
    - order: -1
    - early
""",
    "common.sls": """
{% import_yaml 'defaults.yaml' as defaults %}
common:
  id: {{ grains['id'] }}
  defaults: {{ defaults | json }}
  list: [a, b]
  nested: {x: 1, y: {z: 2}}
""",
    "defaults.yaml": "timezone: UTC\nntp: [pool1, pool2]\n",
    "map.jinja": """
{% set settings = salt['grains.filter_by']({
    'web': {'port': 80, 'pkg': 'nginx'},
    'db': {'port': 5432, 'pkg': 'postgres'},
    'default': {'port': 0, 'pkg': 'none'},
}, grain='role') %}
""",
    "web/init.sls": """
include:
  - .users
  - shared:
      key: web:shared
      defaults:
        who: web
{% from 'map.jinja' import settings with context %}
web:
  port: {{ settings.port }}
  pkg: {{ settings.pkg }}
  saw_common: {{ pillar.get('common', {}).get('id', 'none') }}
common:
  nested: {y: {w: 3}}
  list: [c]
""",
    "web/users.sls": "web:\n  users: [alice, bob]\n  port: 1\n",
    "shared.sls": "greeting: hello {{ who }}\n",
    "listed.sls": "listed: true\n",
    "regex.sls": "#!yaml\nregex: '{{ not rendered }}'\n",
    "compound.sls": "compound: {{ grains['role'] | upper }}\n",
    "apps/a.sls": "apps: {a: 1}\n",
    "apps/b/init.sls": "apps: {b: 2}\n",
    "never.sls": "never: true\n",
    "early.sls": "early: true\n",
}


def _salt_side(bin_dir: Path, work: Path, tree: Path, mid: str, grains: dict) -> tuple[dict, dict]:
    conf = work / "conf"
    conf.mkdir(parents=True)
    root = work / "root"
    (conf / "minion").write_text(yaml.safe_dump({
        "id": mid, "file_client": "local", "pillar_roots": {"base": [str(tree)]},
        "file_roots": {"base": [str(work / "states")]}, "grains": grains,
        "root_dir": str(root), "cachedir": str(root / "cache"), "pki_dir": str(root / "pki"),
        "log_file": str(root / "minion.log"), "enable_fqdns_grains": False,
        "pillar_mask_output": False,
    }))

    def call(*args: str) -> Any:
        res = subprocess.run([str(bin_dir / "salt-call"), "-c", str(conf), "--local",
                              "--out", "json", *args], capture_output=True, text=True,
                             timeout=180, check=False)
        assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
        return json.loads(res.stdout)["local"]

    return call("pillar.items"), call("grains.items")


@pytest.mark.parametrize("mid,role", [("web1", "web"), ("db1", "db")])
def test_salt_and_hamaster_compile_the_same_pillar(tmp_path: Path, mid: str, role: str) -> None:
    try:
        bin_dir = saltenv.ensure_salt("3008.5")
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no salt 3008.5 venv: {exc}")
    tree = tmp_path / "pillar"
    for rel, text in TREE.items():
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    salt_pillar, salt_grains = _salt_side(bin_dir, tmp_path / "salt", tree, mid, {"role": role})
    ours = PillarCompiler.from_opts({"pillar_roots": {"base": [str(tree)]},
                                     "pillar_tree_ttl": 0}).compile(mid, salt_grains)
    assert "_errors" not in salt_pillar, salt_pillar["_errors"]
    assert ours == salt_pillar
    if role == "web":  # the interesting parts are really there
        assert ours["web"]["shared"] == {"greeting": "hello web"}
        assert ours["common"]["nested"] == {"x": 1, "y": {"z": 2, "w": 3}}
        assert ours["apps"] == {"a": 1, "b": 2} and ours["regex"] == "{{ not rendered }}"
