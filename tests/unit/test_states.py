"""The state compiler and runner in-process on local file_roots (issue #16).

Real files in a temporary tree and real commands (``/bin/sh``); no mocks. Each test writes a
small sls tree, applies it through :class:`hamaster.states.apply.StateSystem` and checks Salt's
semantics: order, requisites, names, include/extend, failhard, test mode and the return shape.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from hamaster.minion.modules.context import ExecContext
from hamaster.minion.modules.registry import FunctionRegistry
from hamaster.states.apply import StateSystem

RET_KEYS = {"name", "changes", "result", "comment", "__sls__", "__run_num__", "start_time",
            "duration", "__id__"}


def _system(tmp_path: Path, files: dict[str, str], test: bool = False,
            opts: dict[str, Any] | None = None) -> StateSystem:
    roots = tmp_path / "roots"
    for rel, text in files.items():
        p = roots / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text.replace("@OUT@", str(tmp_path / "out")))
    o = {"id": "m1", "file_client": "local", "file_roots": {"base": [str(roots)]},
         "pillar_roots": {}}
    o.update(opts or {})
    ctx = ExecContext(opts=o, grains={"id": "m1", "os_family": "Debian", "os": "Debian"},
                      minion_id="m1", registry=FunctionRegistry(), pillar={"who": "pillar"})
    return StateSystem(ctx, test=test)


def _by_run(ret: dict[str, dict]) -> list[tuple[str, dict]]:
    return sorted(ret.items(), key=lambda kv: kv[1]["__run_num__"])


def _ids(ret: dict[str, dict]) -> list[str]:
    return [v["__id__"] for _, v in _by_run(ret)]


def test_definition_order_order_key_and_require_reorders(tmp_path: Path) -> None:
    sls = """
a:
  test.succeed_without_changes
b:
  test.succeed_without_changes:
    - require:
      - test: c
c:
  test.succeed_without_changes
z:
  test.succeed_without_changes:
    - order: 1
last:
  test.succeed_without_changes:
    - order: last
"""
    ret, rc = _system(tmp_path, {"s.sls": sls}).apply(["s"])
    assert rc == 0
    assert _ids(ret) == ["z", "a", "c", "b", "last"]
    tag = "test_|-a_|-a_|-succeed_without_changes"
    assert set(ret[tag]) == RET_KEYS
    assert ret[tag]["__sls__"] == "s" and ret[tag]["comment"] == "Success!"


def test_names_include_relative_extend_and_multiple_modules(tmp_path: Path) -> None:
    files = {
        "pkg/init.sls": "include:\n  - .sub\nextend:\n  sub1:\n    test.show_notification:\n"
                        "      - text: extended\n",
        "pkg/sub.sls": "sub1:\n  test.show_notification:\n    - text: original\n"
                       "multi:\n  test.nop:\n    - names: [n1, n2]\n"
                       "both:\n  test.nop: []\n  file.absent:\n    - name: @OUT@/nothing\n",
    }
    ret, rc = _system(tmp_path, files).apply(["pkg"])
    assert rc == 0, ret
    assert ret["test_|-sub1_|-sub1_|-show_notification"]["comment"] == "extended"
    assert "test_|-multi_|-n1_|-nop" in ret and "test_|-multi_|-n2_|-nop" in ret
    assert "test_|-both_|-both_|-nop" in ret
    assert f"file_|-both_|-{tmp_path}/out/nothing_|-absent" in ret
    assert _ids(ret)[:3] == ["sub1", "multi", "multi"]


def test_requisite_failure_onchanges_onfail_watch(tmp_path: Path) -> None:
    sls = """
bad:
  test.fail_without_changes
needs_bad:
  test.nop:
    - require:
      - test: bad
rescue:
  test.succeed_without_changes:
    - onfail:
      - test: bad
changed:
  test.succeed_with_changes
quiet:
  test.succeed_without_changes
on_changed:
  test.nop:
    - onchanges:
      - test: changed
on_quiet:
  test.nop:
    - onchanges:
      - test: quiet
watcher:
  cmd.wait:
    - name: echo fired > @OUT@/fired
    - watch:
      - test: changed
no_watch:
  cmd.wait:
    - name: echo no > @OUT@/nofire
    - watch:
      - test: quiet
