"""``hamaster-key``: list, accept, reject, delete and fingerprint minion keys, like ``salt-key``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from hamaster.config import ConfigError, load_master_config, setup_logging
from hamaster.ids import shown
from hamaster.pki_sync.keys import (
    KeyRegistry,
    KeyRegistryError,
    KeyState,
    generate_keypair,
    pem_finger,
)
from hamaster.store.base import StoreError

log = logging.getLogger(__name__)

PROG = "hamaster-key"

# Salt-key's text order and headings.
_TEXT_ORDER = (
    (KeyState.ACCEPTED, "Accepted Keys:"),
    (KeyState.DENIED, "Denied Keys:"),
    (KeyState.PENDING, "Unaccepted Keys:"),
    (KeyState.REJECTED, "Rejected Keys:"),
)
_HEADINGS = dict(_TEXT_ORDER)
#: Ids per key-change confirmation request (see ``_confirm``).
CONFIRM_CHUNK = 20000

_LIST_ARGS: dict[str, tuple[KeyState, ...]] = {
    "acc": (KeyState.ACCEPTED,), "accepted": (KeyState.ACCEPTED,),
    "pre": (KeyState.PENDING,), "un": (KeyState.PENDING,),
    "unaccepted": (KeyState.PENDING,),
    "rej": (KeyState.REJECTED,), "rejected": (KeyState.REJECTED,),
    "den": (KeyState.DENIED,), "denied": (KeyState.DENIED,),
    "all": tuple(KeyState),
}

EPILOG = """\
examples:
  hamaster-key -L                      list all keys by state
  hamaster-key -l un                   list unaccepted (pending) keys
  hamaster-key -a web1                 accept the pending key of web1 (asks first)
  hamaster-key -a 'web*' -y            accept every pending key matching web*, no question
  hamaster-key -A --include-rejected   accept all pending and rejected keys
  hamaster-key -r db1                  reject the pending key of db1
  hamaster-key -d web1 -y              delete web1's key in every state; returns once every
                                       live master has dropped it (exit 3 if one has not)
  hamaster-key -f web1                 show web1's key fingerprint (sha256)
  hamaster-key -F --out json           all fingerprints as JSON
  hamaster-key --gen-keys minion1 --gen-keys-dir /tmp/keys
                                       write minion1.pem (0600) and minion1.pub
  hamaster-key -c /etc/hamaster -L     use another configuration directory
"""


class CliError(Exception):
    """A user-facing failure: printed as ``hamaster-key: error: ...`` with a non-zero exit."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``hamaster-key`` (salt-key's options)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Manage minion keys on the hamaster master (compatible with salt-key).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config-dir", default=None,
                   help="configuration directory (default: $HAMASTER_CONFIG_DIR or /etc/hamaster)")
    p.add_argument("--log-level", default=None,
                   help="console log level: quiet, critical, error, warning, info, debug, trace")
    p.add_argument("--out", choices=("txt", "json", "yaml"), default="txt",
                   help="output format (default: salt-key's text layout)")
    p.add_argument("-y", "--yes", action="store_true", help="answer yes to every question")
    p.add_argument("--include-rejected", action="store_true",
                   help="with -a/-A: also accept rejected keys")
    p.add_argument("--include-denied", action="store_true",
                   help="with -a/-A/-r/-R: also act on denied keys")
    p.add_argument("--include-accepted", action="store_true",
                   help="with -r/-R: also reject accepted keys")
    p.add_argument("--include-all", action="store_true",
                   help="act on keys in every relevant state")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                   help="cluster: with -a/-A/-r/-R/-d/-D, wait at most this long for every live "
                        "master to confirm the change is in force (default: key_confirm_timeout, "
                        "5; 0: do not wait)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("-L", "--list-all", action="store_true", help="list all keys (default)")
    act.add_argument("-l", "--list", metavar="ARG", choices=sorted(_LIST_ARGS),
                     help="list keys: pre|un|unaccepted, acc|accepted, rej|rejected, "
                          "den|denied, all")
    act.add_argument("-a", "--accept", metavar="ID", help="accept a pending key (glob allowed)")
    act.add_argument("-A", "--accept-all", action="store_true", help="accept all pending keys")
    act.add_argument("-r", "--reject", metavar="ID", help="reject a pending key (glob allowed)")
    act.add_argument("-R", "--reject-all", action="store_true", help="reject all pending keys")
    act.add_argument("-d", "--delete", metavar="ID", help="delete a key (glob allowed)")
    act.add_argument("-D", "--delete-all", action="store_true", help="delete all keys")
    act.add_argument("-f", "--finger", metavar="ID", help="print a key's fingerprint (glob)")
    act.add_argument("-F", "--finger-all", action="store_true", help="print all fingerprints")
    act.add_argument("-p", "--print", metavar="ID", help="print a public key (glob)")
    act.add_argument("-P", "--print-all", action="store_true", help="print all public keys")
    act.add_argument("--gen-keys", metavar="NAME",
                     help="generate a keypair NAME.pem/NAME.pub (no master config needed)")
    p.add_argument("--gen-keys-dir", metavar="DIR", default=".",
                   help="directory for --gen-keys (default: current directory)")
    p.add_argument("--keysize", type=int, default=None,
                   help="RSA key size for --gen-keys (default: keysize option, 2048)")
    return p


