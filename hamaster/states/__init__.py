"""Salt's state system on the hamaster minion: sls → high data → low chunks → ordered run.

* :mod:`hamaster.states.source` reads sls and ``salt://`` files, from the masters' file server
  (through the minion's file client) or from local ``file_roots`` (``hamaster-call --local``);
* :mod:`hamaster.states.compiler` renders sls files with the renderer shared with pillar
  (:mod:`hamaster.pillar.render`) plus Salt's extra Jinja (:mod:`hamaster.states.jinja`),
  resolves ``top.sls``, ``include:`` and ``extend:``, and turns high data into low chunks ordered
  the way Salt 3008 orders them (``order:``, requisites);
* :mod:`hamaster.states.runner` runs the chunks with Salt's requisite semantics and return shape;
* :mod:`hamaster.states.modules` holds the state functions (``file.managed``, ``cmd.run`` …);
* :mod:`hamaster.states.apply` is one run end to end (return and retcode), and
  :mod:`hamaster.states.output` Salt's ``highstate`` outputter.

The execution module :mod:`hamaster.minion.modules.state` (``state.apply`` …) ties them together.
"""