feeder:
  test.succeed_with_changes:
    - require_in:
      - test: fed
    - watch_in:
      - cmd: watcher
fed:
  test.nop
"""
    (tmp_path / "out").mkdir()
    ret, rc = _system(tmp_path, {"r.sls": sls}).apply(["r"])
    assert rc == 2
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["needs_bad"]["result"] is False
    assert by_id["needs_bad"]["comment"] == "One or more requisite failed: r.bad"
    assert by_id["rescue"]["result"] is True and by_id["rescue"]["comment"] == "Success!"
    assert by_id["on_changed"]["comment"] == "Success!"
    assert by_id["on_quiet"]["comment"] == ("State was not run because none of the onchanges "
                                            "reqs changed")
    assert (tmp_path / "out" / "fired").read_text() == "fired\n"
    assert by_id["watcher"]["changes"]["retcode"] == 0
    assert not (tmp_path / "out" / "nofire").exists()
    ids = _ids(ret)
    assert ids.index("feeder") < ids.index("fed")
    assert ids.index("feeder") < ids.index("watcher")


def test_failhard_stops_the_run_but_not_in_test_mode(tmp_path: Path) -> None:
    sls = "one:\n  test.nop\nboom:\n  test.fail_without_changes:\n    - failhard: True\n" \
          "after:\n  test.nop\n"
    ret, rc = _system(tmp_path, {"f.sls": sls}).apply(["f"])
    assert rc == 2 and _ids(ret) == ["one", "boom"]
    ret, rc = _system(tmp_path, {"f.sls": sls}, test=True).apply(["f"])
    assert rc == 0 and _ids(ret) == ["one", "boom", "after"]


def test_file_states_test_mode_apply_and_idempotence(tmp_path: Path) -> None:
    files = {
        "web/map.jinja": "{% import_yaml 'web/defaults.yaml' as d %}\n"
                         "{% set web = salt['grains.filter_by']({'Debian': {'user': 'www'},"
                         " 'RedHat': {'user': 'apache'}}, merge=d.web) %}\n",
        "web/defaults.yaml": "web:\n  port: 8080\n  root: @OUT@/www\n",
        "web/conf.j2": "port={{ port }} user={{ user }} who={{ pillar['who'] }}\n",
        "web/init.sls": """{% from 'web/map.jinja' import web with context %}
{{ web.root }}:
  file.directory:
    - makedirs: True
    - mode: 750
{{ web.root }}/site.conf:
  file.managed:
    - source: salt://web/conf.j2
    - template: jinja
    - mode: '0600'
    - context:
        port: {{ web.port }}
        user: {{ web.user }}
    - require:
      - file: {{ web.root }}
{{ web.root }}/link:
  file.symlink:
    - target: {{ web.root }}/site.conf
{{ web.root }}/motd:
  file.managed:
    - contents: |
        hi {{ grains['id'] | upper }} {{ 'yes' | to_bool }}
""",
    }
    ret, rc = _system(tmp_path, files, test=True).apply(["web"])
    assert rc == 0
    assert {v["result"] for v in ret.values()} == {None}
    assert not (tmp_path / "out").exists()
    ret, rc = _system(tmp_path, files).apply(["web"])
    assert rc == 0 and all(v["result"] is True and v["changes"] for v in ret.values()), ret
    conf = tmp_path / "out" / "www" / "site.conf"
    assert conf.read_text() == "port=8080 user=www who=pillar\n"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "out" / "www").stat().st_mode & 0o777) == "0o750"
    assert os.readlink(tmp_path / "out" / "www" / "link") == str(conf)
    assert (tmp_path / "out" / "www" / "motd").read_text() == "hi M1 True\n"
    ret, rc = _system(tmp_path, files).apply(["web"])
    assert rc == 0 and all(v["result"] is True and not v["changes"] for v in ret.values()), ret
    ret, rc = _system(tmp_path, files, test=True).apply(["web"])
    assert {v["result"] for v in ret.values()} == {True}


def test_cmd_unless_onlyif_creates(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    sls = """
skip_unless:
  cmd.run:
    - name: touch @OUT@/u
    - unless: 'true'
skip_onlyif:
  cmd.run:
    - name: touch @OUT@/o
    - onlyif: 'false'
skip_creates:
  cmd.run:
    - name: touch @OUT@/c
    - creates: @OUT@
