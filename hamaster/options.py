"""Every configuration option of the master and the minion, in one table.

One :class:`Option` per option and role: its name, default, type, scope (``host``: describes
one machine, never taken from the cluster's shared ``config/master.d/`` and left out of the
config hash; ``cluster``: must agree across masters) and a one-line doc. The store backends
declare their own options next to their code (``OPTIONS`` on each class of
:mod:`hamaster.store`) and :mod:`hamaster.config` merges them into the master's table through
:mod:`hamaster.store.registry`; ``docs/operator-guide.md``'s option reference is generated from
the merged table (``scripts/gen-options-doc``).

Code reads an option as ``opts["name"]`` or ``opts.get("name")`` on a loaded configuration (a
mapping named ``opts`` or an ``.opts`` attribute); a function that may be handed a partial
mapping uses :func:`opt`, which falls back to the table's default. ``tests/unit/test_options.py``
walks the code for these reads and fails on an undeclared or unused option.

A leaf module: imports nothing from hamaster, so the stores can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MASTER = "master"
MINION = "minion"
#: Scope: one machine's setting (may differ between masters).
HOST = "host"
#: Scope: the cluster's setting (``config/master.d/`` fragments may set it; hashed).
CLUSTER = "cluster"

# --------------------------------------------------------------------------- types


class Spec:
    """How to validate (and lightly coerce) one option's value; ``name`` is said in errors."""

    def __init__(self, name: str, check: Callable[[Any], bool],
                 coerce: Callable[[Any], Any] | None = None, log_level: bool = False):
        self.name = name
        self.check = check
        self.coerce = coerce
        #: A log level name: the loader also checks it against the known levels.
        self.log_level = log_level

    def validate(self, value: Any) -> Any:
        """The (coerced) value; ``TypeError`` when it is not of this type."""
        if not self.check(value):
            raise TypeError(self.name)
        return self.coerce(value) if self.coerce else value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_roots(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and _is_str_list(paths) for k, paths in v.items()
    )


INT = Spec("an integer", _is_int)
POS_INT = Spec("a positive integer", lambda v: _is_int(v) and v > 0)
FLOAT = Spec("a number", _is_float, float)
BOOL = Spec("a boolean (true/false)", lambda v: isinstance(v, bool))
STR = Spec("a string", lambda v: isinstance(v, str))
STR_OR_NONE = Spec("a string or null", lambda v: v is None or isinstance(v, str))
LIST = Spec("a list", lambda v: isinstance(v, list))
STR_LIST = Spec("a list of strings", _is_str_list)
DICT = Spec("a mapping", lambda v: isinstance(v, dict))
DICT_OR_NONE = Spec("a mapping or null", lambda v: v is None or isinstance(v, dict))
STR_OR_LIST = Spec(
    "a string or a list of strings", lambda v: isinstance(v, str) or _is_str_list(v)
)
LOG_LEVEL = Spec("a log level name", lambda v: isinstance(v, str), log_level=True)
LOG_LEVEL_OR_NONE = Spec("a log level name or null", lambda v: v is None or isinstance(v, str),
                         log_level=True)
ROOTS = Spec("a mapping of environment name to a list of directories", _is_roots)
BOOL_OR_LIST = Spec("a boolean or a list", lambda v: isinstance(v, (bool, list)))
#: Set by the loader (``conf_file``, ``master_list``): never read from a file.
COMPUTED = Spec("set by hamaster", lambda v: True)


@dataclass(frozen=True)
class Option:
    """One option of one or both roles (see the module docstring for ``scope``)."""

    name: str
    default: Any
    type: Spec
    doc: str
    scope: str = CLUSTER
    roles: tuple[str, ...] = (MASTER,)

    @property
    def computed(self) -> bool:
        """Set by the loader, not by the operator (not type-checked, not in the defaults)."""
        return self.type is COMPUTED


def _m(name: str, default: Any, type_: Spec, doc: str, scope: str = CLUSTER) -> Option:
    return Option(name, default, type_, doc, scope, (MASTER,))


def _n(name: str, default: Any, type_: Spec, doc: str) -> Option:
    return Option(name, default, type_, doc, HOST, (MINION,))


def _both(name: str, default: Any, type_: Spec, doc: str, scope: str = HOST) -> Option:
    return Option(name, default, type_, doc, scope, (MASTER, MINION))


# --------------------------------------------------------------------------- the table
# Backend options (ha_dir, ha_etcd_*, ha_rsync_*, ha_create_master_key) are declared by the
# backends in hamaster/store/ and merged in by hamaster.config.

