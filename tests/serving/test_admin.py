"""The admin API: loopback clients only with auth off; the admin scope with auth on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, FermionConfig
from serving.gateway.app import create_app


@pytest.mark.parametrize(
    ("client", "status"),
    [
        (("203.0.113.7", 5000), 403),
        (("10.1.2.3", 5000), 403),
        (("127.0.0.1", 5000), 404),
        (("::1", 5000), 404),
    ],
)
async def test_admin_routes_refuse_clients_off_loopback(
    tmp_path: Path, client: tuple[str, int], status: int
) -> None:
    app = create_app(FermionConfig(), store=ModelStore(tmp_path))
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        r = await http.get("/admin/routes/digits")
        assert r.status_code == status
        if status == 403:
            assert r.json() == {"error": "the admin API answers loopback clients only"}
            put = await http.put("/admin/routes/digits/split", json={"split": {"1": 1}})
            assert put.status_code == 403
        else:
            assert r.json() == {"error": "no route 'digits'"}
        # The V2 API is not restricted.
        assert (await http.get("/v2/health/live")).status_code == 200


async def test_with_auth_on_the_admin_scope_opens_it_to_any_client(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    admin = create_key(keys, "ops", ["admin"])
    reader = create_key(keys, "dash", ["read"])
    config = FermionConfig(auth=AuthConfig(keys_file=keys))
    app = create_app(config, store=ModelStore(tmp_path / "store"))
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        assert (await http.get("/admin/routes")).status_code == 401
        denied = await http.get("/admin/routes", headers={"x-api-key": reader})
        assert denied.status_code == 403
        r = await http.get("/admin/routes", headers={"x-api-key": admin})
        assert r.status_code == 200, r.text
