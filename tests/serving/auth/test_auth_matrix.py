"""Every route x every kind of credential, on the real app in process.

A denied request gets 401 (no or invalid credentials) or 403 (missing scope),
with a body that never says which keys exist, and never reaches a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, FermionConfig, JwtConfig
from tests.helpers.ab_models import v2_body
from tests.helpers.auth_material import (
    AUDIENCE,
    ISSUER,
    claims,
    hmac_with_public_key,
    rsa_pair,
    sign,
    unsigned,
)
from tests.helpers.inprocess import InProcessGateway, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPEN, READ, INFER, ADMIN = "open", "read", "infer", "admin"

ROUTES = [
    ("GET", "/v2/health/live", OPEN),
    ("GET", "/v2/health/ready", OPEN),
    ("GET", "/metrics", OPEN),
    ("GET", "/v2", READ),
    ("GET", "/v2/models/clf", READ),
    ("GET", "/v2/models/clf/versions/1/config", READ),
    ("GET", "/v2/models/clf/stats", READ),
    ("POST", "/v2/models/clf/infer", INFER),
    ("POST", "/v2/models/clf/versions/1/infer", INFER),
    ("POST", "/v2/repository/index", ADMIN),
    ("POST", "/v2/repository/models/clf/load", ADMIN),
    ("GET", "/admin/routes", ADMIN),
]

#: credential -> what it grants (None: not a valid credential at all).
GRANTS: dict[str, set[str] | None] = {
    "no credentials": None,
    "bad key": None,
    "expired key": None,
    "wrong scope": set(),
    "good key": {READ, INFER},
    "admin key": {READ, ADMIN},
    "good JWT": {READ, INFER, ADMIN},
    "bad JWT signature": None,
    "expired JWT": None,
    "alg none": None,
    "HS256 with the public key": None,
}


class _Setup:
    gateway: InProcessGateway
    headers: dict[str, dict[str, str]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(
    ab_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[_Setup]:
    tmp = tmp_path_factory.mktemp("auth-matrix")
    keys = tmp / "keys.json"
    pair, other = rsa_pair(), rsa_pair()
    past = datetime.now(UTC) - timedelta(minutes=1)
    bearer = {
        "good key": create_key(keys, "good", ["infer:clf", "read"]),
        "admin key": create_key(keys, "ops", ["admin"]),
        "wrong scope": create_key(keys, "other", ["infer:other*"]),
        "expired key": create_key(keys, "old", ["infer:*", "read", "admin"], expires_at=past),
        "good JWT": sign(claims("infer:clf read admin"), pair),
        "bad JWT signature": sign(claims("infer:clf read admin"), other),
        "expired JWT": sign(claims("infer:* read admin", exp_in=-120), pair),
        "alg none": unsigned(claims("infer:* read admin")),
        "HS256 with the public key": hmac_with_public_key(
            claims("infer:* read admin"), pair.public_pem
        ),
    }
    s = _Setup()
    s.headers = {name: {"Authorization": f"Bearer {token}"} for name, token in bearer.items()}
    s.headers["bad key"] = {"x-api-key": "fmn_" + "A" * 43}
    s.headers["no credentials"] = {}
    config = FermionConfig(
        auth=AuthConfig(
            keys_file=keys,
            jwt=JwtConfig(
                public_key_file=pair.write_public(tmp / "jwt.pem"),
                issuer=ISSUER,
                audience=AUDIENCE,
            ),
        )
    )
    async with serve_in_process(config, ab_store) as gateway:
        s.gateway = gateway
        yield s


def _expected(need: str, credential: str) -> int:
    if need == OPEN:
        return 200
    grants = GRANTS[credential]
    if grants is None:
        return 401
    return 200 if need in grants else 403


@pytest.mark.parametrize("credential", list(GRANTS))
@pytest.mark.parametrize(("method", "path", "need"), ROUTES)
async def test_route_by_credential(
    setup: _Setup, method: str, path: str, need: str, credential: str
) -> None:
    gw = setup.gateway
    body = v2_body() if path.endswith("/infer") else None
    rows_before = gw.computed_rows()
    response = await gw.client.request(method, path, json=body, headers=setup.headers[credential])
    expected = _expected(need, credential)
    assert response.status_code == expected, response.text
    computed = gw.computed_rows() - rows_before
    if expected == 401:
        # Same answer for an unknown, expired or forged credential: nothing to probe.
        assert response.json() == {"error": "missing or invalid credentials"}
        assert response.headers["www-authenticate"] == "Bearer"
    elif expected == 403:
        assert "lacks the scope" in response.json()["error"]
    # A denied request never reaches a model; an allowed inference computes its one row.
    assert computed == (1 if expected == 200 and need == INFER else 0)


async def test_revoked_key_is_refused_on_the_running_app(setup: _Setup) -> None:
    keys = setup.gateway.app.state.config.auth.keys_file
    key = create_key(keys, "short-lived", ["read"])
    headers = {"x-api-key": key}
    assert (await setup.gateway.client.get("/v2", headers=headers)).status_code == 200
    from serving.auth import revoke_key

    assert revoke_key(keys, "short-lived")
    await asyncio.sleep(0.06)  # the keys file is checked at most every 50 ms
    assert (await setup.gateway.client.get("/v2", headers=headers)).status_code == 401
