"""Credentials only: API keys, JWT bearer tokens, scopes (the middleware is in ``serving.http``)."""

from __future__ import annotations

from serving.auth.access import AccessControl, credential
from serving.auth.keys import ApiKeys, KeyRecord, create_key, hash_key, read_keys, revoke_key
from serving.auth.scopes import Principal, infer_model, parse_scopes, required_scope
from serving.auth.tokens import JwtVerifier

__all__ = [
    "AccessControl",
    "ApiKeys",
    "JwtVerifier",
    "KeyRecord",
    "Principal",
    "create_key",
    "credential",
    "hash_key",
    "infer_model",
    "parse_scopes",
    "read_keys",
    "required_scope",
    "revoke_key",
]
