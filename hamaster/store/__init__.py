"""Shared-state backends: the store contract (``base``), its implementations (``fs``, ``etcd``,
``rsync``) and the registry of them by ``ha_backend`` name (``registry``).

Knows nothing of keys, jobs or files; imports nothing else from hamaster but the option
declarations (:mod:`hamaster.options`, a leaf).
"""