runs:
  cmd.run:
    - name: pwd > @OUT@/r
    - cwd: /tmp
    - unless: 'false'
failing:
  cmd.run:
    - name: exit 3
"""
    ret, rc = _system(tmp_path, {"c.sls": sls}).apply(["c"])
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["skip_unless"]["comment"] == "unless condition is true"
    assert by_id["skip_onlyif"]["comment"] == "onlyif condition is false"
    assert by_id["skip_creates"]["comment"] == f"{tmp_path / 'out'} exists"
    assert sorted(os.listdir(tmp_path / "out")) == ["r"]
    assert (tmp_path / "out" / "r").read_text() == "/tmp\n"
    assert by_id["failing"]["result"] is False and by_id["failing"]["changes"]["retcode"] == 3
    assert rc == 2


@pytest.mark.parametrize("sls, expect", [
    ("a:\n  test.nop:\n    - require:\n      - test: b\nb:\n  test.nop:\n    - require:\n"
     "      - test: a\n", "Recursive requisites were found"),
    ("a:\n  test.nop:\n    - require:\n      - test: nope\n",
     "Referenced state does not exist for requisite [require: (test: nope)]"),
    ("a:\n  test.nop: []\n  test.succeed_without_changes: []\n",
     "contains multiple state declarations of the same type"),
    ("a: [1, 2]\n", "ID a in SLS e is not a dictionary"),
    ("a:\n  test.nop:\n    - name: {{ undefined_fn() }}\n", "Rendering SLS 'base:e' failed"),
    ("a: b: c\n", "Rendering SLS 'base:e' failed: YAML error"),
])
def test_compile_errors_are_salt_shaped(tmp_path: Path, sls: str, expect: str) -> None:
    ret, rc = _system(tmp_path, {"e.sls": sls}).apply(["e"])
    assert rc == 1
    assert isinstance(ret, list) and any(expect in e for e in ret), ret


def test_unknown_function_and_missing_sls(tmp_path: Path) -> None:
    ret, rc = _system(tmp_path, {"u.sls": "x:\n  file.nosuch: []\n"}).apply(["u"])
    assert rc == 2
    assert ret["file_|-x_|-x_|-nosuch"]["comment"].startswith(
        "State 'file.nosuch' was not found in SLS 'u'")
    ret, rc = _system(tmp_path, {"u.sls": ""}).apply(["missing"])
    assert rc == 1 and ret == ["No matching sls found for 'missing' in env 'base'"]


def test_highstate_from_top_and_source_cannot_escape_root(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    files = {
        "top.sls": "base:\n  'm*':\n    - one\n  'other':\n    - two\n",
        "one.sls": "@OUT@/f:\n  file.managed:\n    - source: salt://../secret\n"
                   "    - makedirs: True\n",
        "two.sls": "t:\n  test.nop\n",
    }
    ret, rc = _system(tmp_path, files).apply(None)
    assert rc == 2 and len(ret) == 1
    (only,) = ret.values()
    assert only["result"] is False and "not found" in only["comment"]
    assert not (tmp_path / "out" / "f").exists()


def test_a_second_concurrent_state_run_is_refused(tmp_path: Path) -> None:
    """While one state run holds the minion's run lock, another is refused with Salt's text."""
    from hamaster.minion.modules import state as state_mod

    files = {"t.sls": "t:\n  test.nop\n"}
    first = _system(tmp_path, files).ctx
    first.jid = "20261206000000000001"
    with state_mod._one_run(first, "state.apply") as busy:
        assert busy is None
        ctx2 = _system(tmp_path, files).ctx
        ret = state_mod.apply(ctx2, "t")
        assert ctx2.retcode == 1 and isinstance(ret, list), ret
        assert ret[0].startswith('The function "state.apply" is running as PID')
        assert "with jid 20261206000000000001" in ret[0]
    ret = state_mod.apply(_system(tmp_path, files).ctx, "t")
    assert isinstance(ret, dict)


def test_module_run_file_replace_and_pkg_paths(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cfg").write_text("port = 80\nhost = a\n")
    sls = """
echo:
  module.run:
    - test.echo:
      - hi
    - cmd.run:
      - cmd: echo there
missing:
  module.run:
    - nosuch.fun: []