# ---------------------------------------------------------------------- output


def _emit(data: dict[str, Any], out: str, text: Callable[[], str]) -> None:
    if out == "json":
        sys.stdout.write(json.dumps(data, indent=4, sort_keys=True) + "\n")
    elif out == "yaml":
        sys.stdout.write(yaml.safe_dump(data, default_flow_style=False, sort_keys=True))
    else:
        sys.stdout.write(text())


def _keys_text(keys: dict[KeyState, list[str]], states: tuple[KeyState, ...]) -> str:
    # Ids are shown as they are when plain, else quoted and cut (hamaster.ids.shown): a minion
    # chooses its id, and it must not drive the operator's terminal. JSON/YAML carry the data.
    lines: list[str] = []
    for state, heading in _TEXT_ORDER:
        if state in states:
            lines.append(heading)
            lines.extend(shown(mid) for mid in keys.get(state, []))
    return "\n".join(lines) + "\n"


def _per_key_text(values: dict[KeyState, dict[str, str]]) -> str:
    lines: list[str] = []
    for state, heading in _TEXT_ORDER:
        if state in values:
            lines.append(heading)
            lines.extend(f"{shown(mid)}:  {val}" for mid, val in sorted(values[state].items()))
    return "\n".join(lines) + "\n"


def _ask(question: str, default_yes: bool) -> bool:
    prompt = f"{question} [n/Y] " if default_yes else f"{question} [N/y] "
    sys.stdout.write(prompt)
    sys.stdout.flush()
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        return False
    if not answer:  # EOF: no one to ask
        sys.stdout.write("\n")
        return False
    answer = answer.strip().lower()
    if not answer:
        return default_yes
    return answer in ("y", "yes")


# ---------------------------------------------------------------------- actions


def _match(keys: dict[KeyState, list[str]], pattern: str,
           states: tuple[KeyState, ...]) -> dict[KeyState, list[str]]:
    found: dict[KeyState, list[str]] = {}
    for state in states:
        ids = [m for m in keys[state] if m == pattern or fnmatch.fnmatchcase(m, pattern)]
        if ids:
            found[state] = ids
    return found


def _confirm_single(opts: dict[str, Any], ids: list[str], timeout: float) -> int:
    """A single master: ask it over its CLI socket to apply the change now (no master
    running: nothing to wait for). Returns 0 or 3 as :func:`_confirm`."""
    from hamaster.localapi import LocalApiError, LocalClient, socket_path
    from hamaster.pki_sync.confirm import EXIT_UNCONFIRMED

    sock_dir = opts.get("sock_dir")
    if not sock_dir or not os.path.exists(socket_path(sock_dir)):
        return 0
    try:
        with LocalClient(sock_dir, timeout=timeout) as client:
            for start in range(0, len(ids), CONFIRM_CHUNK):
                client.call({"cmd": "refresh_keys", "ids": ids[start:start + CONFIRM_CHUNK]})
    except LocalApiError as exc:
        if "no master socket" in str(exc) or "Connection refused" in str(exc):
            return 0    # the master is not running: it reads the keys when it starts
        sys.stderr.write(f"{PROG}: error: the key change is stored, but the master did not "
                         f"confirm it is in force: {exc}\n")
        return EXIT_UNCONFIRMED
    except OSError as exc:   # a timeout, a reset
        sys.stderr.write(f"{PROG}: error: the key change is stored, but the master did not "
                         f"confirm it is in force within {timeout:g} s: {exc}\n")
        return EXIT_UNCONFIRMED
    log.info("key change in force on the local master")
    return 0


