"""The minion daemon: one connection per master, targeting, execution modules."""
