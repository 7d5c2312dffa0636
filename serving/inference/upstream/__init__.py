"""Upstream V2 servers a remote version is computed on: client, wire format, pool."""
