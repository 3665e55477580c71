"""Tests for the Salt-style config loader."""

from __future__ import annotations

import logging
import socket

import pytest

from hamaster.config import (
    ConfigError,
    load_master_config,
    load_minion_config,
    setup_logging,
)


def test_defaults_when_no_file(tmp_path):
    opts = load_master_config(tmp_path)
    assert opts["publish_port"] == 4505
    assert opts["ret_port"] == 4506
    assert opts["pki_dir"] == "/etc/hamaster/pki/master"
    assert opts["master_id"] == socket.gethostname()
    assert opts["conf_file"] == str(tmp_path / "master")
    assert opts["__role"] == "master"
    # defaults are not shared mutable state
    opts["file_roots"]["base"].append("/x")
    assert load_master_config(tmp_path)["file_roots"] == {"base": ["/srv/salt"]}


def test_main_file_then_d_files_in_order(tmp_path):
    (tmp_path / "master").write_text("publish_port: 5505\ntimeout: 9\n")
    d = tmp_path / "master.d"
    d.mkdir()
    (d / "20-b.conf").write_text("timeout: 30\n")
    (d / "10-a.conf").write_text("timeout: 20\nauto_accept: true\n")
    (d / "ignored.txt").write_text("timeout: 99\n")
    opts = load_master_config(tmp_path)
    assert opts["publish_port"] == 5505
    assert opts["timeout"] == 30
    assert opts["auto_accept"] is True


def test_env_var_sets_default_confdir(tmp_path, monkeypatch):
    (tmp_path / "master").write_text("ret_port: 7506\n")
    monkeypatch.setenv("HAMASTER_CONFIG_DIR", str(tmp_path))
    assert load_master_config()["ret_port"] == 7506


def test_wrong_type_names_file_option_and_type(tmp_path):
    (tmp_path / "master").write_text("publish_port: abc\n")
    with pytest.raises(ConfigError) as exc:
        load_master_config(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "master") in msg
    assert "'publish_port'" in msg and "integer" in msg and "'abc' (str)" in msg


def test_bool_is_not_an_int_and_int_is_a_float(tmp_path):
    with pytest.raises(ConfigError, match="keysize"):
        load_master_config(tmp_path, {"keysize": True})
    opts = load_master_config(tmp_path, {"ha_poll_interval": 2})
    assert opts["ha_poll_interval"] == 2.0 and isinstance(opts["ha_poll_interval"], float)


def test_a_count_of_threads_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="'zmq_io_threads' must be a positive integer, got 0"):
        load_master_config(tmp_path, {"zmq_io_threads": 0})
    assert load_master_config(tmp_path, {"zmq_io_threads": 2})["zmq_io_threads"] == 2


def test_overrides_are_type_checked(tmp_path):
    with pytest.raises(ConfigError, match="<overrides>.*auto_accept"):
        load_master_config(tmp_path, {"auto_accept": "yes"})


def test_invalid_yaml_and_non_mapping(tmp_path):
    (tmp_path / "master").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_master_config(tmp_path)
    (tmp_path / "master").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_master_config(tmp_path)


def test_unreadable_file(tmp_path):
    (tmp_path / "master").mkdir()  # a directory cannot be read as a file
    with pytest.raises(ConfigError, match="cannot read"):
        load_master_config(tmp_path)


def test_unknown_option_warns(tmp_path, caplog):
    (tmp_path / "master").write_text("no_such_option: 1\n")
    with caplog.at_level(logging.WARNING, logger="hamaster.config"):
        opts = load_master_config(tmp_path)
    assert opts["no_such_option"] == 1
    assert any("no_such_option" in r.getMessage() for r in caplog.records)


