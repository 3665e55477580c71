"""``hamaster-call --local`` end to end, as a subprocess, with a throwaway config directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hamaster.cli.call import main


def _command() -> list[str]:
    script = shutil.which("hamaster-call")
    return [script] if script else [sys.executable, "-m", "hamaster.cli.call"]


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "minion").write_text(
        f"id: cli-test-minion\nroot_dir: {tmp_path}\ngrains:\n  roles: [web]\n"
    )
    return conf


def _call(confdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_command(), "-c", str(confdir), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_local_test_ping(confdir: Path) -> None:
    proc = _call(confdir, "--local", "test.ping")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "local:\n    True\n"


def test_retcode_passthrough(confdir: Path) -> None:
    proc = _call(confdir, "--local", "--retcode-passthrough", "cmd.run", "exit 3")
    assert proc.returncode == 3, proc.stderr


def test_options_after_function_and_without_passthrough(confdir: Path) -> None:
    proc = _call(confdir, "--local", "cmd.run", "echo hi; exit 3", "--retcode-passthrough")
    assert proc.returncode == 3
    assert proc.stdout == "local:\n    hi\n"
    # without passthrough a non-zero retcode exits 1, as salt-call 3008.5 does (checked)
    assert _call(confdir, "--local", "cmd.run", "exit 3").returncode == 1


def test_json_output_with_kwargs_and_grains(confdir: Path) -> None:
    proc = _call(confdir, "--local", "--out", "json", "grains.item", "id", "roles")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"local": {"id": "cli-test-minion", "roles": ["web"]}}


def test_errors_exit_1(confdir: Path) -> None:
    proc = _call(confdir, "--local", "test.nope")
    assert proc.returncode == 1
    assert "'test.nope' is not available." in proc.stdout
    assert _call(confdir, "--local", "test.exception", "boom").returncode == 1
    assert _call(confdir, "--local", "test.echo").returncode == 1


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--retcode-passthrough" in out
    assert "hamaster-call --local test.ping" in out


def test_bad_config_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "minion").write_text("master_port: not-a-number\n")
    assert main(["-c", str(tmp_path), "--local", "test.ping"]) == 2
    assert "master_port" in capsys.readouterr().err
