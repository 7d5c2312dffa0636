"""The admin API answers loopback clients only (until authentication exists)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from serving.config import FermionConfig
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
