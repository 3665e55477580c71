"""Shared-state backends: the store contract (``base``) and its implementations (``fs`` …).

Knows nothing of keys, jobs or files; imports nothing else from hamaster.
"""
