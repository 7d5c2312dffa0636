"""What one batch's hop to a Ray replica costs, by transport, side by side in one run.

    python -m bench.ray_hop [--store model_store] [--model digits] [--requests 2000] [--rounds 2]

One request at a time (c=1), one sample of the demo model, no HTTP: the time from
sending a batch to having its outputs back on the gateway's event loop (uvloop), for

- ``fermion ray``: ``RayBackend.infer_batch``, the path Fermion's backend ``ray`` takes
  for every deployment (by default): Fermion's own channel to the replica
  (``serving/inference/backends/channel.py``: a TCP connection per batch in flight, the
  batch's tensors as raw bytes, ``infer`` on a thread of the replica);
- ``fermion ray, serve handle``: the same backend and replica through Ray Serve's handle,
  the path of ``ray.channel: false``, and of autoscaling deployments before they took
  the channel too (its router on the gateway's loop, Serve's gRPC channel to the
  replica, ``infer`` on the replica's loop);
- ``ray actor``: a plain Ray actor holding the same ``ReplicaDeployment``, called with
  ``actor.infer.remote`` (Ray's own task RPC, no Serve);
- ``ray compiled graph``: that actor behind a Ray compiled graph (``experimental_compile``,
  shared-memory channels; its readers poll, so it runs last, after the others).

For each: p50 and p99 of the round trip, and the CPU time of this (gateway) process per
call, all of its threads (``time.process_time``). Rounds interleave the first two; the
ratios at the end are against ``fermion ray``. The replica's compute alone is printed
beside them (``ReplicaDeployment.infer`` timed in a Ray worker, no hop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._store import find_model_version
from model_store.store import ModelStore
from serving.config import FermionConfig

__all__ = ["main"]

Call = Callable[[], Awaitable[Any]]


def _timed_compute(args: tuple[Any, ...], inputs: dict[str, np.ndarray], n: int) -> float:
    """Median µs of ``n`` calls of ``ReplicaDeployment(*args).infer`` in this process
    (a Ray worker beside the replicas): the model's compute without any hop."""
    from serving.inference.backends.ray import ReplicaDeployment

    replica = ReplicaDeployment(*args)
    took = []
    for _ in range(n):
        started = time.perf_counter_ns()
        replica.infer(inputs)
        took.append(time.perf_counter_ns() - started)
    return statistics.median(took) / 1e3


async def _measure(call: Call, n: int) -> dict[str, float]:
    for _ in range(min(200, n)):
        await call()
    took: list[int] = []
    cpu = time.process_time()
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        took.append(time.perf_counter_ns() - started)
    cpu_us = (time.process_time() - cpu) / n * 1e6
    took.sort()
    return {
        "p50_ms": took[n // 2] / 1e6,
        "p99_ms": took[min(n - 1, int(n * 0.99))] / 1e6,
        "cpu_us": cpu_us,
    }


async def _run(
    store: ModelStore, model_name: str, requests: int, rounds: int
) -> dict[str, list[dict[str, float]]]:
    import ray
    from ray.dag import InputNode

    from serving.inference.backends.ray import RayBackend, ReplicaDeployment

    model = find_model_version(store.root, model_name)
    manifest = store.manifest(model.name, model.version)
    config = FermionConfig.model_validate(
        {"backend": "ray", "ray": {"deployment": {"num_cpus": 1}}}
    )
    backend = RayBackend(config, store)
    await backend.start()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        await backend.load(manifest)
        spec = manifest.inputs[0]
        rng = np.random.default_rng(0)
        inputs = {spec.name: rng.random((1, *spec.shape[1:]), dtype=np.float32)}
        # The replica's arguments as RayBackend binds them (tracing off).
        executor = config.executor_for(model.name)
        args = (
            str(store.root.resolve()),
            manifest.model_dump_json(),
            list(executor.prefer),
            executor.intra_op_threads,
            None,
        )
        actor_class = ray.remote(num_cpus=0)(ReplicaDeployment)
        actor: Any = actor_class.remote(*args)
        await actor.describe.remote()
        compute = ray.remote(num_cpus=0)(_timed_compute)

        async def fermion_ray() -> Any:
            return await backend.infer_batch(model.name, model.version, inputs)

        deployment = backend._deployments[(model.name, model.version)]
        if not deployment.channels:
            raise RuntimeError("the replica offers no channel: fermion ray would be the handle")

        async def serve_handle() -> Any:
            # The same deployment with its channels set aside: Serve's handle carries it.
            channels, deployment.channels = deployment.channels, {}
            deployment.use_channel = False  # and the refresh leaves them aside
            try:
                return await backend.infer_batch(model.name, model.version, inputs)
            finally:
                deployment.channels, deployment.use_channel = channels, True

        async def actor_call() -> Any:
            return await actor.infer.remote(inputs)

        for _ in range(rounds):
            for name, call in (
                ("fermion ray", fermion_ray),
                ("fermion ray, serve handle", serve_handle),
                ("ray actor", actor_call),
            ):
                results.setdefault(name, []).append(await _measure(call, requests))
        compute_us = await compute.remote(args, inputs, requests)
        results["replica compute"] = [{"p50_ms": compute_us / 1e3}]

        graph_actor: Any = actor_class.remote(*args)
        await graph_actor.describe.remote()
        with InputNode() as batch:
            dag = graph_actor.infer.bind(batch)
        compiled = dag.experimental_compile(enable_asyncio=True)
        try:

            async def graph_call() -> Any:
                future = await compiled.execute_async(inputs)
                return await future

            for _ in range(rounds):
                results.setdefault("ray compiled graph", []).append(
                    await _measure(graph_call, requests)
                )
        finally:
            compiled.teardown()
    finally:
        await backend.stop()
    return results


def _median(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Print each transport's c=1 round trip and the ratios against Fermion's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    # Read by Ray at import: the local cluster binds loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import uvloop

    store = ModelStore(args.store)
    results = uvloop.run(_run(store, args.model, args.requests, args.rounds))
    base = _median(results["fermion ray"], "p50_ms")
    head = f"{'c=1, one sample':24} {'p50 ms':>8} {'p99 ms':>8} {'cpu µs/call':>12}"
    print(f"\n{head} {'p50 ratio':>10}")
    for name, rows in results.items():
        p50, p99, cpu = (_median(rows, k) for k in ("p50_ms", "p99_ms", "cpu_us"))
        print(f"{name:24} {p50:8.3f} {p99:8.3f} {cpu:12.0f} {p50 / base:9.2f}x")
    print("(cpu: this process, all threads; the compiled graph's readers poll)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
