"""Run the open-loop engine for one job: in this process, or split over N local worker
processes that share one start time and each send their share of the rate.

A job is plain data (JSON for worker processes). Its schedule comes from a rate plan (the
model's requests built from its metadata, cycled) or from a capture file (replay). With
``warmup_s``, answers to requests intended before the end of the warm-up are kept apart
from the measured ones; with a stop rule, sending ends as soon as the measured window
can no longer meet it (a capacity probe that has clearly failed).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final, TypeVar

from loadtest.gateway import auth_headers
from loadtest.openloop import EngineStats, FailFast, Tick, run_open_loop
from loadtest.payloads import build_payloads, load_samples
from loadtest.rates import parse_rate
from loadtest.recorder import Recorder
from loadtest.transport import Call, Outcome, Transport, TransportOptions, load_transport

__all__ = [
    "WORKER_LEAD_S",
    "EngineJob",
    "JobResult",
    "StopRule",
    "check_request",
    "run_async",
    "run_job",
    "run_jobs",
]

_ROOT: Final = str(Path(__file__).resolve().parent.parent)
#: Worker processes start this long before their shared start time (imports, metadata).
WORKER_LEAD_S: Final = 2.0
#: A job in this process starts this long after its requests are built.
_LEAD_S: Final = 0.05
_T = TypeVar("_T")


@dataclass(frozen=True)
class StopRule:
    """Stop sending once the measured window cannot meet ``quantile < latency_ms`` or
    ``errors < max_error_rate`` whatever the rest of it does."""

    latency_ms: float | None = None
    quantile: float = 0.99
    max_error_rate: float | None = None


@dataclass
class EngineJob:
    """Everything one engine needs (JSON-serializable, so a worker process can run it)."""

    targets: list[str]
    model: str = ""
    model_version: str | None = None
    protocol: str = "http"
    binary: bool = False
    batch_size: int = 1
    samples: str | None = None
    api_key_env: str = "FERMION_API_KEY"
    max_connections: int = 1000
    timeout_s: float = 30.0
    rate: str | None = None
    duration_s: float = 60.0
    arrival: str = "uniform"
    seed: int = 0
    replay: str | None = None
    speed: float = 1.0
    warmup_s: float = 0.0
    stop: StopRule | None = None
    fail_fast: bool = True
    worker: int = 0
    workers: int = 1
    start_at: float | None = None

    def to_json(self) -> str:
        """The job as JSON."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineJob:
        """Read back ``to_json()``."""
        data = json.loads(text)
        if data.get("stop") is not None:
            data["stop"] = StopRule(**data["stop"])
        return cls(**data)


@dataclass
class JobResult:
    """What a job measured: the warm-up and measured windows, and the generator's stats."""

    measured: Recorder
    warmup: Recorder = field(default_factory=Recorder)
    stats: EngineStats = field(default_factory=EngineStats)

    def merge(self, other: JobResult) -> None:
        """Add another worker's result."""
        self.measured.merge(other.measured.to_dict())
        self.warmup.merge(other.warmup.to_dict())
        self.stats.merge(other.stats)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "measured": self.measured.to_dict(),
            "warmup": self.warmup.to_dict(),
            "stats": self.stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
        """Read back ``to_dict()``."""
        measured, warmup = Recorder(), Recorder()
        measured.merge(d["measured"])
        warmup.merge(d["warmup"])
        return cls(measured, warmup, EngineStats.from_dict(d["stats"]))


class _Window:
    """Routes each answer by its intended send time: warm-up or measured; applies the
    stop rule to the measured ones."""

    def __init__(
        self,
        split: float,
        warm: Recorder,
        measured: Recorder,
        rule: StopRule | None,
        planned: float,
        stop: asyncio.Event,
    ) -> None:
        self._split, self._warm, self._measured = split, warm, measured
        self._rule, self._stop = rule, stop
        self._slow = self._errors = 0
        self._slow_limit = self._error_limit = math.inf
        if rule is not None and rule.latency_ms is not None:
            self._slow_limit = (1.0 - rule.quantile) * planned
        if rule is not None and rule.max_error_rate is not None:
            self._error_limit = rule.max_error_rate * planned

    def record(self, end: float, ms: float, version: str | None, error: str | None) -> None:
        if end - ms / 1000.0 < self._split:
            self._warm.record(end, ms, version, error)
            return
        self._measured.record(end, ms, version, error)
        rule = self._rule
        if rule is None:
            return
        if rule.latency_ms is not None and ms >= rule.latency_ms:
            self._slow += 1
        if error is not None:
            self._errors += 1
        if self._slow > self._slow_limit or self._errors > self._error_limit:
            self._stop.set()


def _auth(job: EngineJob) -> dict[str, str]:
    return auth_headers(job.api_key_env)


def _transport(job: EngineJob) -> Transport:
    factory = load_transport(job.protocol)
    return factory(TransportOptions(job.targets, job.max_connections, _auth(job), job.timeout_s))