port:
  file.replace:
    - name: @OUT@/cfg
    - pattern: '^port = \\d+'
    - repl: 'port = 8080'
extra:
  file.replace:
    - name: @OUT@/cfg
    - pattern: '^debug = .*'
    - repl: 'debug = 0'
    - append_if_not_found: True
core:
  pkg.installed:
    - name: coreutils
core-latest:
  pkg.latest:
    - name: coreutils
not-installed:
  pkg.installed:
    - name: sl
no-init:
  service.running:
    - name: nosuch-hamaster-test
"""
    ret, rc = _system(tmp_path, {"m.sls": sls}, test=True).apply(["m"])
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["echo"]["result"] is None
    assert by_id["echo"]["comment"] == "Functions test.echo, cmd.run to be executed."
    assert by_id["missing"]["result"] is False
    assert by_id["port"]["result"] is None and "+port = 8080" in by_id["port"]["changes"]["diff"]
    assert by_id["core"]["result"] is True
    assert by_id["core"]["comment"] == "All specified packages are already installed"
    assert by_id["core-latest"]["comment"] == "Package coreutils is already up-to-date"
    assert by_id["not-installed"]["result"] is None
    assert by_id["not-installed"]["comment"] == ("The following packages would be "
                                                 "installed/updated: sl")
    assert (tmp_path / "out" / "cfg").read_text() == "port = 80\nhost = a\n"
    if not os.path.isdir("/run/systemd/system"):
        assert by_id["no-init"]["result"] is False
        assert "no supported init system" in by_id["no-init"]["comment"]
    sls = sls.replace("not-installed:\n  pkg.installed:\n    - name: sl\n", "")
    ret, rc = _system(tmp_path, {"m.sls": sls}).apply(["m"])
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["echo"]["result"] is True
    assert by_id["echo"]["changes"] == {"test.echo": "hi", "cmd.run": "there"}
    assert by_id["echo"]["comment"] == "test.echo: hi, cmd.run: there"
    assert by_id["port"]["comment"] == "Changes were made"
    assert (tmp_path / "out" / "cfg").read_text() == "port = 8080\nhost = a\ndebug = 0\n"
    ret, rc = _system(tmp_path, {"m.sls": sls}).apply(["m"])
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["port"]["comment"] == "No changes needed to be made"
    assert by_id["extra"]["comment"] == "No changes needed to be made"


@pytest.mark.skipif(os.geteuid() != 0, reason="useradd needs root")
def test_user_and_group_present_absent(tmp_path: Path) -> None:
    import grp
    import pwd
    import subprocess

    user, group = f"hmst{os.getpid() % 100000}", f"hmsg{os.getpid() % 100000}"
    sls = f"""
{group}:
  group.present: []
{user}:
  user.present:
    - shell: /bin/sh
    - home: @OUT@/home
    - groups:
      - {group}
    - require:
      - group: {group}
