"""JWT verification: signature, exp, nbf, issuer, audience, scopes claim, JWKS, refusals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from pydantic import ValidationError

from serving.auth import JwtVerifier
from serving.config import JwtConfig
from tests.helpers.auth_material import (
    AUDIENCE,
    ISSUER,
    RsaPair,
    claims,
    hmac_with_public_key,
    rsa_pair,
    sign,
    unsigned,
)


@pytest.fixture(scope="module")
def pair() -> RsaPair:
    return rsa_pair()


@pytest.fixture
def verifier(pair: RsaPair, tmp_path: Path) -> JwtVerifier:
    return JwtVerifier(
        JwtConfig(
            public_key_file=pair.write_public(tmp_path / "pub.pem"),
            issuer=ISSUER,
            audience=AUDIENCE,
        )
    )


def test_valid_token_gives_its_scopes(verifier: JwtVerifier, pair: RsaPair) -> None:
    principal = verifier.authenticate(sign(claims("infer:digits read"), pair))
    assert principal is not None
    assert principal.name == "jwt:alice"
    assert principal.allows("infer", "digits") and principal.allows("read")
    assert not principal.allows("admin")


@pytest.mark.parametrize(
    "payload",
    [
        claims("read", exp_in=-60),
        claims("read", nbf=int(time.time()) + 600),
        claims("read", iss="https://elsewhere"),
        claims("read", aud="someone-else"),
        {k: v for k, v in claims("read").items() if k != "exp"},
    ],
    ids=["expired", "not-yet-valid", "wrong-issuer", "wrong-audience", "no-exp"],
)
def test_invalid_claims_are_refused(
    verifier: JwtVerifier, pair: RsaPair, payload: dict[str, object]
) -> None:
    assert verifier.authenticate(sign(payload, pair)) is None


def test_forged_tokens_are_refused(verifier: JwtVerifier, pair: RsaPair) -> None:
    other = rsa_pair()
    assert verifier.authenticate(sign(claims("admin"), other)) is None
    assert verifier.authenticate(unsigned(claims("admin"))) is None
    assert verifier.authenticate(hmac_with_public_key(claims("admin"), pair.public_pem)) is None
    good = sign(claims("admin"), pair)
    head, body, sig = good.split(".")
    tampered = json.loads(jwt.utils.base64url_decode(body))
    tampered["scope"] = "admin read infer:*"
    forged_body = jwt.utils.base64url_encode(json.dumps(tampered).encode()).decode()
    assert verifier.authenticate(f"{head}.{forged_body}.{sig}") is None
    assert verifier.authenticate("a.b.c") is None


def test_cached_token_still_expires(verifier: JwtVerifier, pair: RsaPair) -> None:
    payload = claims("read", exp_in=1)
    token = sign(payload, pair)
    assert verifier.authenticate(token) is not None
    assert verifier.authenticate(token) is not None  # from the cache
    time.sleep(max(0.0, payload["exp"] - time.time()) + 0.05)
    assert verifier.authenticate(token) is None


def test_jwks_picks_the_key_by_kid(pair: RsaPair, tmp_path: Path) -> None:
    other = rsa_pair()
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(p.private.public_key())), "kid": k}
            for p, k in ((pair, "one"), (other, "two"))
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = JwtVerifier(JwtConfig(jwks_file=path, scopes_claim="scp", name_claim="client"))
    token = sign(claims("", scp=["read"], client="svc"), other, kid="two")
    principal = verifier.authenticate(token)
    assert principal is not None and principal.name == "jwt:svc" and principal.allows("read")
    assert verifier.authenticate(sign(claims("", scp=["read"]), other, kid="one")) is None
    assert verifier.authenticate(sign(claims("", scp=["read"]), other, kid="nope")) is None


@pytest.mark.parametrize("algorithms", [["none"], ["HS256"], ["RS256", "HS512"]])
def test_config_refuses_symmetric_and_none(algorithms: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not accepted"):
        JwtConfig(public_key_file=tmp_path / "k.pem", algorithms=algorithms)


def test_config_needs_one_key_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        JwtConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        JwtConfig(public_key_file=tmp_path / "a", jwks_file=tmp_path / "b")
