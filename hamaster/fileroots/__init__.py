"""The file server: file_roots listing, hashing and serving, kept on a store."""
