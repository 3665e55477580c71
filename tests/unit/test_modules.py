"""Execution modules: cmd, test, grains, sys, cp and the function registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hamaster.minion.grains_core import collect_grains, os_grains, parse_os_release
from hamaster.minion.modules import cmd, cp, grains, saltutil, test
from hamaster.minion.modules import sys as sys_mod
from hamaster.minion.modules.context import CommandExecutionError, ExecContext
from hamaster.minion.modules.registry import FunctionRegistry
from tests.kit import wait_until


@pytest.fixture
def ctx() -> ExecContext:
    grains_data = {"os": "Ubuntu", "pkg": {"apache": "httpd"}, "roles": ["web", "db"],
                   "empty": ""}
    return ExecContext(opts={}, grains=grains_data, minion_id="web1",
                       registry=FunctionRegistry())


# ------------------------------------------------------------------ cmd


def test_cmd_run_returns_output_without_trailing_newline(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "echo hello") == "hello"
    assert ctx.retcode == 0


def test_cmd_run_merges_stderr_by_default(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "echo out; echo err >&2") == "out\nerr"
    assert cmd.run(ctx, "echo out; echo err >&2", redirect_stderr=False) == "out"


def test_cmd_run_uses_cwd_and_defaults_to_home(ctx: ExecContext, tmp_path: Path) -> None:
    assert cmd.run(ctx, "pwd", cwd=str(tmp_path)) == str(tmp_path)
    assert cmd.run(ctx, "pwd") == os.path.realpath(os.path.expanduser("~"))


def test_cmd_run_missing_cwd_is_an_error(ctx: ExecContext, tmp_path: Path) -> None:
    with pytest.raises(CommandExecutionError, match="cwd"):
        cmd.run(ctx, "pwd", cwd=str(tmp_path / "nope"))


def test_cmd_run_env_dict_and_salt_list_form(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "echo $FOO-$BAR", env={"FOO": "a", "BAR": 2}) == "a-2"
    assert cmd.run(ctx, "echo $FOO-$BAR", env=[{"FOO": "x"}, {"BAR": "y"}]) == "x-y"
    # merged over the minion's environment, not replacing it
    assert cmd.run(ctx, "echo $PATH", env={"FOO": "a"}) == os.environ["PATH"]


def test_cmd_run_nonzero_exit_sets_retcode(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "echo oops; exit 3") == "oops"
    assert ctx.retcode == 3


def test_failing_command_line_is_not_logged_above_debug(ctx: ExecContext, caplog) -> None:
    """A failing command may carry a password: ERROR/INFO lines name only the program."""
    caplog.set_level("DEBUG", logger="hamaster.minion.modules.cmd")
    cmd.run(ctx, "mysql --password=hunter2 -e 'select 1'; exit 3")
    cmd.retcode(ctx, ["sh", "-c", "exit 4", "--password=hunter2"])
    cmd.run(ctx, "sleep 5; echo --password=hunter2", timeout=0.2)
    above = [r.getMessage() for r in caplog.records if r.levelno > 10]
    assert any("failed with return code: 3" in m and "mysql" in m for m in above), above
    assert any("returned code 4" in m for m in above) and any("timed out" in m for m in above)
    assert not [m for m in above if "hunter2" in m], above
    assert [r for r in caplog.records if r.levelno == 10 and "hunter2" in r.getMessage()]


def test_cmd_run_ignore_retcode(ctx: ExecContext) -> None:
    cmd.run(ctx, "exit 3", ignore_retcode=True)
    assert ctx.retcode == 0


def test_cmd_run_shell_selection(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "echo $0", shell="/bin/bash") == "/bin/bash"
    assert cmd.run(ctx, "echo $0") == "/bin/sh"
    # a list, or python_shell=False, runs without a shell: no expansion
    assert cmd.run(ctx, ["echo", "$HOME"]) == "$HOME"
    assert cmd.run(ctx, "echo '$HOME' two", python_shell=False) == "$HOME two"


def test_cmd_run_stdin(ctx: ExecContext) -> None:
    assert cmd.run(ctx, "cat", stdin="from stdin\n") == "from stdin"


def _process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (no longer in /proc, or a zombie awaiting its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_cmd_run_timeout_kills_the_process_group(ctx: ExecContext, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    # a background grandchild that records its pid; it must die with the group
    out = cmd.run(ctx, f"sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 60", timeout=1)
    assert time.monotonic() - started < 10
    assert out == "Timed out after 1 seconds"
    assert ctx.retcode == 1
    child = int(pidfile.read_text())
    wait_until(lambda: _process_gone(child), 5, 0.05, f"grandchild {child} killed with the group")


def test_cmd_run_all(ctx: ExecContext) -> None:
    ret = cmd.run_all(ctx, "echo out; echo err >&2; exit 2")
    assert ret["stdout"] == "out"
    assert ret["stderr"] == "err"
    assert ret["retcode"] == 2
    assert isinstance(ret["pid"], int) and ret["pid"] > 0
    assert ctx.retcode == 2


def test_cmd_retcode_does_not_fail_the_job(ctx: ExecContext) -> None:
    assert cmd.retcode(ctx, "exit 5") == 5
    assert ctx.retcode == 0
    assert cmd.retcode(ctx, "true") == 0


def test_cmd_run_stdout_and_stderr(ctx: ExecContext) -> None:
    assert cmd.run_stdout(ctx, "echo out; echo err >&2") == "out"
    assert cmd.run_stderr(ctx, "echo out; echo err >&2") == "err"


def test_cmd_missing_program(ctx: ExecContext) -> None:
    with pytest.raises(CommandExecutionError, match="unable to run"):
        cmd.run(ctx, ["/nonexistent/program"])


# ------------------------------------------------------------------ test


def test_test_module_basics(ctx: ExecContext) -> None:
    assert test.ping(ctx) is True
    assert test.echo(ctx, "hi") == "hi"
    assert test.sleep(ctx, 0.01) is True
    assert test.fib(ctx, 10)[0] == 55
    assert test.retcode(ctx, 4) == 4 and ctx.retcode == 4
    with pytest.raises(Exception, match="boom"):
        test.exception(ctx, "boom")


def test_test_arg_returns_args_and_kwargs(ctx: ExecContext) -> None:
    ret = test.arg(ctx, 1, "two", txt="hello", __pub_fun="test.arg")
    assert ret == {"args": [1, "two"], "kwargs": {"txt": "hello", "__pub_fun": "test.arg"}}


# ------------------------------------------------------------------ grains


def test_grains_get_nested_and_default(ctx: ExecContext) -> None:
    assert grains.get(ctx, "os") == "Ubuntu"
    assert grains.get(ctx, "pkg:apache") == "httpd"
    assert grains.get(ctx, "pkg|apache", delimiter="|") == "httpd"
    assert grains.get(ctx, "roles:1") == "db"
    assert grains.get(ctx, "pkg:nginx") == ""
    assert grains.get(ctx, "pkg:nginx", default="none") == "none"


def test_grains_item_ls_has_value(ctx: ExecContext) -> None:
    assert grains.item(ctx, "os", "nope") == {"os": "Ubuntu", "nope": ""}
    assert grains.ls(ctx) == ["empty", "os", "pkg", "roles"]
    assert grains.has_value(ctx, "pkg:apache")
    assert grains.has_value(ctx, "empty")
    assert not grains.has_value(ctx, "pkg:nginx")
    assert grains.items(ctx) is ctx.grains


# ------------------------------------------------------------------ sys and registry


def test_registry_names_and_aliases() -> None:
    reg = FunctionRegistry()
    names = reg.names()
    assert names == sorted(names)
    for expected in ("test.ping", "test.true", "cmd.run", "grains.get", "sys.doc",
                     "cp.get_file"):
        assert expected in names
    assert "test.true_" not in names
    assert not any(n.split(".", 1)[1].startswith("_") for n in names)
    assert reg.get("test.ping") is test.ping
    assert reg.get("test.nope") is None
    assert "Return True" in reg.doc("test.ping")


def test_sys_list_functions(ctx: ExecContext) -> None:
    assert sys_mod.list_functions(ctx, "grains") == [
        "grains.get", "grains.has_value", "grains.item", "grains.items", "grains.ls"]
    assert sys_mod.list_functions(ctx, "cmd.run_*") == [
        "cmd.run_all", "cmd.run_stderr", "cmd.run_stdout"]
    assert sys_mod.list_functions(ctx, "test.ping") == ["test.ping"]
    assert "sys.list_functions" in sys_mod.list_functions(ctx)


def test_sys_list_modules_and_doc(ctx: ExecContext) -> None:
    assert sys_mod.list_modules(ctx) == [
        "cmd", "cp", "event", "grains", "mine", "pillar", "saltutil", "state", "sys", "test"]
    docs = sys_mod.doc(ctx, "test.echo")
    assert list(docs) == ["test.echo"] and "unchanged" in docs["test.echo"]


def test_sys_without_registry_is_an_error() -> None:
    bare = ExecContext(opts={}, grains={}, minion_id="m")
    with pytest.raises(CommandExecutionError):
        sys_mod.list_functions(bare)


# ------------------------------------------------------------------ cp


class FakeMaster:
    """A stand-in for the master's file server: a dict of (saltenv, path) -> content."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files = files
        self.calls: list[tuple[str, str]] = []

    def fetch(self, path: str, saltenv: str) -> bytes | None:
        self.calls.append((path, saltenv))
        return self.files.get((saltenv, path))