"""
    gone = f"{user}:\n  user.absent:\n    - purge: True\n{group}:\n  group.absent: []\n"
    try:
        ret, rc = _system(tmp_path, {"u.sls": sls}, test=True).apply(["u"])
        assert rc == 0 and {v["result"] for v in ret.values()} == {None}
        assert ret[f"user_|-{user}_|-{user}_|-present"]["comment"] == (
            f"User {user} set to be added (pending groups: {group})")
        ret, rc = _system(tmp_path, {"u.sls": sls}).apply(["u"])
        assert rc == 0, ret
        pw = pwd.getpwnam(user)
        assert pw.pw_shell == "/bin/sh" and pw.pw_dir == f"{tmp_path}/out/home"
        assert user in grp.getgrnam(group).gr_mem
        assert ret[f"user_|-{user}_|-{user}_|-present"]["changes"]["groups"] == sorted(
            [group, user])
        ret, rc = _system(tmp_path, {"u.sls": sls}).apply(["u"])
        assert all(not v["changes"] for v in ret.values()), ret
        assert ret[f"user_|-{user}_|-{user}_|-present"]["comment"] == (
            f"User {user} is present and up to date")
        ret, rc = _system(tmp_path, {"u.sls": gone}).apply(["u"])
        assert rc == 0, ret
        assert ret[f"user_|-{user}_|-{user}_|-absent"]["comment"] == f"Removed user {user}"
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
    finally:
        subprocess.run(["userdel", "-r", user], capture_output=True, check=False)
        subprocess.run(["groupdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_show_functions_single_and_template_salt_calls(tmp_path: Path) -> None:
    from hamaster.minion.modules import state as state_mod

    (tmp_path / "outside").write_text("secret")
    files = {
        "top.sls": "base:\n  '*':\n    - a\n",
        "a.sls": "{% set who = salt['cmd.run']('echo from-cmd') %}\n"
                 "x:\n  test.show_notification:\n    - text: {{ who }} {{ opts['id'] }}\n"
                 "    - require_in:\n      - test: y\n"
                 "y:\n  test.nop: []\n",
    }
    system = _system(tmp_path, files)
    (tmp_path / "roots" / "link.sls").symlink_to(tmp_path / "outside")
    ctx = system.ctx
    assert state_mod.show_top(ctx) == {"base": ["a"]}
    high = state_mod.show_sls(ctx, "a")
    assert high["x"]["test"][0] == {"text": "from-cmd m1"} and high["x"]["__sls__"] == "a"
    low = state_mod.show_lowstate(ctx)
    assert [c["__id__"] for c in low] == ["x", "y"]
    assert low[1]["require"] == [{"test": "x"}]
    assert state_mod.show_highstate(ctx).keys() == high.keys()
    ret = state_mod.single(ctx, "file.managed", str(tmp_path / "single.txt"), contents="hi")
    assert ctx.retcode == 0 and (tmp_path / "single.txt").read_text() == "hi\n"
    (tag, r), = ret.items()
    assert tag == f"file_|-{tmp_path}/single.txt_|-{tmp_path}/single.txt_|-managed"
    assert set(r) == RET_KEYS
    # an sls symlinked out of the root is not readable
    ret = state_mod.sls(ctx, "link")
    assert ctx.retcode == 1 and ret == ["No matching sls found for 'link' in env 'base'"]


def test_prereq_runs_first_only_when_the_target_would_change(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    sls = """
target:
  file.managed:
    - name: @OUT@/t.txt
    - contents: v1
before:
  cmd.run:
    - name: test -e @OUT@/t.txt || echo before-create >> @OUT@/log
    - prereq:
      - file: target
"""
    ret, rc = _system(tmp_path, {"p.sls": sls}).apply(["p"])
    assert rc == 0 and _ids(ret) == ["before", "target"]
    assert (tmp_path / "out" / "log").read_text() == "before-create\n"
    ret, rc = _system(tmp_path, {"p.sls": sls}).apply(["p"])
    by_id = {v["__id__"]: v for v in ret.values()}
    assert by_id["before"]["comment"] == "No changes detected" and not by_id["before"]["changes"]
    assert (tmp_path / "out" / "log").read_text() == "before-create\n"


def test_cron_present_update_absent_on_a_real_crontab(tmp_path: Path) -> None:
    """cron.present / cron.absent through the real ``crontab`` binary, on a user made for it
    (the user's own lines above Salt's marker are kept)."""
    import shutil
    import subprocess

    if shutil.which("crontab") is None or os.geteuid() != 0:
        pytest.skip("needs root and the crontab binary (Debian package cron)")
    user = f"hmsc{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", user], check=True, capture_output=True)

    def crontab() -> str:
        return subprocess.run(["crontab", "-u", user, "-l"], capture_output=True,
                              text=True).stdout

    sls = f"""
/usr/bin/true backup:
  cron.present:
    - user: {user}
    - minute: "@MIN@"
    - hour: 3
    - identifier: nightly
    - comment: the backup
/usr/bin/true boot:
  cron.present:
    - user: {user}
    - special: "@reboot"
