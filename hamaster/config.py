"""Salt-style configuration loading for the master and minion: defaults, YAML files, validation.

A configuration directory (``/etc/hamaster`` by default, ``$HAMASTER_CONFIG_DIR`` or ``-c``)
holds a main file (``master`` or ``minion``) and an include directory (``master.d/*.conf`` or
``minion.d/*.conf``). Option names and defaults follow Salt; paths are hamaster's. Files are
merged top-level in order: defaults, main file, include files sorted by name, then overrides.
Every option is type-checked; a wrong type is a :class:`ConfigError` naming the file, the option
and the expected type. Unknown options are logged as warnings, not errors.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/hamaster"
CONFIG_DIR_ENV = "HAMASTER_CONFIG_DIR"

LOG_FORMAT = "%(asctime)s [%(name)s:%(lineno)d][%(levelname)s] %(message)s"
#: A log message longer than this (characters) is cut: one line never floods the log.
MAX_LOG_MESSAGE = 16384


class ConfigError(Exception):
    """A configuration file or value is unusable; the message names the file and the option."""


# --------------------------------------------------------------------------- type specs

_Check = Callable[[Any], bool]


class _Spec:
    """How to validate (and lightly coerce) one option's value."""

    def __init__(self, name: str, check: _Check, coerce: Callable[[Any], Any] | None = None):
        self.name = name
        self.check = check
        self.coerce = coerce

    def validate(self, value: Any) -> Any:
        if not self.check(value):
            raise TypeError(self.name)
        return self.coerce(value) if self.coerce else value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


INT = _Spec("an integer", _is_int)
FLOAT = _Spec("a number", _is_float, float)
BOOL = _Spec("a boolean (true/false)", lambda v: isinstance(v, bool))
STR = _Spec("a string", lambda v: isinstance(v, str))
STR_OR_NONE = _Spec("a string or null", lambda v: v is None or isinstance(v, str))
INT_OR_STR = _Spec("an integer or a string", lambda v: _is_int(v) or isinstance(v, str))
LIST = _Spec("a list", lambda v: isinstance(v, list))
STR_LIST = _Spec("a list of strings", _is_str_list)
DICT = _Spec("a mapping", lambda v: isinstance(v, dict))
STR_OR_LIST = _Spec(
    "a string or a list of strings", lambda v: isinstance(v, str) or _is_str_list(v)
)
LOG_LEVEL = _Spec("a log level name", lambda v: isinstance(v, str))
LOG_LEVEL_OR_NONE = _Spec("a log level name or null", lambda v: v is None or isinstance(v, str))


def _is_roots(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and _is_str_list(paths) for k, paths in v.items()
    )


ROOTS = _Spec("a mapping of environment name to a list of directories", _is_roots)
DICT_OR_NONE = _Spec("a mapping or null", lambda v: v is None or isinstance(v, dict))

# --------------------------------------------------------------------------- defaults

