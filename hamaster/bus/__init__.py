"""The wire: Salt's ZeroMQ request protocol v3.

Sans-io modules (``codec``, ``crypticle``, ``messages``, ``auth``) are pure functions over bytes;
``zmqio`` holds the only code here that touches sockets. Imports only ``hamaster.crypto``.
"""