def test_undeclared_salt_options_warn_saltgui_options_do_not(tmp_path, caplog):
    # worker_threads / user: Salt's, declared before but never read; saltgui_*: SaltGUI's
    (tmp_path / "master").write_text("worker_threads: 5\nuser: salt\nsaltgui_templates: {}\n")
    with caplog.at_level(logging.WARNING, logger="hamaster.config"):
        opts = load_master_config(tmp_path)
    assert opts["worker_threads"] == 5 and opts["saltgui_templates"] == {}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'worker_threads'" in warned and "'user'" in warned and "saltgui" not in warned


def test_bad_log_level_rejected(tmp_path):
    with pytest.raises(ConfigError, match="log_level"):
        load_master_config(tmp_path, {"log_level": "loud"})


def test_root_dir_prefixes_paths(tmp_path):
    root = tmp_path / "root"
    (tmp_path / "master").write_text(
        f"root_dir: {root}\ncachedir: cache\nsock_dir: {root}/already\n"
        "log_file: udp://loghost:514\nautosign_file: /etc/autosign\n"
    )
    opts = load_master_config(tmp_path)
    assert opts["pki_dir"] == f"{root}/etc/hamaster/pki/master"
    assert opts["cachedir"] == f"{root}/cache"
    assert opts["sock_dir"] == f"{root}/already"
    assert opts["log_file"] == "udp://loghost:514"
    assert opts["autosign_file"] == f"{root}/etc/autosign"
    assert opts["ha_dir"] is None


def test_root_slash_leaves_absolute_paths(tmp_path):
    opts = load_master_config(tmp_path, {"pki_dir": "/srv/pki"})
    assert opts["pki_dir"] == "/srv/pki"


def test_minion_master_list(tmp_path):
    (tmp_path / "minion").write_text(
        "master:\n  - m1\n  - m2:5506\n  - '[::1]:7506'\n  - '[fe80::1]'\nmaster_port: 4600\n"
    )
    opts = load_minion_config(tmp_path)
    assert opts["__role"] == "minion"
    assert opts["master_list"] == [("m1", 4600), ("m2", 5506), ("::1", 7506), ("fe80::1", 4600)]


def test_minion_master_default_and_string(tmp_path):
    assert load_minion_config(tmp_path)["master_list"] == [("salt", 4506)]
    opts = load_minion_config(tmp_path, {"master": "10.0.0.1:1234"})
    assert opts["master_list"] == [("10.0.0.1", 1234)]


@pytest.mark.parametrize("entry", ["m1:http", "m1:0", "m1:70000", "[::1]x"])
def test_minion_bad_master_port(tmp_path, entry):
    with pytest.raises(ConfigError, match="master"):
        load_minion_config(tmp_path, {"master": [entry]})


def test_minion_master_wrong_type(tmp_path):
    (tmp_path / "minion").write_text("master: 12\n")
    with pytest.raises(ConfigError, match="'master' must be a string or a list"):
        load_minion_config(tmp_path)


def test_setup_logging_writes_file_and_respects_levels(tmp_path):
    log_file = tmp_path / "logs" / "master"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging({"log_file": str(log_file), "log_level": "error",
                       "log_level_logfile": "debug"})
        logging.getLogger("hamaster.test").debug("hello-debug")
        for h in root.handlers:
            h.flush()
        text = log_file.read_text()
        assert "hello-debug" in text and "[hamaster.test:" in text and "[DEBUG]" in text
        console = [h for h in root.handlers if getattr(h, "_hamaster_handler", False)
                   and isinstance(h, logging.StreamHandler)
                   and not isinstance(h, logging.FileHandler)]
        assert console and console[0].level == logging.ERROR
        setup_logging({"log_file": None, "log_level": "warning"}, "quiet")
        ours = [h for h in root.handlers if getattr(h, "_hamaster_handler", False)]
        assert len(ours) == 1 and ours[0].level > logging.CRITICAL
        with pytest.raises(ConfigError):
            setup_logging({"log_file": None}, "loud")
    finally:
        for h in root.handlers[:]:
            if getattr(h, "_hamaster_handler", False):
                root.removeHandler(h)
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