"""
    try:
        subprocess.run(["crontab", "-u", user, "-"], input="# mine\n1 1 * * * /bin/own\n",
                       text=True, check=True)
        ret, rc = _system(tmp_path, {"c.sls": sls.replace("@MIN@", "5")}, test=True).apply(["c"])
        assert rc == 0 and {v["result"] for v in ret.values()} == {None}, ret
        assert "/usr/bin/true" not in crontab()
        ret, rc = _system(tmp_path, {"c.sls": sls.replace("@MIN@", "5")}).apply(["c"])
        assert rc == 0, ret
        key = "cron_|-/usr/bin/true backup_|-/usr/bin/true backup_|-present"
        assert ret[key]["changes"] == {user: "/usr/bin/true backup"}
        assert ret[key]["comment"] == f"Cron /usr/bin/true backup added to {user}'s crontab"
        text = crontab()
        assert text.startswith("# mine\n1 1 * * * /bin/own\n"), text
        assert ("# the backup SALT_CRON_IDENTIFIER:nightly\n5 3 * * * /usr/bin/true backup\n"
                in text), text
        assert "@reboot /usr/bin/true boot\n" in text
        ret, rc = _system(tmp_path, {"c.sls": sls.replace("@MIN@", "5")}).apply(["c"])
        assert rc == 0 and all(not v["changes"] for v in ret.values()), ret
        # A new schedule updates the same entry (found by its identifier), never a second one.
        ret, rc = _system(tmp_path, {"c.sls": sls.replace("@MIN@", "7")}).apply(["c"])
        assert ret[key]["comment"] == f"Cron /usr/bin/true backup updated in {user}'s crontab"
        assert crontab().count("/usr/bin/true backup") == 1 and "7 3 * * *" in crontab()
        gone = (f"/usr/bin/true backup:\n  cron.absent:\n    - user: {user}\n"
                f"    - identifier: nightly\n")
        ret, rc = _system(tmp_path, {"g.sls": gone}).apply(["g"])
        assert rc == 0 and "backup" not in crontab() and "/bin/own" in crontab(), ret
        ret, rc = _system(tmp_path, {"g.sls": gone}).apply(["g"])
        assert not next(iter(ret.values()))["changes"]
    finally:
        subprocess.run(["crontab", "-u", user, "-r"], capture_output=True, check=False)
        subprocess.run(["userdel", user], capture_output=True, check=False)


def _local_apt_repo(tmp_path: Path, package: str, version: str) -> Path:
    """A real .deb in a flat, trusted file: apt repository; returns an ``APT_CONFIG`` file that
    points apt at it alone (own lists and cache dirs: the machine's apt state is untouched)."""
    import hashlib
    import subprocess

    root = tmp_path / "deb" / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/doc" / package).mkdir(parents=True)
    (root / "usr/share/doc" / package / "README").write_text("hamaster pkg state test\n")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: hamaster tests <root@localhost>\nDescription: hamaster test package\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    deb = repo / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    blob = deb.read_bytes()
    (repo / "Packages").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: hamaster tests <root@localhost>\nFilename: ./{deb.name}\n"
        f"Size: {len(blob)}\nSHA256: {hashlib.sha256(blob).hexdigest()}\n"
        f"Description: hamaster test package\n\n")
    state = tmp_path / "aptstate"
    for d in ("lists/partial", "cache/archives/partial"):
        (state / d).mkdir(parents=True)
    (tmp_path / "sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::Etc::SourceList "{tmp_path}/sources.list";\nDir::Etc::SourceParts "/nonexistent";\n'
        f'Dir::State::Lists "{state}/lists";\nDir::Cache "{state}/cache";\n'
        f'APT::Architecture "{arch}";\n')
    return conf