MASTER_DEFAULTS: dict[str, Any] = {
    "interface": "0.0.0.0",
    "publish_port": 4505,
    "ret_port": 4506,
    "root_dir": "/",
    "pki_dir": "/etc/hamaster/pki/master",
    "cachedir": "/var/cache/hamaster/master",
    "sock_dir": "/var/run/hamaster/master",
    "log_file": "/var/log/hamaster/master",
    "log_level": "warning",
    "log_level_logfile": None,
    "keysize": 2048,
    "auto_accept": False,
    "autosign_file": None,
    "autoreject_file": None,
    "open_mode": False,
    "file_roots": {"base": ["/srv/salt"]},
    "pillar_roots": {"base": ["/srv/pillar"]},
    "timeout": 5,
    "gather_job_timeout": 10,
    "keep_jobs": 24,
    "minimum_auth_version": 3,
    "request_server_ttl": 300,
    "max_request_size": 32 * 1024 * 1024,
    "max_clear_request_size": 64 * 1024,
    "max_pending_keys": 10000,
    "pending_keys_per_second": 50.0,
    "zmq_filtering": False,
    "master_id": None,
    "rotate_aes_key": True,
    "key_confirm_timeout": 5.0,
    "metrics_port": 0,
    "metrics_interface": "127.0.0.1",
    "ha_backend": "fs",
    "ha_dir": None,
    "ha_poll_interval": 0.5,
    "ha_member_ttl": 5.0,
    "ha_etcd_endpoints": [],
    "ha_etcd_prefix": "/hamaster",
    "ha_rsync_peers": [],
    "ha_rsync_password_file": None,
    "ha_etcd_ca": None,
    "ha_etcd_cert": None,
    "ha_etcd_key": None,
    "ha_etcd_timeout": 5.0,
    "file_blob_port": 0,
    "file_blob_interface": None,
    "ha_rsync_interval": 30.0,
    "ha_rsync_debounce": 0.2,
    "ha_rsync_max_backoff": 30.0,
    "ha_rsync_tombstone_ttl": 604800.0,
    "ha_rsync_ssh": "ssh -o BatchMode=yes -o ConnectTimeout=5",
    "ha_create_master_key": False,
    "ha_lease_ttl": 5.0,
    "user": "root",
    "worker_threads": 5,
    # REST API (hamaster/api): salt-api's block name, an alias, eauth and its ACLs
    "rest_cherrypy": None,
    "rest_api": None,
    "external_auth": {},
    "token_expire": 43200.0,
    "netapi_enable_clients": [],
    "publisher_acl": {},
    "publisher_acl_blacklist": {},
}

MASTER_TYPES: dict[str, _Spec] = {
    "interface": STR,
    "publish_port": INT,
    "ret_port": INT,
    "root_dir": STR,
    "pki_dir": STR,
    "cachedir": STR,
    "sock_dir": STR,
    "log_file": STR,
    "log_level": LOG_LEVEL,
    "log_level_logfile": LOG_LEVEL_OR_NONE,
    "keysize": INT,
    "auto_accept": BOOL,
    "zmq_backlog": INT,              # listen queue of the request and publish ports (1000)
    "auth_queue_max": INT,           # master/authqueue.py
    "auth_queue_max_age": FLOAT,
    "autosign_file": STR_OR_NONE,
    "autoreject_file": STR_OR_NONE,
    "open_mode": BOOL,
    "file_roots": ROOTS,
    "pillar_roots": ROOTS,
    # pillar (hamaster/pillar/) and the minion data cache; defaults live in the code using them
    "pillar_source_merging_strategy": STR,
    "pillar_merge_lists": BOOL,
    "pillar_max_size": INT,
    "pillar_safe_render_error": BOOL,
    "pillar_includes_override_sls": BOOL,
    "pillar_tree_ttl": FLOAT,
    "pillarenv": STR_OR_NONE,
    "renderer": STR,
    "state_top": STR,
    "nodegroups": DICT,
    "minion_data_max_size": INT,
    "gpg_keydir": STR_OR_NONE,
    "pillar_cache_entries": INT,
    "timeout": INT,
    "gather_job_timeout": FLOAT,
    "keep_jobs": FLOAT,
    "minimum_auth_version": INT,
    "request_server_ttl": INT,
    "max_request_size": INT,
    "max_clear_request_size": INT,
    "max_pending_keys": INT,
    "pending_keys_per_second": FLOAT,
    "zmq_filtering": BOOL,
    "master_id": STR_OR_NONE,
    "rotate_aes_key": BOOL,
    "key_confirm_timeout": FLOAT,
    "metrics_port": INT,
    "metrics_interface": STR,
    "ha_backend": STR,
    "ha_dir": STR_OR_NONE,
    "ha_poll_interval": FLOAT,
    "ha_member_ttl": FLOAT,
    "ha_etcd_endpoints": STR_LIST,
    "ha_etcd_prefix": STR,
    "ha_rsync_peers": STR_LIST,
    "ha_rsync_password_file": STR_OR_NONE,
    "ha_etcd_ca": STR_OR_NONE,
    "ha_etcd_cert": STR_OR_NONE,
    "ha_etcd_key": STR_OR_NONE,
    "ha_etcd_timeout": FLOAT,
    "file_blob_port": INT,
    "file_blob_interface": STR_OR_NONE,
    "ha_rsync_interval": FLOAT,
    "ha_rsync_debounce": FLOAT,
    "ha_rsync_max_backoff": FLOAT,
    "ha_rsync_tombstone_ttl": FLOAT,
    "ha_rsync_ssh": STR,
    "ha_create_master_key": BOOL,
    "user": STR,
    "worker_threads": INT,
    "rest_cherrypy": DICT_OR_NONE,
    "rest_api": DICT_OR_NONE,
    "external_auth": DICT,
    "token_expire": FLOAT,
    "netapi_enable_clients": STR_LIST,
    "publisher_acl": DICT,
    "publisher_acl_blacklist": DICT,
    # event bus, leader lease, reactor, schedule (hamaster/events/, docs/operator-guide.md)
    "ha_lease_ttl": FLOAT,
    "event_retention": FLOAT,
    "event_memory": INT,
    "event_merge_window": FLOAT,
    "reactor": LIST,
    "schedule": DICT,
}

