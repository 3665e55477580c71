"""Execution modules, one file per module (``test``, ``cmd``, ``grains``, ``sys`` …)."""
