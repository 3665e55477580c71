"""The direction of imports between hamaster's packages (docs/architecture.md).

Every ``import`` in ``hamaster/`` counts — at module level, inside a function (lazy) or under
``if TYPE_CHECKING:`` — because each is a dependency a reader has to follow. A "package" is a
subpackage (``hamaster/master/``) or a top-level module (``hamaster/ids.py``).

- Nothing outside ``hamaster/cli/`` imports ``hamaster.cli``.
- No import cycle between packages.
- The arrows of the layering run one way: the daemons (``master``, ``minion``) import neither
  each other nor anything above them, and nothing below them imports them.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "hamaster"

#: Deliberate exceptions, as ``(importing package, imported package): reason``. Keep it empty:
#: an entry needs a reason a reviewer accepts, and removing the import is better.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}

#: Packages that may import nothing of hamaster but the ones listed (the bottom layers).
ONLY_IMPORTS: dict[str, set[str]] = {
    "store": {"beneath", "options"},   # backends declare their options in the table
    "bus": {"crypto", "ids"},           # the wire checks apply the one minion-id rule
    "crypto": set(),
    "ids": set(),
    "options": set(),
    "beneath": set(),
    "targeting": set(),   # imported by every minion: stdlib only (RSS)
    "ratelog": {"ids"},
}

#: Packages that must not import the daemons (they sit below them, or beside them).
BELOW_DAEMONS = ("api", "events", "fileroots", "jobs", "pillar", "pki_sync", "states", "store",
                 "bus", "targeting", "ratelog", "beneath", "crypto", "ids", "options")


def _units(root: Path) -> set[str]:
    return {p.stem if p.is_file() else p.name for p in root.iterdir()
            if (p.is_file() and p.suffix == ".py" and p.stem != "__init__")
            or (p.is_dir() and (p / "__init__.py").exists())}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    """Dotted names an import statement brings in (``from a import b`` → ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        if not is_pkg:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" for a in node.names]


def package_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """``{(importing package, imported package): ["module:line", …]}`` for the tree at
    ``root`` (a directory named like the top package), every import included."""
    top = root.name
    units = _units(root)
    edges: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_pkg else parts)
        src = parts[1] if len(parts) > 1 and parts[1] in units else "<top>"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, module, is_pkg):
                bits = name.split(".")
                if bits[0] != top or len(bits) < 2 or bits[1] not in units:
                    continue
                if bits[1] != src:
                    edges[(src, bits[1])].append(f"{module}:{node.lineno}")
    return dict(edges)


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    found = []
    for (a, b), where in sorted(edges.items()):
        if (a, b) in ALLOWED_EDGES:
            continue
        if b == "cli" and a != "cli":
            found.append(f"{a} imports cli: {', '.join(where)}")
        if a in ONLY_IMPORTS and b not in ONLY_IMPORTS[a]:
            found.append(f"{a} may import only {sorted(ONLY_IMPORTS[a])}, imports {b}: "
                         f"{', '.join(where)}")
        if b in ("master", "minion") and (a in BELOW_DAEMONS or a in ("master", "minion")):
            found.append(f"{a} imports the daemon package {b}: {', '.join(where)}")
    kept = {k: v for k, v in edges.items() if k not in ALLOWED_EDGES}
    for comp in cycles(kept):
        inside = [f"{a}->{b} ({', '.join(w[:3])})" for (a, b), w in sorted(kept.items())
                  if a in comp and b in comp]
        found.append(f"import cycle between {comp}: {'; '.join(inside)}")
    return found


def test_hamaster_imports_follow_the_layering() -> None:
    edges = package_edges(ROOT)
    assert ("master", "store") in edges and ("minion", "bus") in edges  # the scan sees imports
    assert _violations(edges) == []


def test_allowed_edges_are_still_needed() -> None:
    edges = package_edges(ROOT)
    stale = [k for k in ALLOWED_EDGES if k not in edges]
    assert stale == [], f"remove these exceptions, the imports are gone: {stale}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"app/master/__init__.py": "", "app/master/d.py": "def f():\n    from app.cli import x\n",
      "app/cli/__init__.py": "", "app/cli/x.py": ""}, "imports cli"),
    ({"app/fileroots/__init__.py": "",
      "app/fileroots/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from app.master.daemon import Master\n",
      "app/master/__init__.py": "", "app/master/daemon.py": "from app.fileroots import b\n"},
     "import cycle between ['fileroots', 'master']"),
    ({"app/store/__init__.py": "", "app/store/s.py": "from .. import ids\n",
      "app/ids.py": ""}, "store may import only"),
    ({"app/api/__init__.py": "", "app/api/x.py": "import app.master.runners\n",
      "app/master/__init__.py": "", "app/master/runners.py": ""}, "imports the daemon package"),
])
def test_the_scan_catches_violations(tmp_path: Path, files: dict[str, str],
                                     expected: str) -> None:
    edges = package_edges(_write(tmp_path, files) / "app")
    found = _violations(edges)
    assert any(expected in v for v in found), found


def test_the_scan_passes_a_clean_tree(tmp_path: Path) -> None:
    root = _write(tmp_path, {"app/master/__init__.py": "", "app/master/d.py":
                             "from app.store import s\nfrom app import ids\n",
                             "app/store/__init__.py": "", "app/store/s.py": "", "app/ids.py": ""})
    edges = package_edges(root / "app")
    assert sorted(edges) == [("master", "ids"), ("master", "store")]
    assert _violations(edges) == []
