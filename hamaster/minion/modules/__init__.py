"""Execution modules, one file per module (``test``, ``cmd``, ``grains``, ``sys`` …), listed in
:data:`.registry.DEFAULT_MODULES`; every function takes the :class:`.context.ExecContext` first."""
