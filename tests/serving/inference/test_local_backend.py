"""LocalBackend: when a lone batch may run on the event loop, and batches its pool's threads
start themselves (real ONNX models of ``clf``)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import numpy as np
import pytest

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.errors import ModelNotReady
from serving.inference.backends.local import LocalBackend
from serving.inference.batcher import DynamicBatcher
from tests.helpers.ab_models import MODEL, W1
from tests.helpers.polling import until


def _x(rows: int = 1, slow: float = 0.0, first: float = 1.0) -> dict[str, np.ndarray]:
    x = np.ones((rows, 4), dtype=np.float32)
    x[:, 0] = first
    x[:, 3] = slow
    return {"x": x}


@pytest.fixture
async def backend(ab_store: ModelStore) -> AsyncIterator[LocalBackend]:
    config = FermionConfig.model_validate(
        {"store": {"root": str(ab_store.root)}, "local": {"inline_max_ms": 10.0}}
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
    await backend.infer_batch(MODEL, 4, _x(slow=20.0))  # ~0.1 s: past the 10 ms bound
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


def _threaded(backend: LocalBackend, version: int) -> DynamicBatcher:
    """A batcher of the version as the repository builds one for backend local."""
    return DynamicBatcher(
        functools.partial(backend.infer_batch, MODEL, version),
        max_batch_size=8,
        run_threaded=backend.threaded_runner(MODEL, version),
    )


async def test_the_pools_threads_start_a_versions_batches(backend: LocalBackend) -> None:
    batcher = _threaded(backend, 1)
    firsts = [float(i % 4) for i in range(24)]
    outs = await asyncio.gather(*(batcher.submit(_x(first=f), 1) for f in firsts))
    for f, out in zip(firsts, outs, strict=True):
        np.testing.assert_allclose(out["logits"], _x(first=f)["x"] @ W1, rtol=1e-5)
    assert batcher.stats.inference_count == 24 and batcher.running == 0
    # A slow batch on a pool thread keeps a lone batch off the loop, as infer_batch's do.
    inline = backend.inline_runner(MODEL, 1)
    assert inline is not None
    # The threaded batches' last run may have waited past the 10 ms bound for the GIL
    # (the loop was busy with 24 submits): one run with the loop idle says again that
    # the version is short.
    await backend.infer_batch(MODEL, 1, _x())
    # A pool thread counts itself out just after it hands its answers to the loop, so
    # the loop may see a batch answered a moment before the pool is idle.
    await until(lambda: inline(_x()) is not None, "an inline run once the pool is idle")
    slow = asyncio.ensure_future(_threaded(backend, 4).submit(_x(slow=40.0), 1))
    await asyncio.sleep(0.02)
    assert not slow.done() and inline(_x()) is None
    await slow
    await until(lambda: inline(_x()) is not None, "an inline run after the slow batch")


async def test_a_version_gone_from_the_pool_fails_its_batch_as_not_ready(
    backend: LocalBackend,
) -> None:
    batcher = _threaded(backend, 1)
    await backend.unload(MODEL, 1)
    with pytest.raises(ModelNotReady) as raised:
        await batcher.submit(_x(), 1)
    assert raised.value.message == f"model {MODEL} version 1 has no replica"
    await backend.stop()  # the pool is gone: refused at once, nothing waits
    with pytest.raises(ModelNotReady) as stopped:
        await asyncio.wait_for(batcher.submit(_x(), 1), timeout=5.0)
    assert stopped.value.message == "the inference pool is stopped"