@pytest.fixture
def master() -> FakeMaster:
    return FakeMaster({("base", "salt://files/motd"): b"hello\n",
                       ("dev", "salt://files/motd"): b"dev motd\n"})


def test_cp_get_file_to_path_and_dir(ctx: ExecContext, master: FakeMaster,
                                     tmp_path: Path) -> None:
    ctx.fetch_file = master.fetch
    dest = tmp_path / "motd.txt"
    assert cp.get_file(ctx, "salt://files/motd", str(dest)) == str(dest)
    assert dest.read_bytes() == b"hello\n"
    # a directory destination keeps the source's basename
    assert cp.get_file(ctx, "salt://files/motd", str(tmp_path)) == str(tmp_path / "motd")
    assert (tmp_path / "motd").read_bytes() == b"hello\n"


def test_cp_get_file_saltenv_and_query(ctx: ExecContext, master: FakeMaster,
                                       tmp_path: Path) -> None:
    ctx.fetch_file = master.fetch
    cp.get_file(ctx, "salt://files/motd?saltenv=dev", str(tmp_path / "a"))
    cp.get_file(ctx, "salt://files/motd", str(tmp_path / "b"), saltenv="dev")
    assert (tmp_path / "a").read_bytes() == b"dev motd\n"
    assert (tmp_path / "b").read_bytes() == b"dev motd\n"
    assert master.calls == [("salt://files/motd", "dev")] * 2