OPTIONS: tuple[Option, ...] = (
    # -- both roles: files, logging, keys
    _both("root_dir", "/", STR, "Prefix of every path option (Salt's `root_dir`)."),
    _m("pki_dir", "/etc/hamaster/pki/master", STR,
       "Master keys and, on a lone master, the minion keys.", HOST),
    _n("pki_dir", "/etc/hamaster/pki/minion", STR, "The minion's keypair and the master's key."),
    _m("cachedir", "/var/cache/hamaster/master", STR,
       "Local cache: jobs of a lone master, events, blob cache, tokens.", HOST),
    _n("cachedir", "/var/cache/hamaster/minion", STR, "The minion's cache (minion_id, marks)."),
    _m("sock_dir", "/var/run/hamaster/master", STR,
       "Where the CLI socket is (`hamaster`, `hamaster-key`, `hamaster-run`).", HOST),
    _n("sock_dir", "/var/run/hamaster/minion", STR, "The minion's socket directory."),
    _m("log_file", "/var/log/hamaster/master", STR,
       "Log file (a path or `file://`; `udp://`/`tcp://` are not opened).", HOST),
    _n("log_file", "/var/log/hamaster/minion", STR,
       "Log file (a path or `file://`; `udp://`/`tcp://` are not opened)."),
    _both("log_level", "warning", LOG_LEVEL, "Console log level (and the file's, by default)."),
    _both("log_level_logfile", None, LOG_LEVEL_OR_NONE, "Log file level (null: `log_level`)."),
    _both("keysize", 2048, INT, "RSA key size of keys this process creates.", CLUSTER),
    _both("tcp_keepalive", True, BOOL,
          "TCP keepalive on the ZeroMQ connections (finds peers that vanished).", CLUSTER),
    _both("tcp_keepalive_idle", 300, INT, "Seconds of silence before the first keepalive probe.",
          CLUSTER),
    _both("tcp_keepalive_cnt", -1, INT,
          "Unanswered keepalive probes before a connection is dropped (-1: the system's).",
          CLUSTER),
    _both("tcp_keepalive_intvl", -1, INT,
          "Seconds between keepalive probes (-1: the system's).", CLUSTER),
    _both("zmq_filtering", False, BOOL,
          "Publish with ZeroMQ topic filtering (both ends must agree).", CLUSTER),
    _both("file_roots", {"base": ["/srv/salt"]}, ROOTS,
          "Environments → directories of files and states (minion: masterless).", CLUSTER),
    _both("pillar_roots", {"base": ["/srv/pillar"]}, ROOTS,
          "Environments → directories of pillar sls (minion: masterless).", CLUSTER),
    _both("renderer", "jinja|yaml", STR, "Default renderer pipe of sls files.", CLUSTER),
    _both("state_top", "top.sls", STR, "Name of the top file.", CLUSTER),
    _both("failhard", False, BOOL, "Stop a state run at the first failure.", CLUSTER),
    _both("conf_file", None, COMPUTED, "The main configuration file read."),
    _both("config_dir", None, COMPUTED, "The configuration directory."),
    _both("__role", None, COMPUTED, "`master` or `minion`."),
    # -- master: network and identity
    _m("interface", "0.0.0.0", STR, "Address the publish and request ports bind on.", HOST),
    _m("publish_port", 4505, INT, "Publish port (ZeroMQ PUB).", HOST),
    _m("ret_port", 4506, INT, "Request port: auth, returns, files (ZeroMQ ROUTER).", HOST),
    _m("master_id", None, STR_OR_NONE, "This master's name in the cluster (null: hostname).",
       HOST),
    _m("metrics_port", 0, INT, "Prometheus exporter port (0: off).", HOST),
    _m("metrics_interface", "127.0.0.1", STR, "Address of the Prometheus exporter.", HOST),
    # -- master: keys
    _m("auto_accept", False, BOOL, "Accept every new minion key."),
    _m("zmq_backlog", 1000, INT, "Listen queue of the request and publish ports."),
    _m("max_heartbeats_per_second", 500.0, FLOAT,
       "Minion heartbeats per second to stay under: with more minions, they are asked to "
       "space them (0: never)."),
    _m("zmq_io_threads", 16, POS_INT,
       "ZeroMQ I/O threads: more spread the heartbeat cost of many connections.", HOST),
    _m("auth_queue_max", 5000, INT,
       "_auth requests waiting at most; the oldest is dropped past it (counted)."),
    _m("auth_queue_max_age", 4.0, FLOAT,
       "An _auth waiting longer (seconds) is dropped unanswered (counted)."),
    _m("autosign_file", None, STR_OR_NONE, "File of minion id globs accepted on sight."),
    _m("autoreject_file", None, STR_OR_NONE, "File of minion id globs rejected on sight."),
    _m("open_mode", False, BOOL, "Accept every minion, even with a changed key (no key check)."),
    _m("max_pending_keys", 10000, INT, "Most pending keys kept (0: no limit)."),
    _m("pending_keys_per_second", 50.0, FLOAT,
       "New pending keys this master takes per second (0: no limit)."),
    _m("rotate_aes_key", True, BOOL, "New publish key when a minion key is deleted/rejected."),
    _m("key_confirm_timeout", 5.0, FLOAT,
       "`hamaster-key` waits this long for every master to apply a change."),
    # -- master: requests and jobs
    _m("timeout", 5, INT, "Default seconds a `hamaster` command waits for returns."),
    _m("gather_job_timeout", 10, FLOAT, "Seconds to wait for `saltutil.find_job` answers."),
    _m("keep_jobs", 24, FLOAT, "Hours a job's returns are kept."),
    _m("minimum_auth_version", 3, INT, "Oldest auth protocol version accepted."),
    _m("request_server_ttl", 300, INT, "Seconds a signed request stays valid (replay window)."),
    _m("max_request_size", 32 * 1024 * 1024, INT, "Largest encrypted request, bytes."),
    _m("max_clear_request_size", 64 * 1024, INT, "Largest clear (auth) request, bytes."),
    _m("file_buffer_size", 1048576, INT, "Bytes per `cp.get_file` chunk (Salt's option)."),
    _m("minion_data_max_size", 512 * 1024, INT, "Largest grains/pillar record per minion, bytes."),
    _m("nodegroups", {}, DICT, "Named targets (`N@name`)."),
    # -- master: cluster
    _m("ha_backend", "fs", STR, "Shared store: fs, etcd or rsync (fs without ha_dir: alone).",
       HOST),
    _m("ha_poll_interval", 0.5, FLOAT, "Seconds between store watch polls.", HOST),
    _m("ha_member_ttl", 5.0, FLOAT, "A master is dead this long after its last heartbeat."),
    _m("ha_lease_ttl", 5.0, FLOAT, "Leader lease (reactor, schedule) lifetime, seconds."),
    _m("file_blob_port", 0, INT,
       "Peer blob server port (0: an OS port where the backend needs one; < 0: off).", HOST),
    _m("file_blob_interface", None, STR_OR_NONE, "Peer blob server address (null: interface).",
       HOST),
    # -- master: pillar
    _m("pillar_source_merging_strategy", "smart", STR,
       "How pillar sls merge: smart, recurse, aggregate, overwrite, none."),
    _m("pillar_merge_lists", False, BOOL, "Merging pillar appends lists instead of replacing."),
    _m("pillar_max_size", 10 * 1024 * 1024, INT, "Largest compiled pillar, bytes."),
    _m("pillar_safe_render_error", True, BOOL,
       "Send minions a generic pillar render error, not its details."),
    _m("pillar_includes_override_sls", False, BOOL, "Included pillar overrides the includer."),
    _m("pillar_tree_ttl", None, FLOAT, "Seconds the pillar tree is cached (unset: "
       "ha_poll_interval)."),
    _m("pillarenv", None, STR_OR_NONE, "Only this pillar environment (null: all)."),
    _m("pillar_cache_entries", 4096, INT, "Compiled pillars kept in memory."),
    _m("gpg_keydir", None, STR_OR_NONE,
       "GnuPG home of the gpg renderer (null: the cluster key in the store)."),
    # -- master: events, reactor, schedule
    _m("event_retention", 3600.0, FLOAT, "Seconds events stay on the cluster bus."),
    _m("event_memory", 20000, INT, "Events kept in memory per master."),
    _m("event_merge_window", 5.0, FLOAT,
       "Copies of one minion event (one per master) that name no job are merged when "
       "received within this many seconds (also the reactor's claim buckets)."),
    _m("reactor", [], LIST, "Reactor rules: `[{tag glob: [sls, ...]}]`."),
    _m("schedule", {}, DICT, "The master schedule: job name → options."),
    # -- master: REST API
    _m("rest_cherrypy", None, DICT_OR_NONE, "REST API settings (salt-api's block); null: off."),
    _m("rest_api", None, DICT_OR_NONE, "Alias of rest_cherrypy."),
    _m("external_auth", {}, DICT, "eauth backends and their ACLs."),
    _m("token_expire", 43200.0, FLOAT, "REST API token lifetime, seconds."),
    _m("netapi_enable_clients", [], STR_LIST, "Lowstate clients the API allows."),
    _m("publisher_acl", {}, DICT, "Local users → functions they may publish."),
    _m("publisher_acl_blacklist", {}, DICT, "Users and modules no one may publish."),
    # -- master: Salt's options handed to Salt minions as they are (``_master_opts``)
    _m("top_file_merging_strategy", "merge", STR, "Salt minions: how top files merge."),
    _m("env_order", [], STR_LIST, "Salt minions: order of the environments."),
    _m("default_top", "base", STR, "Salt minions: environment of the top file."),
    _m("state_top_saltenv", None, STR_OR_NONE, "Salt minions: the only top file's environment."),
    _m("state_auto_order", True, BOOL, "Salt minions: states run in file order."),
    _m("state_events", False, BOOL, "Salt minions: an event per state."),
    _m("state_aggregate", False, BOOL_OR_LIST, "Salt minions: aggregate states (pkg, ...)."),
    _m("jinja_env", {}, DICT, "Salt minions: Jinja environment settings."),
    _m("jinja_sls_env", {}, DICT, "Salt minions: Jinja settings of sls files."),
    _m("jinja_lstrip_blocks", False, BOOL, "Salt minions: Jinja `lstrip_blocks`."),
    _m("jinja_trim_blocks", False, BOOL, "Salt minions: Jinja `trim_blocks`."),
    # -- minion
    _n("id", None, STR_OR_NONE, "Minion id (null: minion_id file, then hostname)."),
    _n("master", "salt", STR_OR_LIST, "Master address(es): `host`, `host:port`, a list."),
    _n("master_list", None, COMPUTED, "`master` parsed into (host, port) pairs."),
    _n("master_port", 4506, INT, "Default request port of the masters."),
    _n("publish_port", 4505, INT, "Publish port when the master does not say."),
    _n("master_type", "str", STR, "`str` (all masters at once) or `failover`."),
    _n("master_alive_interval", 0, INT, "Seconds between master checks (0: heartbeat)."),
    _n("master_finger", "", STR, "Expected master key fingerprint (empty: trust first)."),
    _n("acceptance_wait_time", 10, FLOAT, "Seconds between tries while the key is pending."),
    _n("acceptance_wait_time_max", 0, FLOAT, "Cap of the growing wait (0: no growth)."),
    _n("auth_timeout", 5, FLOAT, "Seconds an auth request may take."),
    _n("grains", {}, DICT, "Static grains."),
    _n("mine_functions", {}, DICT, "Mine functions and their arguments."),
    _n("mine_interval", 60, INT, "Minutes between mine updates."),
    _n("master_heartbeat_interval", 2.0, FLOAT, "Seconds between heartbeats to each master."),
    _n("master_dead_after", 6.0, FLOAT, "A silent master is dead after this many seconds."),
    _n("master_retry_max", 2.0, FLOAT, "Longest reconnect backoff, seconds."),
    _n("random_reauth_delay", 10, FLOAT,
       "Up to this many seconds (random) before re-authenticating after a key rotation."),
    _n("recon_default", 200, INT, "Milliseconds before reconnecting to a master."),
    _n("recon_max", 1000, INT, "Longest reconnect wait, milliseconds."),
    _n("recon_randomize", True, BOOL, "Randomize the reconnect wait (spreads the fleet)."),
    _n("file_client", "remote", STR, "`local`: masterless states."),
    _n("swarm_count", 0, INT, "Identities this process runs (load tests)."),
    _n("worker_threads_minion", 32, INT, "Threads running jobs."),
    _n("saltenv", None, STR_OR_NONE, "Environment of state runs (null: base)."),
    _n("test", False, BOOL, "State runs are dry runs."),
)


