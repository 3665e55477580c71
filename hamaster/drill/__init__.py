"""Failover drills: run a scripted failure against a live cluster and measure what users feel.

``hamaster-drill run DRILL.yaml`` reads a drill file (:mod:`hamaster.drill.spec`), breaks one
thing on purpose (:mod:`hamaster.drill.actions`: kill, stop, freeze or isolate a master, make the
shared store unreachable, restart every minion, restart every master in turn), keeps pinging the
minions through the surviving masters and tracks a job through the victim
(:mod:`hamaster.drill.measure`), restores what it broke, and checks the figures against the
drill's objectives (:mod:`hamaster.drill.run`): failed pings, time to detect, time to recover,
results lost, key changes visible on the restored master. The leader scenarios take the lease
holder away while numbered events are fired and count reactions run twice or never, schedule
slots run twice and the time until another master leads.

Every action registers its undo before anything else can fail, and the undo stack is always
unwound (``try/finally`` plus SIGINT/SIGTERM handlers), so Ctrl-C restores what the drill stopped,
froze, cut or moved.
"""

from __future__ import annotations


class DrillError(Exception):
    """The drill could not run (bad drill file, unreachable cluster, a failed command)."""