def test_cp_get_file_missing_and_makedirs(ctx: ExecContext, master: FakeMaster,
                                          tmp_path: Path) -> None:
    ctx.fetch_file = master.fetch
    assert cp.get_file(ctx, "salt://nope", str(tmp_path / "x")) == ""
    assert not (tmp_path / "x").exists()
    deep = tmp_path / "a" / "b" / "motd"
    assert cp.get_file(ctx, "salt://files/motd", str(deep)) == ""
    assert cp.get_file(ctx, "salt://files/motd", str(deep), makedirs=True) == str(deep)
    assert deep.read_bytes() == b"hello\n"


def test_cp_get_file_str_and_hash(ctx: ExecContext, master: FakeMaster) -> None:
    ctx.fetch_file = master.fetch
    assert cp.get_file_str(ctx, "salt://files/motd") == "hello\n"
    assert cp.get_file_str(ctx, "salt://nope") is False
    assert cp.hash_file(ctx, "salt://files/motd") == {
        "hsum": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
        "hash_type": "sha256"}
    assert cp.hash_file(ctx, "salt://nope") == {}


def test_cp_without_file_client(ctx: ExecContext, tmp_path: Path) -> None:
    with pytest.raises(CommandExecutionError, match="no file client"):
        cp.get_file(ctx, "salt://files/motd", str(tmp_path / "x"))


