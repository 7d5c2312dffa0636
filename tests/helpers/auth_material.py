"""Keys and tokens for the auth tests: RSA pairs, signed, unsigned and forged JWTs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://issuer.test"
AUDIENCE = "fermion"


@dataclass(frozen=True)
class RsaPair:
    """An RSA private key and its public key as PEM."""

    private: rsa.RSAPrivateKey
    public_pem: bytes

    def write_public(self, path: Path) -> Path:
        path.write_bytes(self.public_pem)
        return path


def rsa_pair() -> RsaPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RsaPair(private, pem)


def claims(scope: str, *, sub: str = "alice", exp_in: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + int(exp_in),
        "scope": scope,
        **extra,
    }


def sign(payload: dict[str, Any], pair: RsaPair, *, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, pair.private, algorithm="RS256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """An ``alg: none`` token."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def hmac_with_public_key(payload: dict[str, Any], public_pem: bytes) -> str:
    """HS256 signed with the server's public key as the secret (algorithm confusion)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    mac = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"
