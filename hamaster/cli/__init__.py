"""Command-line entry points, one module per console script (``master``, ``minion``, ``salt``
for ``hamaster``, ``key``, ``run``, ``call``, ``cluster``, ``drill``), plus what they share:
:mod:`.common` (config and log options) and :mod:`.lean` (the minion's lean imports)."""
