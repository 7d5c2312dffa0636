"""Shared test helpers: model stores, in-process gateways, credentials (no tests here)."""