#: Options with these prefixes are kept without a warning: read by a client, not by hamaster
#: (``saltgui_*``: SaltGUI's settings, handed out by the REST API's ``config.values``).
PASSTHROUGH_PREFIXES = ("saltgui_",)


def table(role: str, extra: Iterable[Option] = ()) -> dict[str, Option]:
    """``name → Option`` of ``role`` (``extra``: the backends' options, for the master)."""
    out: dict[str, Option] = {}
    for o in (*OPTIONS, *extra):
        if role not in o.roles:
            continue
        if o.name in out and out[o.name] != o:
            raise ValueError(f"option {o.name!r} is declared twice for the {role}, differently")
        out[o.name] = o
    return out


_CORE = {role: table(role) for role in (MASTER, MINION)}


def default(name: str, role: str = MASTER) -> Any:
    """The table's default of core option ``name`` (``KeyError`` if undeclared)."""
    return _CORE[role][name].default


def opt(opts: Mapping[str, Any], name: str, role: str = MASTER) -> Any:
    """``opts[name]``, or the table's default when ``opts`` is a partial mapping."""
    if name in opts:
        return opts[name]
    return default(name, role)


def with_defaults(opts: Mapping[str, Any], options: Iterable[Option]) -> dict[str, Any]:
    """``opts`` with the default of each of ``options`` it lacks (for a partial mapping)."""
    out = dict(opts)
    for o in options:
        out.setdefault(o.name, o.default)
    return out
