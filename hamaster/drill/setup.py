"""What the leader drills (``leader-kill``, ``leader-freeze``, ``leader-partition``) need configured
in the cluster, and how ``hamaster-cluster up --leader-drills`` puts it there.

Every master needs the same two options (docs/drills.md, "Leader drills")::

    reactor:
      - 'hamaster/drill/*':
        - /path/to/hamaster-drill-reactor.sls       # REACTOR_SLS below (or salt://...)
    schedule:
      hamaster-drill:
        function: salt.execute
        seconds: 2
        maxrunning: 3        # a run waits for the minion's return (up to 5 s): never skip for it
        args: [<a minion>, test.echo, [hamaster-drill-schedule]]
        kwargs: {timeout: 5}

The drill fires ``hamaster/drill/<nonce>`` events with data ``{"n": i}`` at a minion (published
``event.send`` jobs); the reactor runs ``cmd.run`` on that minion appending ``<nonce> <n>`` to
:data:`~hamaster.drill.spec.DEFAULT_REACTION_FILE`; the drill reads the file back through a
survivor. Both numbers go through Jinja's ``int`` filter, so an event with other data cannot put
anything else into the shell command.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import yaml

from hamaster.drill.spec import DEFAULT_REACTION_FILE

EVENT_PREFIX = "hamaster/drill"
REACTOR_GLOB = f"{EVENT_PREFIX}/*"
SCHEDULE_JOB = "hamaster-drill"
SCHEDULE_MARKER = "hamaster-drill-schedule"
SCHEDULE_SECONDS = 2
CONF_NAME = "hamaster-drill.conf"  # in each master's master.d/

REACTOR_SLS = f"""\
{{# hamaster-drill reactor: leader-kill / leader-freeze / leader-partition (docs/drills.md) #}}
{{% set nonce = tag.split('/')[-1] | int %}}
{{% set n = data['data']['n'] | int %}}
hamaster_drill_reaction:
  local.cmd.run:
    - tgt: {{{{ data['id'] }}}}
    - arg:
      - echo {{{{ nonce }}}} {{{{ n }}}} >> {DEFAULT_REACTION_FILE}
"""


def leader_drill_options(sls_path: str, minion: str) -> dict[str, Any]:
    """The ``reactor`` and ``schedule`` options the leader drills need (``minion``: the schedule's
    target, normally the drill's event minion)."""
    return {
        "reactor": [{REACTOR_GLOB: [sls_path]}],
        "schedule": {SCHEDULE_JOB: {
            "function": "salt.execute", "seconds": SCHEDULE_SECONDS, "maxrunning": 3,
            "args": [minion, "test.echo", [SCHEDULE_MARKER]], "kwargs": {"timeout": 5},
        }},
    }


def write_leader_drill_config(base: Path, confdirs: list[str], minion: str,
                              lease_ttl: float | None = None) -> Path:
    """Write the reactor sls under ``base/drill/`` and ``master.d/hamaster-drill.conf`` into every
    master's confdir (the same on each); ``lease_ttl`` also sets ``ha_lease_ttl``. Returns the
    sls."""
    sls = base / "drill" / "hamaster-drill-reactor.sls"
    sls.parent.mkdir(parents=True, exist_ok=True)
    sls.write_text(REACTOR_SLS)
    opts = leader_drill_options(str(sls), minion)
    if lease_ttl is not None:
        opts["ha_lease_ttl"] = float(lease_ttl)
    for confdir in confdirs:
        d = Path(confdir) / "master.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / CONF_NAME).write_text(yaml.safe_dump(opts))
    return sls


def remove_leader_drill_config(confdirs: list[str]) -> None:
    """Remove ``master.d/hamaster-drill.conf`` (a cluster directory started again without
    ``--leader-drills`` must not keep the drill reactor and schedule of an earlier ``up``)."""
    for confdir in confdirs:
        (Path(confdir) / "master.d" / CONF_NAME).unlink(missing_ok=True)


def effective_master_options(confdir: str) -> dict:
    """A local master's options as it runs with them: its confdir plus the cluster's shared
    ``config/master.d/*.conf`` fragments in the store (where a reactor is often configured)."""
    from hamaster.config import load_master_config
    from hamaster.master.shared import is_ha, open_store, shared_config
    from hamaster.store.base import StoreError

    opts = load_master_config(confdir)
    if not is_ha(opts):
        return opts
    try:
        store = open_store(opts)
        try:
            fragment, _ = shared_config(store)
        finally:
            store.close()
    except StoreError:
        return opts
    return load_master_config(confdir, overrides=fragment) if fragment else opts


def missing_leader_options(opts: dict, want_schedule: bool) -> list[str]:
    """What a master's options lack for the leader drills, each naming the option to add."""
    from hamaster.events.reactor import ReactorConfigError, parse_reactor_option

    out = []
    try:
        rules = parse_reactor_option(opts.get("reactor"))
    except ReactorConfigError as exc:
        rules = []
        out.append(f"reactor: {exc}")
    if not any(fnmatch.fnmatchcase(f"{EVENT_PREFIX}/1", glob) for glob, _ in rules):
        out.append(f"reactor: no entry matches '{EVENT_PREFIX}/<n>' (add - '{REACTOR_GLOB}': "
                   "[<path of the drill reactor sls>])")
    sched = opts.get("schedule") or {}
    if want_schedule and not (isinstance(sched, dict)
                              and isinstance(sched.get(SCHEDULE_JOB), dict)):
        out.append(f"schedule: no job {SCHEDULE_JOB!r} (salt.execute test.echo {SCHEDULE_MARKER} "
                   f"every {SCHEDULE_SECONDS} s)")
    return out
