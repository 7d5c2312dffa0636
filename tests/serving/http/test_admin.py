"""The admin API: loopback clients only with auth off; the admin scope with auth on."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, ConfigError, FermionConfig
from serving.http.app import create_app
from tests.helpers.inprocess import serve_in_process


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


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"clf": {"split": {1: 95, 7: 5}}}, r"routes.clf sends traffic to version\(s\) \[7\]"),
        (
            {"clf": {"split": {1: 1}, "shadow": {"version": 9}}},
            r"version\(s\) \[9\], which this gateway does not serve \(it serves \[1, 2, 3, 4\]",
        ),
        ({"ghost": {"split": {1: 1}}}, "routes.ghost: model ghost has no published version"),
    ],
)
def test_a_route_to_a_version_not_served_fails_the_start(
    ab_store: ModelStore, routes: dict[str, object], message: str
) -> None:
    config = FermionConfig.model_validate({"routes": routes})
    with pytest.raises(ConfigError, match=message):
        create_app(config, store=ab_store)


async def test_a_route_with_a_zero_weight_on_an_unserved_version_is_kept(
    ab_store: ModelStore,
) -> None:
    config = FermionConfig.model_validate(
        {"store": {"root": str(ab_store.root)}, "routes": {"clf": {"split": {1: 1, 7: 0}}}}
    )
    async with serve_in_process(config, ab_store) as gw:
        route = await gw.client.get("/admin/routes/clf")
        assert route.status_code == 200, route.text
        assert route.json()["split"] == {"1": 1.0, "7": 0.0}
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
        versions = set()
        for _ in range(10):
            r = await gw.client.post("/v2/models/clf/infer", json=body)
            assert r.status_code == 200, r.text
            versions.add(r.headers["fermion-model-version"])
        assert versions == {"1"}  # the route applies: not the latest version (4)


@pytest.mark.parametrize(
    ("client", "status"),
    [(("203.0.113.7", 5000), 403), (("10.1.2.3", 5000), 403), (("127.0.0.1", 5000), 200)],
)
async def test_the_repository_api_follows_the_admin_rule(
    ab_store: ModelStore, client: tuple[str, int], status: int
) -> None:
    app = create_app(FermionConfig(), store=ab_store)
    transport = httpx.ASGITransport(app=app, client=client)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as http,
    ):
        while (await http.get("/v2/health/ready")).status_code != 200:
            await asyncio.sleep(0.02)
        for path in ("/v2/repository/index", "/v2/repository/models/clf/unload"):
            r = await http.post(path)
            assert r.status_code == status, r.text
            if status == 403:
                assert r.json() == {"error": "the repository API answers loopback clients only"}
        # Nobody off loopback could unload it: it is still served (here, reloaded).
        assert (await http.post("/v2/repository/models/clf/load")).status_code == status


async def test_loading_unknown_names_keeps_nothing_and_echoes_no_path(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    app = create_app(FermionConfig(), store=store)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        r = await http.post("/v2/repository/models/ghost/load")
        assert r.status_code == 404
        assert str(store.root) not in r.text and "ghost" in r.json()["error"]
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for i in range(500):
                name = f"n{i}-" + "x" * 2000
                assert (await http.post(f"/v2/repository/models/{name}/load")).status_code == 404
            gc.collect()
            grown = tracemalloc.take_snapshot().compare_to(before, "filename")
        finally:
            tracemalloc.stop()
    # Before, each name kept a lock (and the name) for ever: about 2.5 kB each here.
    repository_growth = sum(d.size_diff for d in grown if "repository.py" in str(d.traceback))
    assert repository_growth < 50_000, grown[:5]
