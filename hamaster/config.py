"""Salt-style configuration loading for the master and minion: defaults, YAML files, validation.

A configuration directory (``/etc/hamaster`` by default, ``$HAMASTER_CONFIG_DIR`` or ``-c``)
holds a main file (``master`` or ``minion``) and an include directory (``master.d/*.conf`` or
``minion.d/*.conf``). Option names and defaults follow Salt; paths are hamaster's. Files are
merged top-level in order: defaults, main file, include files sorted by name, then overrides.
Every option is type-checked against the option table (:mod:`hamaster.options`, plus each store
backend's ``OPTIONS`` for the master); a wrong type is a :class:`ConfigError` naming the file,
the option and the expected type. Unknown options are logged as warnings, not errors.
``python -m hamaster.config --doc`` prints the option reference generated from the table (the
one in ``docs/operator-guide.md``, rewritten by ``scripts/gen-options-doc``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hamaster.options import MASTER, MINION, PASSTHROUGH_PREFIXES, Option, table

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/hamaster"
CONFIG_DIR_ENV = "HAMASTER_CONFIG_DIR"

LOG_FORMAT = "%(asctime)s [%(name)s:%(lineno)d][%(levelname)s] %(message)s"
#: A log message longer than this (characters) is cut: one line never floods the log.
MAX_LOG_MESSAGE = 16384


class ConfigError(Exception):
    """A configuration file or value is unusable; the message names the file and the option."""


# --------------------------------------------------------------------------- the option table


@functools.cache
def master_options() -> dict[str, Option]:
    """The master's options: :data:`hamaster.options.OPTIONS` and every backend's ``OPTIONS``."""
    from hamaster.store.registry import backend_options

    return table(MASTER, backend_options())


@functools.cache
def minion_options() -> dict[str, Option]:
    """The minion's options (:data:`hamaster.options.OPTIONS`)."""
    return table(MINION)


def defaults(options: Mapping[str, Option]) -> dict[str, Any]:
    """A fresh copy of the defaults of ``options`` (computed ones left out)."""
    return {name: copy.deepcopy(o.default) for name, o in options.items() if not o.computed}


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


def _validate(source: str, data: Mapping[str, Any],
              options: Mapping[str, Option]) -> dict[str, Any]:
    """Type-check ``data`` against the table ``options``; returns the (coerced) options."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: option names must be strings, got {_describe(key)}")
        o = options.get(key)
        spec = None if o is None or o.computed else o.type
        if spec is None:
            if not key.startswith(("__", *PASSTHROUGH_PREFIXES)):
                log.warning("%s: unknown option %r (ignored by hamaster, kept as is)", source, key)
            out[key] = value
            continue
        try:
            out[key] = spec.validate(value)
        except TypeError:
            raise ConfigError(
                f"{source}: option {key!r} must be {spec.name}, got {_describe(value)}"
            ) from None
        if spec.log_level and value is not None:
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


def _load(role: str, options: Mapping[str, Option],
          confdir: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    cdir = _resolve_confdir(confdir)
    main = cdir / role
    opts = defaults(options)
    if main.exists():
        opts.update(_validate(str(main), _read_file(main), options))
    else:
        log.debug("%s: not found, using defaults", main)
    include_dir = cdir / f"{role}.d"
    if include_dir.is_dir():
        for path in sorted(include_dir.glob("*.conf")):
            opts.update(_validate(str(path), _read_file(path), options))
    if overrides:
        opts.update(_validate("<overrides>", overrides, options))
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
    opts = _load(MASTER, master_options(), confdir, overrides)
    if not opts.get("master_id"):
        opts["master_id"] = socket.gethostname()
    return opts


def load_minion_config(confdir: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the minion's options from ``CONFDIR/minion`` and ``CONFDIR/minion.d/*.conf``.

    Adds ``master_list``: the ``master`` option parsed into ``(host, port)`` tuples.
    """
    opts = _load(MINION, minion_options(), confdir, overrides)
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


# --------------------------------------------------------------------------- the reference

DOC_BEGIN = "<!-- BEGIN option reference: generated by scripts/gen-options-doc, do not edit -->"
DOC_END = "<!-- END option reference -->"


def _doc_value(value: Any) -> str:
    text = json.dumps(value) if value is not None else "null"
    return f"`{text}`".replace("|", "\\|")


def _doc_rows(options: Iterable[Option], scope: bool) -> list[str]:
    head = "| Option | Default | Type |" + (" Scope |" if scope else "") + " Meaning |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in options:
        if o.computed:
            continue
        cells = [f"`{o.name}`", _doc_value(o.default), o.type.name]
        if scope:
            cells.append(o.scope)
        cells.append(o.doc.replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def options_doc() -> str:
    """The option reference of ``docs/operator-guide.md`` (markdown), from the option table."""
    from hamaster.store.registry import backend_class, names

    backend_names = {o.name for name in names() for o in backend_class(name).OPTIONS}
    master = [o for o in master_options().values() if o.name not in backend_names]
    out = [DOC_BEGIN, "",
           "Scope `host`: one machine's setting, ignored in the cluster's shared\n"
           "`config/master.d/` fragments; `cluster`: should agree on every master (part of\n"
           "the config hash). Options not listed are kept and logged as unknown (but\n"
           "`saltgui_*`, kept for SaltGUI: see `docs/api.md`).", "",
           "### Master", "", *_doc_rows(master, scope=True), ""]
    for name in names():
        out += [f"### Master, `ha_backend: {name}`", "",
                *_doc_rows(backend_class(name).OPTIONS, scope=True), ""]
    out += ["### Minion", "", *_doc_rows(minion_options().values(), scope=False), "", DOC_END]
    return "\n".join(out)


def update_doc(path: str | Path) -> bool:
    """Rewrite the option reference between the markers in ``path``; True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    begin, end = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
    new = text[:begin] + options_doc() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python -m hamaster.config --doc`` prints the option reference; ``--update FILE``
    rewrites it in FILE (between the markers)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hamaster.config",
                                description="The option reference, from the option table.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--doc", action="store_true", help="print the option reference (markdown)")
    g.add_argument("--update", metavar="FILE", help="rewrite the reference in FILE")
    args = p.parse_args(argv)
    if args.doc:
        print(options_doc())
    else:
        print(f"{args.update}: {'updated' if update_doc(args.update) else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
