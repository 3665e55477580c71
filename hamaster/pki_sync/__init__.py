"""Minion key states and transitions, and the master keypair, kept on a store."""
