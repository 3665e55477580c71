"""The master daemon and what it runs: requests, keys, jobs, publications, runners, the CLI socket.

:mod:`.daemon` wires the bus, the store (:mod:`.shared`), keys, jobs (:mod:`.jobs`,
:mod:`.waiting`), files, pillar, events and the REST API; :mod:`.reqhandler` answers minions'
requests; :mod:`.pubkey` holds the publish key; :mod:`.cliserver` serves the local CLIs;
:mod:`.runners` the ``hamaster-run`` functions; :mod:`.leader` the cluster's lease holder;
:mod:`.datacache` the minion data cache; :mod:`.publisher_acl` and :mod:`.ratelog` what a user
may publish and how refusals are logged.
"""