MINION_DEFAULTS: dict[str, Any] = {
    "id": None,
    "master": "salt",
    "master_port": 4506,
    "publish_port": 4505,
    "master_type": "str",
    "master_alive_interval": 0,
    "master_finger": "",
    "acceptance_wait_time": 10,
    "acceptance_wait_time_max": 0,
    "random_reauth_delay": 10,
    "auth_timeout": 5,
    "auth_tries": 7,
    "zmq_filtering": False,
    "grains": {},
    "root_dir": "/",
    "pki_dir": "/etc/hamaster/pki/minion",
    "cachedir": "/var/cache/hamaster/minion",
    "sock_dir": "/var/run/hamaster/minion",
    "log_file": "/var/log/hamaster/minion",
    "log_level": "warning",
    "log_level_logfile": None,
    "keysize": 2048,
    "master_heartbeat_interval": 2.0,
    "master_dead_after": 6.0,
    "master_retry_max": 2.0,
    # Salt's names and meanings; shorter defaults than Salt's 1000/10000 ms (HA: a master that
    # comes back is used again within seconds; recon_randomize spreads the fleet).
    "recon_default": 200,
    "recon_max": 1000,
    "recon_randomize": True,
    "return_retry_timer": 5,
    "metrics_port": 0,
    "user": "root",
    "startup_states": "",
    "file_client": "remote",
    "multiprocessing": False,
    "swarm_count": 0,
    "file_roots": {"base": ["/srv/salt"]},
    "pillar_roots": {"base": ["/srv/pillar"]},
    "failhard": False,
    "test": False,
}

MINION_TYPES: dict[str, _Spec] = {
    "id": STR_OR_NONE,
    "master": STR_OR_LIST,
    "master_port": INT,
    "publish_port": INT,
    "master_type": STR,
    "master_alive_interval": INT,
    "master_finger": STR,
    "acceptance_wait_time": FLOAT,
    "acceptance_wait_time_max": FLOAT,
    "random_reauth_delay": FLOAT,
    "auth_timeout": FLOAT,
    "auth_tries": INT,
    "zmq_filtering": BOOL,
    "grains": DICT,
    "mine_functions": DICT,
    "mine_interval": INT,
    "root_dir": STR,
    "pki_dir": STR,
    "cachedir": STR,
    "sock_dir": STR,
    "log_file": STR,
    "log_level": LOG_LEVEL,
    "log_level_logfile": LOG_LEVEL_OR_NONE,
    "keysize": INT,
    "master_heartbeat_interval": FLOAT,
    "master_dead_after": FLOAT,
    "master_retry_max": FLOAT,
    "recon_default": INT,
    "recon_max": INT,
    "recon_randomize": BOOL,
    "return_retry_timer": FLOAT,
    "metrics_port": INT,
    "user": STR,
    "startup_states": STR,
    "file_client": STR,
    "multiprocessing": BOOL,
    "swarm_count": INT,
    # states (hamaster/states/): masterless roots and run options
    "file_roots": ROOTS,
    "pillar_roots": ROOTS,
    "renderer": STR,
    "state_top": STR,
    "saltenv": STR_OR_NONE,
    "failhard": BOOL,
    "test": BOOL,
}

