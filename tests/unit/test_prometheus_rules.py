"""ops/prometheus: the alert rules pass ``promtool check/test rules``; dashboard and docs cover
every metric."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hamaster.metrics import MasterMetrics

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install --no-install-recommends "
           "prometheus; CI installs it)",
)


def promtool(*args: str, cwd: Path = OPS) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def exposed_names() -> dict[str, tuple[str, ...]]:
    """Every metric family a master exports → the sample names any of which shows it is used."""
    out: dict[str, tuple[str, ...]] = {}
    for fam in MasterMetrics("m").registry.collect():
        if fam.type == "counter":
            out[fam.name] = (fam.name + "_total",)
        elif fam.type == "info":
            out[fam.name] = (fam.name + "_info",)
        elif fam.type == "histogram":
            out[fam.name] = tuple(fam.name + s for s in ("", "_bucket", "_count", "_sum"))
        else:
            out[fam.name] = (fam.name,)
    return out


def mentions(text: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", text) for n in names)


def alert_names() -> list[str]:
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_alert_rules_are_valid() -> None:
    res = promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    res = promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_scrape_config_is_valid() -> None:
    res = promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = set(alert_names())
    assert names >= {
        "HamasterMasterDown", "HamasterMinionsDisconnected", "HamasterStoreDown",
        "HamasterSyncLagHigh",
        "HamasterConfigDrift", "HamasterFileRootsDrift", "HamasterAuthFailuresSpike",
        "HamasterJobReturnsMissing",
    }
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_alerts_use_only_exported_metrics() -> None:
    known = {n for names in exposed_names().values() for n in names} | {"up"}
    for g in yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]:
        for r in g["rules"]:
            used = set(re.findall(r"\b((?:hamaster|process)_[a-z_]+|up)\b", r["expr"]))
            assert used <= known, (r["alert"], used - known)


def dashboard_exprs() -> list[str]:
    dash = json.loads((OPS / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_has_a_panel_for_every_metric() -> None:
    text = "\n".join(dashboard_exprs())
    missing = [fam for fam, names in exposed_names().items() if not mentions(text, names)]
    assert not missing, f"metrics without a dashboard panel: {missing}"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL (promtool parses
    it)."""
    rules = [
        {"record": f"dashboard:expr_{i}",
         "expr": e.replace("$__rate_interval", "5m").replace("$master", ".*")}
        for i, e in enumerate(dashboard_exprs())
    ]
    (tmp_path / "dash.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = promtool("check", "rules", "dash.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docs_list_every_metric() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    missing = [fam for fam, names in exposed_names().items() if not mentions(text, names)]
    assert not missing, f"metrics not documented in docs/metrics.md: {missing}"
    for alert in alert_names():
        assert alert in text, f"alert {alert} not described in docs/metrics.md"