def _confirm(reg: KeyRegistry, opts: dict[str, Any], args: argparse.Namespace,
             ids: list[str], accepted: bool) -> int:
    """Wait until every live master has the change of ``ids`` in force (cluster only).

    Returns 0, or :data:`EXIT_UNCONFIRMED` (3) after naming each master that has not
    confirmed within the wait.
    """
    from hamaster.master.membership import read_masters
    from hamaster.master.shared import is_ha
    from hamaster.pki_sync.confirm import EXIT_UNCONFIRMED, confirm_key_change, expect_for

    timeout = args.wait_timeout if args.wait_timeout is not None else float(
        opts.get("key_confirm_timeout", 5.0))
    if not ids or timeout <= 0:
        return 0
    if not is_ha(opts):
        return _confirm_single(opts, ids, timeout)
    store = reg.store

    restore = getattr(store, "restore_newer", None)

    def members() -> dict[str, dict]:
        if restore is not None:
            # rsync: a running peer's push can replace a stopped master's newer "stopped"
            # record in this tree with an older "alive" copy; its backup is put back first.
            restore()
        return read_masters(store)

    # rsync: the CLI sends the change and the request itself, whether or not a master runs on
    # this host. Asking whether the local master is alive is no guide: a peer's push can put an
    # older "alive" record of a master that has just stopped back into this tree (rsync's
    # coarse --update; the stopped master is no longer there to restore its newer record), and
    # a tree nobody pushes leaves every other master waiting until the deadline. A second push
    # beside a running master's own is harmless.
    after_write = getattr(store, "push_now", None)

    # One request per CONFIRM_CHUNK ids (a request is one store value; etcd caps those at
    # 1 MiB), one after another within the one wait.
    deadline = time.monotonic() + timeout
    for start in range(0, len(ids), CONFIRM_CHUNK):
        chunk = ids[start:start + CONFIRM_CHUNK]
        left = max(0.05, deadline - time.monotonic())
        res = confirm_key_change(store, expect_for(chunk, accepted), members, left,
                                 origin=f"{PROG}@{os.uname().nodename}", after_write=after_write)
        if not res.ok:
            break
    for master, why in sorted(res.skipped.items()):
        log.info("not waiting for master %s: %s", master, why)
    if res.ok:
        log.info("key change in force on %s (%.3f s)",
                 ", ".join(sorted(res.confirmed)) or "no live master", res.elapsed)
        return 0
    sys.stderr.write(
        f"{PROG}: error: the key change is stored, but not confirmed in force by every live "
        f"master: {res.describe_missing()}. Until it applies it, such a master may still serve "
        f"the old key state; check it with `hamaster-run cluster.status`.\n")
    return EXIT_UNCONFIRMED


def _transition(reg: KeyRegistry, args: argparse.Namespace, pattern: str | None,
                verb: str, opts: dict[str, Any] | None = None) -> int:
    keys = reg.list_keys()
    inc_all = args.include_all
    if verb == "accept":
        states = [KeyState.PENDING]
        if args.include_rejected or inc_all:
            states.append(KeyState.REJECTED)
        if args.include_denied or inc_all:
            states.append(KeyState.DENIED)
        past, default_yes = "accepted", True
    elif verb == "reject":
        states = [KeyState.PENDING]
        if args.include_accepted or inc_all:
            states.append(KeyState.ACCEPTED)
        if args.include_denied or inc_all:
            states.append(KeyState.DENIED)
        past, default_yes = "rejected", True
    else:
        states = list(KeyState)
        past, default_yes = "deleted", False
    found = _match(keys, pattern or "*", tuple(states))
    if not found:
        where = " or ".join(_HEADINGS[s].rstrip(":").lower() for s in states)
        if pattern is None:
            sys.stdout.write(f"No {where} to {verb}.\n")
            return 0
        raise CliError(f"the key glob {pattern!r} does not match any {where}; "
                       f"list keys with `{PROG} -L`")
    sys.stdout.write(f"The following keys are going to be {past}:\n")
    sys.stdout.write(_keys_text(found, tuple(found)))
    if not args.yes and not _ask("Proceed?", default_yes):
        sys.stdout.write("Nothing done.\n")
        return 1
    ids = sorted({m for lst in found.values() for m in lst})
    changed: list[str] = []
    for mid in ids:
        if verb == "accept":
            ok = reg.accept(mid, include_rejected=KeyState.REJECTED in states,
                            include_denied=KeyState.DENIED in states)
        elif verb == "reject":
            ok = reg.reject(mid, include_accepted=KeyState.ACCEPTED in states,
                            include_denied=KeyState.DENIED in states)
        else:
            ok = reg.delete(mid)
        if ok:
            changed.append(mid)
            sys.stdout.write(f"Key for minion {shown(mid)} {past}.\n")
        else:
            sys.stderr.write(f"{PROG}: key for minion {mid} changed meanwhile; not {past}\n")
    sys.stdout.flush()
    return _confirm(reg, opts or {}, args, changed, verb == "accept")


