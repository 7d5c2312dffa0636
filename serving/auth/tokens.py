"""JWT bearer tokens: signature, ``exp``, ``nbf``, issuer and audience, scopes from a claim.

Only the asymmetric algorithms named in the config are accepted, so ``alg: none``
and HMAC tokens signed with the public key (algorithm confusion) are refused.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from serving.auth.scopes import Principal
from serving.config import JwtConfig

__all__ = ["JwtVerifier", "looks_like_jwt"]

log = logging.getLogger("fermion.auth")

_CACHE_LIMIT = 4096


def looks_like_jwt(token: str) -> bool:
    """True for the compact JWS shape (three dot-separated parts)."""
    return token.count(".") == 2


class JwtVerifier:
    """Verifies JWTs against one public key or a JWKS file; remembers verified tokens."""

    def __init__(self, config: JwtConfig) -> None:
        self._config = config
        self._algorithms = list(config.algorithms)
        self._key: Any = None
        self._jwks: dict[str, Any] = {}
        try:
            if config.public_key_file is not None:
                self._key = load_pem_public_key(config.public_key_file.read_bytes())
            elif config.jwks_file is not None:
                keyset = jwt.PyJWKSet.from_dict(json.loads(config.jwks_file.read_text()))
                self._jwks = {k.key_id: k for k in keyset.keys if k.key_id}
                if len(keyset.keys) == 1 and not self._jwks:
                    self._key = keyset.keys[0].key
        except (OSError, ValueError, jwt.PyJWTError) as e:
            raise ValueError(f"cannot load the JWT verification key: {e}") from e
        # token -> (principal, not before); the principal carries the expiry.
        self._cache: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, token: str) -> Principal | None:
        """The caller a valid token names, or None for any invalid token."""
        now = time.time()
        leeway = self._config.leeway_s
        hit = self._cache.get(token)
        if hit is not None:
            principal, nbf = hit
            exp = principal.expires_at
            if (exp is None or now < exp + leeway) and now >= nbf - leeway:
                return principal
            if exp is not None and now >= exp + leeway:
                del self._cache[token]
            return None
        try:
            claims = self._verify(token)
        except jwt.PyJWTError as e:
            log.debug("JWT refused: %s", e)
            return None
        principal = Principal(
            f"jwt:{claims.get(self._config.name_claim, '?')}",
            self._scopes(claims),
            float(claims["exp"]),
        )
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, float(claims.get("nbf", 0)))
        return principal

    def _verify(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        if header.get("alg") not in self._algorithms:
            raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} not accepted")
        key = self._key
        if self._jwks:
            jwk = self._jwks.get(str(header.get("kid")))
            if jwk is None:
                raise jwt.InvalidKeyError("unknown kid")
            key = jwk.key
        if key is None:
            raise jwt.InvalidKeyError("the JWKS has several keys; the token names none")
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=self._algorithms,
            audience=self._config.audience,
            issuer=self._config.issuer,
            leeway=self._config.leeway_s,
            options={
                "require": ["exp"],
                "verify_aud": self._config.audience is not None,
                "verify_iss": self._config.issuer is not None,
            },
        )
        return claims

    def _scopes(self, claims: dict[str, Any]) -> list[str]:
        raw = claims.get(self._config.scopes_claim, [])
        if isinstance(raw, str):
            return raw.split()
        if isinstance(raw, list):
            return [s for s in raw if isinstance(s, str)]
        return []
