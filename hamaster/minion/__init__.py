"""The minion daemon: one connection per master, targeting, execution modules.

:mod:`.daemon` runs the minion; :mod:`.connection` is one master's connection (auth, requests,
publications); :mod:`.identity` the id, key pair and pinned master key; :mod:`.matcher`
targeting; :mod:`.executor` runs a job with the :mod:`.modules`; :mod:`.fileclient` fetches
``salt://`` files; :mod:`.grains_core` the core grains; :mod:`.serialmarks` the publication
serials acted on; :mod:`.remote_call` ``hamaster-call`` backed by the masters.
"""