#: Options holding a filesystem path that is re-rooted under ``root_dir``.
PATH_OPTIONS = ("pki_dir", "cachedir", "sock_dir", "log_file", "autosign_file",
                "autoreject_file")

_LOG_URL_PREFIXES = ("file://", "udp://", "tcp://")

LOG_LEVELS: dict[str, int] = {
    "garbage": logging.DEBUG,
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "quiet": logging.CRITICAL + 10,
}

# --------------------------------------------------------------------------- loading


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate(source: str, data: Mapping[str, Any], types: Mapping[str, _Spec]) -> dict[str, Any]:
    """Type-check ``data`` against ``types``; returns the (coerced) options."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: option names must be strings, got {_describe(key)}")
        spec = types.get(key)
        if spec is None:
            if not key.startswith("__"):
                log.warning("%s: unknown option %r (ignored by hamaster, kept as is)", source, key)
            out[key] = value
            continue
        try:
            out[key] = spec.validate(value)
        except TypeError:
            raise ConfigError(
                f"{source}: option {key!r} must be {spec.name}, got {_describe(value)}"
            ) from None
        if spec in (LOG_LEVEL, LOG_LEVEL_OR_NONE) and value is not None:
            if value.lower() not in LOG_LEVELS:
                raise ConfigError(
                    f"{source}: option {key!r} must be one of "
                    f"{', '.join(sorted(LOG_LEVELS))}, got {value!r}"
                )
    return out


def _read_file(path: Path) -> dict[str, Any]:
    """Read one YAML config file; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of option: value, "
            f"got {type(data).__name__}"
        )
    return data


def _resolve_confdir(confdir: str | Path | None) -> Path:
    if confdir is None:
        confdir = os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR
    return Path(confdir)


def _apply_root_dir(opts: dict[str, Any]) -> None:
    """Re-root path options under ``root_dir`` the way Salt does."""
    root = opts.get("root_dir") or "/"
    for key in PATH_OPTIONS:
        value = opts.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key == "log_file" and value.startswith(_LOG_URL_PREFIXES):
            continue
        if not os.path.isabs(value):
            opts[key] = os.path.normpath(os.path.join(root, value))
        elif root != "/":
            norm_root = os.path.normpath(root)
            norm = os.path.normpath(value)
            if norm != norm_root and not norm.startswith(norm_root.rstrip(os.sep) + os.sep):
                opts[key] = os.path.normpath(os.path.join(norm_root, value.lstrip(os.sep)))