def _per_key(reg: KeyRegistry, args: argparse.Namespace, pattern: str,
             fn: Callable[[str, KeyState], str]) -> int:
    keys = reg.list_keys()
    found = _match(keys, pattern, tuple(KeyState))
    if not found:
        raise CliError(f"no key matches {pattern!r}; list keys with `{PROG} -L`")
    values: dict[KeyState, dict[str, str]] = {
        state: {mid: fn(mid, state) for mid in ids} for state, ids in found.items()}
    data: dict[str, dict[str, str]] = {}
    local: dict[str, str] = {}
    if getattr(args, "finger_all", False):
        # Like salt-key -F: the master's own key first (what minions put in master_finger).
        pub = reg.store.get(f"{reg.prefix}master.pub")
        if pub is not None:
            local = {"master.pub": pem_finger(pub.decode())}
            data["local"] = local
    data.update({state.value: vals for state, vals in values.items()})

    def text() -> str:
        head = "Local Keys:\n" + "".join(f"{k}:  {v}\n" for k, v in local.items()) if local else ""
        return head + _per_key_text(values)

    _emit(data, args.out, text)
    return 0


def _gen_keys(args: argparse.Namespace, keysize: int) -> int:
    name = args.gen_keys
    if not name or "/" in name or name.startswith("."):
        raise CliError(f"--gen-keys needs a plain file name, got {name!r}", 2)
    directory = Path(args.gen_keys_dir)
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.pem", directory / f"{name}.pub"
    for path in (priv_path, pub_path):
        if path.exists():
            raise CliError(f"{path} already exists; remove it first or choose another name")
    priv, pub = generate_keypair(keysize)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(priv)
    pub_path.write_bytes(pub)
    os.chmod(pub_path, 0o644)
    sys.stdout.write(f"Wrote {priv_path} and {pub_path}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.gen_keys:
        keysize = args.keysize
        if keysize is None:
            try:
                keysize = load_master_config(args.config_dir)["keysize"]
            except ConfigError:
                keysize = 2048
        if keysize < 2048:
            raise CliError(f"--keysize must be at least 2048, got {keysize}", 2)
        setup_logging({"log_file": None, "log_level": "warning"}, args.log_level)
        return _gen_keys(args, keysize)

    opts = load_master_config(args.config_dir)
    # The CLI logs to the console only; the master daemon owns log_file.
    setup_logging({**opts, "log_file": None}, args.log_level)
    from hamaster.master.shared import open_shared_state

    reg = open_shared_state(opts).keys
    keys = reg.list_keys()

    if args.accept or args.accept_all:
        return _transition(reg, args, args.accept, "accept", opts)
    if args.reject or args.reject_all:
        return _transition(reg, args, args.reject, "reject", opts)
    if args.delete or args.delete_all:
        return _transition(reg, args, args.delete, "delete", opts)
    if args.finger or args.finger_all:
        return _per_key(reg, args, args.finger or "*", lambda m, s: reg.finger(m, s))
    if args.print or args.print_all:
        return _per_key(reg, args, args.print or "*",
                        lambda m, s: reg.get_pub(m, s) or "")
    states = _LIST_ARGS[args.list] if args.list else tuple(KeyState)
    data = {s.value: keys[s] for s in KeyState if s in states}
    _emit(data, args.out, lambda: _keys_text(keys, states))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``hamaster-key`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except CliError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: configuration error: {exc}\n")
        return 2
    except (StoreError, KeyRegistryError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
