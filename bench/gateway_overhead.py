"""Per-request cost of the gateway's own layers (auth, limits, tracing, metrics), in process.

Drives the real ASGI app (``create_app``) with one binary-tensor request at a time
(a V2 JSON one where the configuration says so), against a backend that answers
zeros, so that only the gateway is measured: the middleware, the route, the codec
and the batcher. Prints microseconds per request for each configuration (CPU time of
the process, so that other load on the machine matters less), measured interleaved
in one run so that they compare. A request sampled by tracing is measured with every
request sampled, its spans going to an in-memory exporter; those spans are then sent
through the gateway's OTLP/HTTP and OTLP/gRPC exporters to loopback sinks, 64 at a time
as the gateway's batch processor sends them, and the exporter thread's CPU per sampled
request is printed too (off the request path, but holding the GIL).

``--http`` sends each request as HTTP/1.1 bytes through the gateway's own connection
protocol (``GuardedHttpProtocol``: httptools parsing, uvicorn's request cycle, the
response written in one piece) on one keep-alive connection over an in-memory
transport, on uvloop as the server runs, so that the figures add the HTTP layer's and
the event loop's cost, all of it but the socket's system calls.

``--base CHECKOUT`` compares this checkout with another (a ``git worktree`` of an
earlier commit, say) on a machine whose speed varies from second to second: each
configuration runs in one worker process per checkout (this file, importing each
checkout's ``serving``), the two given ``--rounds`` rounds of requests in turn, and
the medians and tenth percentiles of the rounds are printed with their ratios. The
rounds are shared by ``--pairs`` pairs of fresh workers: one process can run a few
percent faster or slower than another of the same code for its whole life.

    python -m bench.gateway_overhead --store model_store [--requests 20000] [--only NAME]
        [--http] [--base CHECKOUT [--rounds 40] [--pairs 4]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping, Sequence
from contextlib import asynccontextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import orjson
import uvicorn
import uvloop as _uvloop
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench._otlp import grpc_span_sink, span_sink
from bench._transport import MemoryTransport
from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.http.app import create_app
from serving.http.connection import ConnectionLimits, guarded_protocol
from serving.http.drain import DrainState
from serving.inference.backends import Backend
from serving.observability.tracing import EXPORT_BATCH

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent

_T = TypeVar("_T")


class _ZerosBackend(Backend):
    """Answers every batch with zeros of the manifest's output shapes: no model compute."""

    def __init__(self) -> None:
        self._outputs: dict[tuple[str, int], list[tuple[str, list[int]]]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def load(self, manifest: ModelManifest) -> dict[str, Any]:
        self._outputs[(manifest.name, manifest.version)] = [
            (o.name, o.shape) for o in manifest.outputs
        ]
        return {"backend": "zeros"}

    async def unload(self, name: str, version: int) -> None:
        self._outputs.pop((name, version), None)

    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0]
        return {
            n: np.zeros([rows, *shape[1:]], dtype=np.float32)
            for n, shape in self._outputs[(name, version)]
        }


class _Case(NamedTuple):
    """One measured configuration: its config data, request headers and body kind."""

    data: dict[str, Any]
    headers: dict[str, str]
    json: bool = False
    #: Every request sampled by tracing (spans to an in-memory exporter).
    traced: bool = False