@pytest.mark.skipif(os.geteuid() != 0, reason="installing packages needs root")
def test_pkg_installed_and_removed_install_and_remove_a_real_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pkg.installed / pkg.removed with the real apt-get and dpkg, on a package built here and
    served from a local file: repository (no network)."""
    import shutil
    import subprocess

    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        pytest.skip("needs dpkg-deb and apt-get (Debian family)")
    pkg = f"hamaster-probe{os.getpid() % 100000}"
    monkeypatch.setenv("APT_CONFIG", str(_local_apt_repo(tmp_path, pkg, "1.0-1")))
    readme = Path(f"/usr/share/doc/{pkg}/README")
    sls = f"probe:\n  pkg.installed:\n    - name: {pkg}\n    - refresh: True\n"
    gone = f"probe:\n  pkg.removed:\n    - name: {pkg}\n"
    key_in, key_out = f"pkg_|-probe_|-{pkg}_|-installed", f"pkg_|-probe_|-{pkg}_|-removed"
    try:
        ret, rc = _system(tmp_path, {"p.sls": sls}, test=True).apply(["p"])
        assert ret[key_in]["result"] is None and not readme.exists(), ret
        ret, rc = _system(tmp_path, {"p.sls": sls}).apply(["p"])
        assert rc == 0, ret
        assert ret[key_in]["changes"] == {pkg: {"old": "", "new": "1.0-1"}}
        assert ret[key_in]["comment"] == f"The following packages were installed/updated: {pkg}"
        assert readme.read_text() == "hamaster pkg state test\n"
        ret, rc = _system(tmp_path, {"p.sls": sls}).apply(["p"])
        assert rc == 0 and not ret[key_in]["changes"], ret
        ret, rc = _system(tmp_path, {"r.sls": gone}).apply(["r"])
        assert rc == 0, ret
        assert ret[key_out]["changes"] == {pkg: {"old": "1.0-1", "new": ""}}
        assert not readme.exists()
        ret, rc = _system(tmp_path, {"r.sls": gone}).apply(["r"])
        assert ret[key_out]["comment"] == "All specified packages are already absent"
    finally:
        subprocess.run(["dpkg", "--purge", pkg], capture_output=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or os.path.isdir("/run/systemd/system"),
                    reason="needs root, and a machine without systemd (the SysV path)")
def test_service_states_drive_a_real_sysv_init_script(tmp_path: Path) -> None:
    """service.running / enabled / dead and a watch restart on a real /etc/init.d script
    (the init these machines have) that runs a real daemon."""
    import shutil
    import signal
    import subprocess

    if shutil.which("update-rc.d") is None:
        pytest.skip("needs update-rc.d (Debian package init-system-helpers)")
    name = f"hamaster-probe{os.getpid() % 100000}"
    pidfile = tmp_path / "probe.pid"
    script = Path("/etc/init.d") / name
    script.write_text(f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: hamaster test daemon
### END INIT INFO
P={pidfile}
running() {{ [ -f $P ] && kill -0 "$(cat $P)" 2>/dev/null; }}
case "$1" in
  start) running && exit 0; setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! >$P ;;
  stop) running && kill "$(cat $P)"; rm -f $P ;;
  restart) "$0" stop; "$0" start ;;
  status) running ;;
  *) exit 3 ;;
esac
""")
    script.chmod(0o755)
    sls = f"""
conf:
  file.managed:
    - name: @OUT@/probe.conf
    - contents: "@WORD@"
    - makedirs: True
{name}:
  service.running:
    - enable: True
    - watch:
      - file: conf
"""
    key = f"service_|-{name}_|-{name}_|-running"
    try:
        ret, rc = _system(tmp_path, {"s.sls": sls.replace("@WORD@", "one")}, test=True).apply(
            ["s"])
        assert ret[key]["result"] is None and not pidfile.exists(), ret
        ret, rc = _system(tmp_path, {"s.sls": sls.replace("@WORD@", "one")}).apply(["s"])
        assert rc == 0, ret
        first = int(pidfile.read_text())
        os.kill(first, 0)
        assert glob_links(name), "not enabled"
        ret, rc = _system(tmp_path, {"s.sls": sls.replace("@WORD@", "one")}).apply(["s"])
        assert rc == 0 and not ret[key]["changes"], ret
        assert ret[key]["comment"] == f"The service {name} is already running"
        # The watched file changes: the daemon is restarted (a new process).
        ret, rc = _system(tmp_path, {"s.sls": sls.replace("@WORD@", "two")}).apply(["s"])
        assert rc == 0 and ret[key]["comment"] == "Service restarted", ret
        second = int(pidfile.read_text())
        assert second != first
        dead = f"{name}:\n  service.dead:\n    - enable: False\n"
        ret, rc = _system(tmp_path, {"d.sls": dead}).apply(["d"])
        assert rc == 0, ret
        assert not pidfile.exists() and not glob_links(name)
        deadline = time.monotonic() + 10
        while _alive(second) and time.monotonic() < deadline:
            time.sleep(0.05)        # polling a condition with a deadline
        assert not _alive(second), "service.dead left the daemon running"
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["update-rc.d", "-f", name, "remove"], capture_output=True, check=False)
        script.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (whoever reaps orphans may be slow or absent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def glob_links(name: str) -> list[str]:
    import glob
    return glob.glob(f"/etc/rc[2345].d/S[0-9][0-9]{name}")
