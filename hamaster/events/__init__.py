"""The cluster-wide event bus, the reactor and the master schedule.

- ``bus`` — Salt-shaped events (tag, data with ``_stamp``) written by every master to the shared
  store (``events/<master_id>/<seq>``, one value per batch, bounded retention), read back as one
  logical stream on every master; copies of one minion event merged.
- ``render`` — reactor sls files rendered through the renderer pillar and states share
  (:mod:`hamaster.pillar.render`), with the event's ``tag`` and ``data``.
- ``reactor`` — Salt's ``reactor:`` option, run on the lease holder only, each reaction claimed
  create-if-absent under the lease epoch before it acts.
- ``schedule`` — Salt's master ``schedule:`` option, one run per slot cluster-wide.

The master's side (wiring these into a master, the ``state.event``, ``schedule.list`` and
``salt.execute`` runners) is :mod:`hamaster.master.events`.

Imports: store and pillar (the renderer); nothing of the master.
"""