async def _model_calls(job: EngineJob, transport: Transport) -> list[Call]:
    metadata = await transport.metadata(job.model, job.model_version)
    samples = load_samples(Path(job.samples)) if job.samples else None
    payloads = build_payloads(metadata, samples, binary=job.binary, batch_size=job.batch_size)
    return transport.calls(job.model, job.model_version, payloads)


async def _schedule(
    job: EngineJob, transport: Transport
) -> tuple[Iterator[tuple[float, Call]], float, float]:
    """(schedule, its length in seconds, requests planned in the measured window)."""
    if job.replay is not None:
        from loadtest.replay import load_capture

        entries, length = load_capture(Path(job.replay), job.speed)
        mine = entries[job.worker :: job.workers]
        return iter(mine), length, float(len(mine))
    assert job.rate is not None
    plan = parse_rate(job.rate, job.duration_s).scaled(1.0 / job.workers)
    calls = await _model_calls(job, transport)
    times = plan.send_times(
        job.arrival, phase=(job.worker + 0.5) / job.workers, seed=job.seed + job.worker
    )
    first = job.worker * 17
    schedule = ((t, calls[(first + i) % len(calls)]) for i, t in enumerate(times))
    planned = plan.total - plan.expected(job.warmup_s)
    return schedule, plan.duration_s, planned


async def run_job(
    job: EngineJob,
    on_tick: Callable[[Tick], None] | None = None,
    on_start: Callable[[float], None] | None = None,
) -> JobResult:
    """Run ``job`` in this process's event loop.

    Without a ``start_at`` of its own the job starts once its requests are built (so
    building them never makes the first ones late); ``on_start`` gets the start time.
    """
    transport = _transport(job)
    try:
        schedule, length, planned = await _schedule(job, transport)
        start_at = job.start_at if job.start_at is not None else time.time() + _LEAD_S
        if on_start is not None:
            on_start(start_at)
        stop = asyncio.Event()
        result = JobResult(Recorder())
        sink = _Window(
            start_at + job.warmup_s, result.warmup, result.measured, job.stop, planned, stop
        )
        result.stats = await run_open_loop(
            schedule,
            transport,
            sink,
            plan_s=length,
            timeout_s=job.timeout_s,
            start_at=start_at,
            on_tick=on_tick,
            should_abort=FailFast() if job.fail_fast else None,
            stop=stop,
        )
        return result
    finally:
        await transport.aclose()


async def _check(job: EngineJob) -> Outcome:
    transport = _transport(job)
    try:
        return await transport.send((await _model_calls(job, transport))[0])
    finally:
        await transport.aclose()


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a fresh event loop (uvloop's when installed)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def check_request(job: EngineJob) -> Outcome:
    """Send the job's first request once and return what came back."""
    return run_async(_check(job))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _pump(stream: IO[bytes], lines: queue.Queue[tuple[int, bytes | None]], worker: int) -> None:
    for line in stream:
        lines.put((worker, line))
    lines.put((worker, None))


def run_jobs(
    job: EngineJob,
    workers: int,
    out: Path,
    on_tick: Callable[[Tick], None] | None = None,
    on_start: Callable[[float], None] | None = None,
) -> JobResult:
    """Run ``job`` split over ``workers`` processes (1: in this process) and merge them.

    Each worker sends 1/N of the rate (phases interleaved) or every N-th request of a
    replay, from a start time they share (``on_start`` gets it); their logs go to
    ``out/worker-<i>.log``. RuntimeError names a worker that failed.
    """
    if workers <= 1:
        return run_async(run_job(replace(job, workers=1, worker=0), on_tick, on_start))
    start_at = job.start_at if job.start_at is not None else time.time() + WORKER_LEAD_S
    if on_start is not None:
        on_start(start_at)
    lines: queue.Queue[tuple[int, bytes | None]] = queue.Queue()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    try:
        for i in range(workers):
            logs.append((out / f"worker-{i + 1}.log").open("wb"))
            spec = replace(job, worker=i, workers=workers, start_at=start_at)
            proc = subprocess.Popen(
                [sys.executable, "-m", "loadtest.open_worker", str(out / f"worker-{i + 1}.json")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logs[-1],
                env=_env(),
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(spec.to_json().encode())
            proc.stdin.close()
            procs.append(proc)
            threading.Thread(target=_pump, args=(proc.stdout, lines, i), daemon=True).start()
        pending: dict[int, tuple[Tick, set[int]]] = {}
        open_ = set(range(workers))
        while open_:
            worker, line = lines.get()
            if line is None:
                open_.discard(worker)
                continue
            tick = Tick.from_dict(json.loads(line))
            merged, seen = pending.setdefault(tick.second, (Tick(tick.second), set()))
            merged.merge(tick)
            seen.add(worker)
            if seen >= open_ and on_tick is not None:
                on_tick(pending.pop(tick.second)[0])
        result = JobResult(Recorder())
        for i, proc in enumerate(procs):
            code = proc.wait()
            if code != 0:
                log = out / f"worker-{i + 1}.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"worker {i + 1} exited with {code}: " + " | ".join(tail))
            done = json.loads((out / f"worker-{i + 1}.json").read_text())
            result.merge(JobResult.from_dict(done))
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for f in logs:
            f.close()