def test_registry_skips_a_module_that_fails_to_import() -> None:
    reg = FunctionRegistry(modules=[("bad", "hamaster.minion.modules.does_not_exist"),
                                    ("test", "hamaster.minion.modules.test")])
    assert reg.get("test.ping") is test.ping
    assert not [n for n in reg.names() if n.startswith("bad.")]


# ------------------------------------------------------------------ core grains


def test_core_grains_shape() -> None:
    g = collect_grains({"id": "m1"})
    assert g["id"] == "m1"
    assert g["kernel"] == "Linux"
    assert g["hamaster"] is True and g["saltversion"] == g["hamaster_version"]
    assert "127.0.0.1" in g["ipv4"]
    assert isinstance(g["num_cpus"], int) and g["num_cpus"] >= 1
    assert isinstance(g["mem_total"], int) and g["mem_total"] > 0
    assert g["pythonversion"][0] == 3
    assert g["pid"] == os.getpid()
    assert "path" not in g


def test_static_grains_file_then_config_deep_merged(tmp_path: Path) -> None:
    (tmp_path / "grains").write_text("roles: [db]\nsite: {dc: one, rack: r1}\nos: FromFile\n")
    opts = {"id": "m1", "config_dir": str(tmp_path),
            "grains": {"site": {"rack": "r9"}, "os": "FromConfig"}}
    g = collect_grains(opts)
    assert g["roles"] == ["db"]
    assert g["site"] == {"dc": "one", "rack": "r9"}
    assert g["os"] == "FromConfig"


def test_os_release_parsing() -> None:
    text = ('NAME="Ubuntu"\nVERSION_ID="22.04"\nVERSION_CODENAME=jammy\nID=ubuntu\n'
            "ID_LIKE=debian\n")
    g = os_grains(parse_os_release(text))
    assert g == {"os": "Ubuntu", "os_family": "Debian", "osfullname": "Ubuntu",
                 "osrelease": "22.04", "oscodename": "jammy", "osmajorrelease": 22,
                 "osfinger": "Ubuntu-22.04"}
    rocky = os_grains(parse_os_release('NAME="Rocky Linux"\nID="rocky"\nVERSION_ID="9.3"\n'))
    assert (rocky["os"], rocky["os_family"], rocky["osfinger"]) == (
        "Rocky", "RedHat", "Rocky Linux-9")
    debian = os_grains(parse_os_release('NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n'))
    assert debian["osfullname"] == "Debian" and debian["osfinger"] == "Debian-12"


# ------------------------------------------------------------------ saltutil


def test_saltutil_find_job_and_running_read_the_minions_running_jobs() -> None:
    job = {"fun": "test.sleep", "arg": [8], "jid": "20261206120000000001", "pid": 42}
    running = {job["jid"]: job}
    ctx = ExecContext(opts={}, grains={}, minion_id="m", running_jobs=running)
    assert saltutil.find_job(ctx, "20261206120000000001") == job
    assert saltutil.find_job(ctx, 20261206120000000001) == job  # a CLI word yamlified to int
    assert saltutil.find_job(ctx, "20261206120000000002") == {}  # not running: {}, as Salt
    assert saltutil.running(ctx) == [job]
    running.clear()
    assert saltutil.running(ctx) == [] and saltutil.find_job(ctx, job["jid"]) == {}
    assert FunctionRegistry().get("saltutil.find_job") is saltutil.find_job


def test_event_send_carries_the_job_keys_and_data_to_fire_master() -> None:
    from hamaster.minion.modules import event
    from hamaster.minion.modules.context import CommandExecutionError, ExecContext

    sent: list[tuple] = []
    ctx = ExecContext(opts={}, grains={"os": "Debian", "id": "m1"}, minion_id="m1")
    with pytest.raises(CommandExecutionError):
        event.send(ctx, "a/b", {"x": 1})           # no master connection
    ctx.fire_master = lambda tag, data: sent.append((tag, data)) or True
    assert event.send(ctx, "a/b", {"x": 1}, with_grains=["os"], __pub_jid="1") is True
    assert sent[-1] == ("a/b", {"__pub_jid": "1", "grains": {"os": "Debian"}, "x": 1})
    assert event.fire_master(ctx, {"raw": True}, "c/d") is True
    assert sent[-1] == ("c/d", {"raw": True})