def parse_master_list(masters: str | list[str], default_port: int,
                      source: str = "<config>") -> list[tuple[str, int]]:
    """Parse minion ``master`` entries (``host``, ``host:port``, ``[v6]:port``) into tuples."""
    if isinstance(masters, str):
        masters = [masters]
    result: list[tuple[str, int]] = []
    for entry in masters:
        entry = entry.strip()
        if not entry:
            raise ConfigError(f"{source}: option 'master' contains an empty entry")
        host, port_text = entry, None
        if entry.startswith("["):
            end = entry.find("]")
            if end < 0:
                raise ConfigError(f"{source}: option 'master' entry {entry!r}: missing ']'")
            host = entry[1:end]
            rest = entry[end + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(
                        f"{source}: option 'master' entry {entry!r}: expected ':PORT' after ']'"
                    )
                port_text = rest[1:]
        elif entry.count(":") == 1:
            host, port_text = entry.split(":", 1)
        # several ':' without brackets: a bare IPv6 address, no port
        port = default_port
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ConfigError(
                    f"{source}: option 'master' entry {entry!r}: port must be an integer "
                    f"between 1 and 65535, got {port_text!r}"
                )
            port = int(port_text)
        if not host:
            raise ConfigError(f"{source}: option 'master' entry {entry!r}: empty host")
        result.append((host, port))
    return result


def _load(role: str, defaults: dict[str, Any], types: dict[str, _Spec],
          confdir: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    cdir = _resolve_confdir(confdir)
    main = cdir / role
    opts = copy.deepcopy(defaults)
    if main.exists():
        opts.update(_validate(str(main), _read_file(main), types))
    else:
        log.debug("%s: not found, using defaults", main)
    include_dir = cdir / f"{role}.d"
    if include_dir.is_dir():
        for path in sorted(include_dir.glob("*.conf")):
            opts.update(_validate(str(path), _read_file(path), types))
    if overrides:
        opts.update(_validate("<overrides>", overrides, types))
    opts["conf_file"] = str(main)
    opts["config_dir"] = str(cdir)
    opts["__role"] = role
    _apply_root_dir(opts)
    return opts


def load_master_config(confdir: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the master's options from ``CONFDIR/master`` and ``CONFDIR/master.d/*.conf``.

    ``confdir`` defaults to ``$HAMASTER_CONFIG_DIR`` or ``/etc/hamaster``. Raises
    :class:`ConfigError` on unreadable files, bad YAML or a wrong option type.
    """
    opts = _load("master", MASTER_DEFAULTS, MASTER_TYPES, confdir, overrides)
    if not opts.get("master_id"):
        opts["master_id"] = socket.gethostname()
    return opts


def load_minion_config(confdir: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the minion's options from ``CONFDIR/minion`` and ``CONFDIR/minion.d/*.conf``.

    Adds ``master_list``: the ``master`` option parsed into ``(host, port)`` tuples.
    """
    opts = _load("minion", MINION_DEFAULTS, MINION_TYPES, confdir, overrides)
    opts["master_list"] = parse_master_list(opts["master"], opts["master_port"],
                                            opts["conf_file"])
    return opts


# --------------------------------------------------------------------------- logging


def _level_of(name: str | None) -> int:
    if name is None:
        return logging.WARNING
    try:
        return LOG_LEVELS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown log level {name!r}; use one of {', '.join(sorted(LOG_LEVELS))}"
        ) from None


_HANDLER_MARK = "_hamaster_handler"


class OneLineFormatter(logging.Formatter):
    """``LOG_FORMAT`` with every message kept on one line and cut at :data:`MAX_LOG_MESSAGE`.

    Control characters, newlines, escape sequences and bidi controls in a message (say, from a
    minion id or a command's output) come out escaped (``\\n``, ``\\x1b``), so no text can forge
    a log line or drive a terminal. A traceback after the message is left as it is.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """The formatted line with the message escaped and cut."""
        from hamaster.ids import one_line

        record.message = one_line(record.message, MAX_LOG_MESSAGE)
        return super().formatMessage(record)


def _open_private_log(path: str) -> None:
    """Create ``path`` (and its directory, 0700) if missing; make our own log file 0600."""
    parent = Path(path).parent
    if not parent.exists():
        parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            parent.mkdir(mode=0o700)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077 and stat.S_ISREG(st.st_mode):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def setup_logging(opts: dict[str, Any], level: str | None = None) -> None:
    """Configure the root logger: console (stderr) at ``level`` or ``log_level``, plus a file.

    The file handler writes to ``log_file`` when it is a plain path (created 0600, its parent
    directory 0700 when missing; an existing log file of ours is made 0600), at
    ``log_level_logfile`` or else ``log_level``. Messages are kept on one line
    (:class:`OneLineFormatter`). Calling again replaces the handlers installed by a previous call.
    """
    console_level = _level_of(level or opts.get("log_level") or "warning")
    file_level_name = opts.get("log_level_logfile") or opts.get("log_level") or "warning"
    file_level = _level_of(file_level_name)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    formatter = OneLineFormatter(LOG_FORMAT)
    levels = [console_level]
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(formatter)
    setattr(console, _HANDLER_MARK, True)
    root.addHandler(console)

    log_file = opts.get("log_file")
    if isinstance(log_file, str) and log_file:
        path = log_file[len("file://"):] if log_file.startswith("file://") else log_file
        if not path.startswith(("udp://", "tcp://")):
            try:
                _open_private_log(path)
                fh = logging.FileHandler(path, encoding="utf-8")
            except OSError as exc:
                log.warning("cannot open log file %s: %s (logging to stderr only)", path, exc)
            else:
                fh.setLevel(file_level)
                fh.setFormatter(formatter)
                setattr(fh, _HANDLER_MARK, True)
                root.addHandler(fh)
                levels.append(file_level)
    root.setLevel(min(levels))
