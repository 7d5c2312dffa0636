"""LocalBackend: when a lone batch may run on the event loop (real ONNX models of ``clf``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.inference.backends.local import LocalBackend
from tests.helpers.ab_models import MODEL, W1


def _x(rows: int = 1, slow: float = 0.0, first: float = 1.0) -> dict[str, np.ndarray]:
    x = np.ones((rows, 4), dtype=np.float32)
    x[:, 0] = first
    x[:, 3] = slow
    return {"x": x}


@pytest.fixture
async def backend(ab_store: ModelStore) -> AsyncIterator[LocalBackend]:
    config = FermionConfig.model_validate(
        {"store": {"root": str(ab_store.root)}, "local": {"inline_max_ms": 1.0}}
    )
    backend = LocalBackend(config, ab_store)
    await backend.start()
    try:
        for version in (1, 3, 4):
            await backend.load(ab_store.manifest(MODEL, version))
        yield backend
    finally:
        await backend.stop()


async def test_a_version_runs_inline_only_after_a_short_run(backend: LocalBackend) -> None:
    inline = backend.inline_runner(MODEL, 1)
    assert inline is not None
    assert inline(_x()) is None  # never ran: no idea how long it takes
    await backend.infer_batch(MODEL, 1, _x())
    out = inline(_x(first=2.0))
    assert out is not None
    np.testing.assert_allclose(out["logits"], _x(first=2.0)["x"] @ W1, rtol=1e-5)


async def test_a_long_run_sends_the_next_batches_to_the_pool(backend: LocalBackend) -> None:
    inline = backend.inline_runner(MODEL, 4)
    assert inline is not None
    await backend.infer_batch(MODEL, 4, _x())
    assert inline(_x()) is not None
    await backend.infer_batch(MODEL, 4, _x(slow=20.0))  # ~0.1 s: past the 1 ms bound
    assert inline(_x()) is None
    await backend.infer_batch(MODEL, 4, _x())  # short again
    assert inline(_x()) is not None


async def test_no_inline_run_while_the_pool_computes(backend: LocalBackend) -> None:
    inline = backend.inline_runner(MODEL, 1)
    assert inline is not None
    await backend.infer_batch(MODEL, 1, _x())
    slow = asyncio.ensure_future(backend.infer_batch(MODEL, 4, _x(slow=40.0)))
    await asyncio.sleep(0.02)  # the slow batch is in the pool now
    assert not slow.done()
    assert inline(_x()) is None
    await slow
    assert inline(_x()) is not None


async def test_an_inline_run_raises_as_the_model_fails(backend: LocalBackend) -> None:
    inline = backend.inline_runner(MODEL, 3)
    assert inline is not None
    await backend.infer_batch(MODEL, 3, _x())
    with pytest.raises(Exception, match=r"(?i)gather|index|out of"):
        inline(_x(first=5.0))  # version 3 fails for x[:, 0] >= 4


async def test_a_reload_forgets_what_the_version_took(
    backend: LocalBackend, ab_store: ModelStore
) -> None:
    inline = backend.inline_runner(MODEL, 1)
    assert inline is not None
    await backend.infer_batch(MODEL, 1, _x())
    await backend.load(ab_store.manifest(MODEL, 1))
    assert inline(_x()) is None


async def test_inline_is_off_unless_asked_for(ab_store: ModelStore) -> None:
    config = FermionConfig.model_validate({"store": {"root": str(ab_store.root)}})
    assert config.local.inline_max_ms == 0
    assert LocalBackend(config, ab_store).inline_runner(MODEL, 1) is None
