"""The file server: file_roots listing, hashing and serving, kept on a store."""

from hamaster.fileroots.server import FileServer, open_file_server

__all__ = ["FileServer", "open_file_server"]
