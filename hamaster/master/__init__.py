"""The master daemon: wires the bus, keys, jobs, files and the local CLI channel."""