def _request(
    model: str, headers: dict[str, str], *, json: bool = False
) -> tuple[dict[str, Any], bytes]:
    # Pixel-like values, as a client would send them: JSON numbers of varied digits.
    image = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    if json:
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP32",
                        "data": image.ravel().tolist(),
                    }
                ]
            }
        )
        framing = [(b"content-type", b"application/json")]
    else:
        tensor = image.tobytes()
        header = (
            b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32",'
            b'"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"logits",'
            b'"parameters":{"binary_data":true}}]}' % len(tensor)
        )
        body = header + tensor
        framing = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(len(header)).encode()),
        ]
    raw = [
        *framing,
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v2/models/{model}/infer",
        "raw_path": f"/v2/models/{model}/infer".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    return scope, body


def _over_http(app: Any, scope: dict[str, Any], body: bytes, statuses: list[int]) -> Any:
    """An ASGI-shaped callable that sends ``scope``'s request through the gateway's
    connection protocol as bytes and waits for the response's bytes."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        http=guarded_protocol(ConnectionLimits(), DrainState()),
        ws="none",
    )
    config.load()  # (as the server does: the app behind uvicorn's proxy-headers layer)
    state = uvicorn.server.ServerState()
    state.default_headers = [(b"date", formatdate(usegmt=True).encode()), *config.encoded_headers]
    protocol = config.http_protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
    wire = MemoryTransport()
    protocol.connection_made(wire)
    head = [f"POST {scope['path']} HTTP/1.1\r\nhost: bench\r\n".encode()]
    head += [k + b": " + v + b"\r\n" for k, v in scope["headers"]]
    raw = b"".join([*head, b"\r\n", body])

    async def call(_scope: Any, _receive: Any, _send: Any) -> None:
        if not wire.answers.empty():
            raise RuntimeError("a response came in more than one write")
        protocol.data_received(raw)
        answer = await wire.answers.get()
        wire.writes.clear()
        statuses.append(int(answer[9:12]))

    return call


@asynccontextmanager
async def _driver(
    config: FermionConfig, store: ModelStore, case: _Case, *, http: bool = False
) -> AsyncIterator[tuple[Callable[[int], Awaitable[float]], InMemorySpanExporter | None]]:
    """A gateway of ``config`` started and warmed up, and a coroutine function that
    sends it ``n`` requests and gives their CPU µs per request (this thread's and the
    others' of the process), with the exporter of traced cases."""
    exporter = InMemorySpanExporter() if case.traced else None
    gateway = create_app(config, store=store, backend=_ZerosBackend(), span_exporter=exporter)
    model = store.models()[0]
    scope, body = _request(model, case.headers, json=case.json)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    app = _over_http(gateway, scope, body, statuses) if http else gateway

    async def requests(n: int) -> float:
        started = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.process_time() - started) / n * 1e6

    async with gateway.router.lifespan_context(gateway):
        while not gateway.state.repository.ready:
            await asyncio.sleep(0.01)
        await requests(200)  # warm-up
        yield requests, exporter
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")


async def _measure(
    config: FermionConfig, store: ModelStore, case: _Case, n: int, *, http: bool = False
) -> tuple[list[float], tuple[ReadableSpan, ...]]:
    """CPU µs per request of each of five rounds, and the spans the last round exported."""
    rounds: list[float] = []
    async with _driver(config, store, case, http=http) as (requests, exporter):
        for _ in range(5):
            if exporter is not None:
                exporter.clear()
            rounds.append(await requests(n // 5))
    spans = exporter.get_finished_spans() if exporter is not None else ()
    if exporter is not None and not spans:
        raise RuntimeError("tracing sampled every request but no span was exported")
    return rounds, spans


async def _serve_rounds(
    config: FermionConfig, store: ModelStore, case: _Case, n: int, *, http: bool
) -> None:
    """``--worker``: a round of ``n`` requests for each ``go`` line on stdin, its CPU µs
    per request printed; any other line ends it."""
    async with _driver(config, store, case, http=http) as (requests, _):
        print("ready", flush=True)
        for line in sys.stdin:  # (blocks the loop between rounds: nothing else runs)
            if line.strip() != "go":
                break
            print(f"{await requests(n):.3f}", flush=True)


def _compare(args: argparse.Namespace, names: list[str], scratch: Path) -> None:
    """Each configuration measured in this checkout and in ``args.base`` at once: a
    worker process per checkout, given rounds of requests in turn (which goes first
    alternates), so that both see the same moments of a machine whose speed varies.

    ``args.pairs`` pairs of fresh workers share the rounds: one process of a checkout
    can run a few percent faster or slower than the next for the whole of its life (its
    memory's layout), which one pair would take for the checkout's own difference. The
    medians and tenth percentiles are of every round, the ratio's range of the pairs'.

    Both workers run this checkout's ``bench`` (a folder holding only a link to it comes
    first on their path) and import ``serving`` and ``model_store`` from their own
    checkout, so an older checkout needs none of this bench's modules."""
    trees = {"this": _ROOT, "base": args.base.resolve()}
    shim = scratch / "path"
    shim.mkdir()
    (shim / "bench").symlink_to(_ROOT / "bench", target_is_directory=True)
    per_round = max(50, args.requests // args.rounds)
    pairs = max(1, min(args.pairs, args.rounds // 2))
    print(
        f"{args.rounds} rounds of {per_round} requests in turn, over {pairs} pair(s) of "
        "workers; CPU µs per request"
    )
    columns = ("this: median, p10", "base: median, p10", "this/base", "pairs' ratios")
    print(
        f"{'configuration':40} {columns[0]:>18} {columns[1]:>18} {columns[2]:>15} {columns[3]:>13}"
    )
    for name in names:
        results: dict[str, list[float]] = {label: [] for label in trees}
        ratios: list[float] = []
        for pair in range(pairs):
            rounds = args.rounds // pairs + (pair < args.rounds % pairs)
            got = _pair_rounds(args, name, trees, shim, per_round, rounds)
            for label, values in got.items():
                results[label] += values
            ratios.append(statistics.median(got["this"]) / statistics.median(got["base"]))
        this, base = (_median_p10(results[label]) for label in ("this", "base"))
        print(
            f"{name:40} {this[0]:9.1f}, {this[1]:6.1f} {base[0]:9.1f}, {base[1]:6.1f} "
            f"{this[0] / base[0]:7.3f}, {this[1] / base[1]:.3f} "
            f"{min(ratios):6.3f}-{max(ratios):.3f}"
        )


def _pair_rounds(
    args: argparse.Namespace,
    name: str,
    trees: dict[str, Path],
    shim: Path,
    per_round: int,
    rounds: int,
) -> dict[str, list[float]]:
    """CPU µs per request of each of ``rounds`` rounds given in turn to one new worker
    per checkout, by checkout."""
    workers = {
        label: subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                *("--worker", name, "--requests", str(per_round)),
                *("--store", str(args.store.resolve())),
                *(["--http"] if args.http else []),
            ],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(tree)])},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for label, tree in trees.items()
    }
    results: dict[str, list[float]] = {label: [] for label in workers}
    try:
        for label, worker in workers.items():
            assert worker.stdout is not None
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {label} worker did not start ({trees[label]})")
        order = list(workers)
        for i in range(rounds):
            for label in order if i % 2 == 0 else order[::-1]:
                worker = workers[label]
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write("go\n")
                worker.stdin.flush()
                results[label].append(float(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in workers.values():
            worker.wait(timeout=60)
    return results


def _median_p10(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=10)[0]


def _run(measure: Coroutine[Any, Any, _T], *, uvloop: bool) -> _T:
    """``measure`` run on a new event loop: uvloop's (the server's) or asyncio's own."""
    with asyncio.Runner(loop_factory=_uvloop.new_event_loop if uvloop else None) as runner:
        return runner.run(measure)


def _export_cpu_us(spans: Sequence[ReadableSpan], grpc: bool, batches: int = 20) -> float:
    """CPU µs of this thread per span to export ``spans`` over OTLP/HTTP (or gRPC), 64
    a time, with the gateway's exporter (``tracing.exporter: otlp-http``, ``otlp-grpc``)."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    # Here, not at the top: a --base worker imports this module with a checkout that
    # may not have it.
    from serving.observability import otlp_export

    batch = list(spans[-EXPORT_BATCH:])
    sink, make = (
        (grpc_span_sink, otlp_export.grpc_span_exporter)
        if grpc
        else (span_sink, otlp_export.span_exporter)
    )
    with sink() as url:
        exporter = make(url, {})
        exporter.export(batch)  # the connection is opened once
        started = time.thread_time()
        for _ in range(batches):
            if exporter.export(batch) is not SpanExportResult.SUCCESS:
                raise RuntimeError("the loopback sink refused an export")
        used = time.thread_time() - started
        exporter.shutdown()
    return used / (batches * len(batch)) * 1e6


#: The configuration every other is compared with (always measured).
_ALL_OFF = "metrics off (all off)"


def _configs(keys_file: Path, store: ModelStore) -> dict[str, _Case]:
    from serving.auth import create_key

    key = create_key(keys_file, "bench", ["infer:*"], replace=True)
    auth = {"keys_file": str(keys_file)}
    rate = {"rate_limits": [{"rate": 1e9, "burst": 1_000_000_000}]}
    sampled_out = {"exporter": "console", "sample_ratio": 0.0}
    model = store.models()[0]
    versions = store.versions(model)
    # As tail_bench's guarded configuration, tracing sampled out (no exporter at hand).
    guarded: dict[str, Any] = {
        "auth": auth,
        "limits": {"default_timeout_ms": 10000},
        "batching": {"priority_levels": 2},
        "tracing": sampled_out,
    }
    if len(versions) > 1:
        guarded["routes"] = {
            model: {
                "split": {str(versions[-1]): 1},
                "shadow": {"version": versions[-2], "percent": 1},
            }
        }
    sampled = {"exporter": "console", "sample_ratio": 1.0}  # (the exporter is replaced)
    return {
        _ALL_OFF: _Case({"metrics": {"enabled": False}}, {}),
        "default (metrics on)": _Case({}, {}),
        "+ API key auth": _Case({"auth": auth}, {"x-api-key": key}),
        "+ auth + rate limit": _Case({"auth": auth, "limits": rate}, {"x-api-key": key}),
        "+ tracing (sampled out)": _Case({"tracing": sampled_out}, {}),
        "+ tracing (every request sampled)": _Case({"tracing": sampled}, {}, traced=True),
        "+ deadline (10 s)": _Case({"limits": {"default_timeout_ms": 10000}}, {}),
        "+ 2 priority levels": _Case({"batching": {"priority_levels": 2}}, {}),
        "guarded (tail_bench's, sampled out)": _Case(guarded, {"x-api-key": key}),
        "default, JSON body": _Case({}, {}, json=True),
        "guarded, JSON body": _Case(guarded, {"x-api-key": key}, json=True),
    }


def main(argv: list[str] | None = None) -> int:
    """Print µs per request for each configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="measure only the configurations whose name starts with NAME (repeatable)",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="measure FermionConfig() alone (runs on older trees too, for a baseline)",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="send each request as HTTP/1.1 bytes through the gateway's connection protocol",
    )
    parser.add_argument(
        "--base",
        type=Path,
        metavar="CHECKOUT",
        help="measure each configuration here and in CHECKOUT at once, and print the ratios",
    )
    parser.add_argument("--rounds", type=int, default=40, help="rounds each, with --base (40)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=4,
        help="pairs of fresh workers sharing the rounds, with --base (4)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    store = ModelStore(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker is not None:
            case = _configs(Path(tmp) / "keys.json", store)[args.worker]
            config = FermionConfig.model_validate(case.data)
            _run(
                _serve_rounds(config, store, case, args.requests, http=args.http), uvloop=args.http
            )
            return 0
        if args.defaults_only:
            rounds, _ = _run(
                _measure(FermionConfig(), store, _Case({}, {}), args.requests, http=args.http),
                uvloop=args.http,
            )
            print(f"defaults: {statistics.median(rounds):.1f} µs/request")
            return 0
        configs = _configs(Path(tmp) / "keys.json", store)
        if args.only:
            configs = {
                name: case
                for name, case in configs.items()
                if name == _ALL_OFF or any(name.startswith(o) for o in args.only)
            }
        if args.base is not None:
            _compare(args, list(configs), Path(tmp))
            return 0
        results: dict[str, list[float]] = {name: [] for name in configs}
        traced: tuple[ReadableSpan, ...] = ()
        for _ in range(3):  # interleave the configurations
            for name, case in configs.items():
                config = FermionConfig.model_validate(case.data)
                rounds, spans = _run(
                    _measure(config, store, case, args.requests // 3, http=args.http),
                    uvloop=args.http,
                )
                results[name] += rounds
                traced = spans or traced
    base = statistics.median(results[_ALL_OFF])
    print(f"{'configuration':40} {'µs/request':>11} {'vs all off':>11}")
    for name, rounds in results.items():
        median = statistics.median(rounds)
        print(f"{name:40} {median:11.1f} {median - base:+10.1f}")
    if not traced:  # no configuration sampled by tracing was measured
        return 0
    spans_per_request = len(traced) / (args.requests // 3 // 5)  # one round's requests
    for protocol, grpc in (("HTTP", False), ("gRPC", True)):
        per_span = _export_cpu_us(traced, grpc)
        print(
            f"OTLP/{protocol} export of a sampled request's {spans_per_request:.0f} spans, on "
            f"the exporter's thread: {per_span * spans_per_request:.1f} µs "
            f"({per_span:.1f} µs a span, {EXPORT_BATCH} spans an export)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
